#!/usr/bin/env bash
# HTTP server: opsrun's ops.http.serve against adnanh/webhook 2.8.0 (Debian `webhook`), both
# answering a small signed POST (HMAC-SHA256 of the body in X-Hub-Signature-256) with 202.
# Prints requests/s and p99 latency under wrk -c 32, their ratio, and idle and loaded RSS.
#   bench/http_server_bench.sh                 # OPSRUN=build/opsrun, 10 s per run
#   OPSRUN=/tmp/b/opsrun DURATION=30s bench/http_server_bench.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
opsrun="${OPSRUN:-$root/build/opsrun}"
duration="${DURATION:-10s}"
threads="${THREADS:-2}"
conns=32
secret="s3cret"
work="$(mktemp -d /tmp/opsrun-http-bench-XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for tool in wrk webhook openssl curl; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install -y $tool)" >&2; exit 2; }
done
[ -x "$opsrun" ] || { echo "no opsrun at $opsrun (set OPSRUN)" >&2; exit 2; }

body='{"ref":"refs/heads/main","before":"6113728f27ae82c7b1a177c8d03f9e96e0adf246","after":"59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5","repository":{"full_name":"example/ops"}}'
sig="sha256=$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)"
cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Hub-Signature-256"] = "$sig"
LUA
cat > "$work/hooks.json" <<JSON
[{"id": "bench", "execute-command": "/bin/true", "response-message": "accepted",
  "success-http-response-code": 202,
  "trigger-rule": {"match": {"type": "payload-hmac-sha256", "secret": "$secret",
                             "parameter": {"source": "header", "name": "X-Hub-Signature-256"}}}}]
JSON

. "$here/lib.sh"

# run_wrk NAME URL PID -> NAME_rps NAME_p99 NAME_idle NAME_loaded
run_wrk() {
  local name=$1 url=$2 pid=$3
  local status
  status=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
    -H "X-Hub-Signature-256: $sig" --data-binary "$body" "$url")
  [ "$status" = 202 ] || { echo "$name answered $status, not 202, to a correctly signed POST" >&2; exit 1; }
  local idle; idle=$(kib "$pid" VmRSS)
  wrk -t "$threads" -c "$conns" -d "$duration" --latency -s "$work/post.lua" "$url" > "$work/$name.wrk"
  local loaded; loaded=$(kib "$pid" VmHWM)
  local rps p99 non2xx
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/$name.wrk")
  p99=$(awk '$1 == "99%" {print $2}' "$work/$name.wrk")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$work/$name.wrk")
  [ -z "$non2xx" ] || { echo "$name: $non2xx responses were not 2xx" >&2; cat "$work/$name.wrk" >&2; exit 1; }
  printf '%-14s %10s req/s   p99 %9s   RSS idle %6d KiB   RSS peak under load %6d KiB\n' \
    "$name" "$rps" "$p99" "$idle" "$loaded"
  eval "${name}_rps=$rps"
}

echo "wrk -t $threads -c $conns -d $duration, POST of ${#body} bytes signed with HMAC-SHA256, answered 202"

# opsrun twice: verifying and answering only, then also running /bin/true per request as
# webhook does (webhook answers first and runs the command in a goroutine)
for mode in verify exec; do
  port=$(free_port)
  "$opsrun" "$here/http_server_bench.lua" "$port" "$secret" "$mode" > "$work/opsrun.out" 2> "$work/opsrun.err" &
  pids+=($!)
  wait_up "http://127.0.0.1:$port/"
  run_wrk "opsrun_$mode" "http://127.0.0.1:$port/hooks/bench" "${pids[-1]}"
  curl -s -o /dev/null "http://127.0.0.1:$port/quit"
  wait "${pids[-1]}" || true
done

start_webhook "$work/hooks.json" "$work/webhook.log"
run_wrk webhook "http://127.0.0.1:$webhook_port/hooks/bench" "$webhook_pid"

awk -v a="$opsrun_verify_rps" -v e="$opsrun_exec_rps" -v b="$webhook_rps" 'BEGIN {
  printf "ratio    opsrun/webhook requests/s: %.2f answering only, %.2f both running /bin/true\n", a / b, e / b}'
