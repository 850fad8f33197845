# Shared by the benchmark scripts (sourced): ports, memory readings, waiting for servers.

# free_port -> a TCP port nobody listens on, on 127.0.0.1
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# kib PID FIELD -> the /proc/PID/status field (VmRSS, VmHWM) in KiB
kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

# wait_up URL : until a server answers there (10 s), else exit 1
wait_up() {
  for _ in $(seq 200); do
    curl -s -o /dev/null "$1" && return 0
    sleep 0.05
  done
  echo "server at $1 did not come up" >&2
  exit 1
}

# start_webhook HOOKS_JSON LOG -> sets webhook_port, webhook_pid: adnanh/webhook on
# 127.0.0.1, answering once it is up (the baseline both HTTP benchmarks measure against)
start_webhook() {
  webhook_port=$(free_port)
  webhook -hooks "$1" -ip 127.0.0.1 -port "$webhook_port" > "$2" 2>&1 &
  webhook_pid=$!
  pids+=("$webhook_pid")
  wait_up "http://127.0.0.1:$webhook_port/"
}
