#!/usr/bin/env bash
# Webhook receiver: `opsrun serve` against adnanh/webhook 2.8.0 (Debian `webhook`).
# Both get the same signed GitHub push (HMAC-SHA256 of the body in X-Hub-Signature-256;
# by default a push GitHub sent, recorded: PAYLOAD below)
# under wrk -c 32. opsrun verifies it, de-duplicates it by X-GitHub-Delivery (a new one on
# every request, bench/serve_wrk.lua), commits it to its store (SQLite, WAL; concurrent
# deliveries share a transaction, committed with the WAL flushed to disk: db:batch with
# sync, on libuv's thread pool) before it answers 202; its workers claim and complete every
# delivery during the run (before == after on the commit already processed: nothing to
# deploy, no git). webhook checks a payload-hmac-sha256 rule and runs /bin/true.
# Prints accepted deliveries/s, p99 latency and peak RSS of each, and the ratios. ROUNDS
# rounds (default 3), each a fresh opsrun (new store) and a fresh webhook, in alternating
# order; the ratios are those of the medians (one run is at the mercy of a noisy machine).
#   bench/serve_bench.sh                  # OPSRUN=build/opsrun, 10 s per run, 3 rounds
#   OPSRUN=/tmp/b/opsrun DURATION=30s ROUNDS=5 bench/serve_bench.sh
#   PAYLOAD=minimal bench/serve_bench.sh   # or PAYLOAD=FILE: another push payload
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
opsrun="${OPSRUN:-$root/build/opsrun}"
duration="${DURATION:-10s}"
rounds="${ROUNDS:-3}"
threads="${THREADS:-2}"
conns="${CONNS:-32}"
secret="bench-secret-0123456789"
work="$(mktemp -d "${BENCH_DIR:-/var/tmp}/opsrun-serve-bench-XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for tool in wrk webhook openssl curl git python3; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install -y $tool)" >&2; exit 2; }
done
[ -x "$opsrun" ] || { echo "no opsrun at $opsrun (set OPSRUN)" >&2; exit 2; }

# the operations repo the hook points at; every push is before == after: nothing changes
git init -q -b main "$work/repo"
mkdir -p "$work/repo/dev/ansible" && echo 'ansible: {}' > "$work/repo/dev/ansible/bitops.config.yaml"
git -C "$work/repo" add -A
git -C "$work/repo" -c user.name=bench -c user.email=bench@example.com commit -q -m c0
head=$(git -C "$work/repo" rev-parse HEAD)
# the body: a push as GitHub sends it (PAYLOAD, by default the recorded push of
# tests/lua/fixtures/webhooks/github/octokit-push-payload.json: 6.7 KB with the repository,
# pusher, sender and head commit) with its ref, before and after set to the bench repo's
# branch and commit; or, with PAYLOAD=minimal, a 271-byte body with only the fields opsrun
# reads (the body of the benchmarks before session 8)
payload="${PAYLOAD:-$root/tests/lua/fixtures/webhooks/github/octokit-push-payload.json}"
python3 - "$work/body.json" "$head" "$payload" <<'PY'
import json, sys
path, head, source = sys.argv[1], sys.argv[2], sys.argv[3]
if source != "minimal":
    body = json.load(open(source))
    body.update({"ref": "refs/heads/main", "before": head, "after": head})
else:
    body = {"ref": "refs/heads/main", "before": head, "after": head, "created": False, "deleted": False,
            "forced": False, "repository": {"full_name": "acme/ops"}, "commits": [],
            "pusher": {"name": "bench"}}
json.dump(body, open(path, "w"))
PY
export BODY_FILE="$work/body.json"
export SIGNATURE="sha256=$(openssl dgst -sha256 -hmac "$secret" -r < "$BODY_FILE" | cut -d' ' -f1)"
export RUN="r$$"
bytes=$(wc -c < "$BODY_FILE")

. "$here/lib.sh"
check_202() { # name url: one request by hand, with its own delivery id
  local status
  status=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
    -H 'X-GitHub-Event: push' -H "X-GitHub-Delivery: check-$RUN" -H "X-Hub-Signature-256: $SIGNATURE" \
    --data-binary "@$BODY_FILE" "$2")
  [ "$status" = 202 ] || { echo "$1 answered $status, not 202, to a correctly signed push" >&2; exit 1; }
}

# run_wrk NAME URL PID -> NAME_rps NAME_p99 NAME_peak NAME_requests
run_wrk() {
  local name=$1 url=$2 pid=$3
  check_202 "$name" "$url"
  local idle; idle=$(kib "$pid" VmRSS)
  wrk -t "$threads" -c "$conns" -d "$duration" --latency -s "$here/serve_wrk.lua" "$url" > "$work/$name.wrk"
  local peak; peak=$(kib "$pid" VmHWM)
  local rps p99 non2xx requests
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/$name.wrk")
  p99=$(awk '$1 == "99%" {print $2}' "$work/$name.wrk")
  requests=$(awk '/requests in/ {print $1}' "$work/$name.wrk")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$work/$name.wrk")
  [ -z "$non2xx" ] || { echo "$name: $non2xx responses were not 2xx" >&2; cat "$work/$name.wrk" >&2; exit 1; }
  printf '%-8s %10s deliveries/s   p99 %9s   RSS idle %7d KiB   peak %7d KiB   (%s requests)\n' \
    "$name" "$rps" "$p99" "$idle" "$peak" "$requests"
  local p99_ms
  p99_ms=$(awk -v v="$p99" 'BEGIN { if (v ~ /us$/) printf "%f", v / 1000; else if (v ~ /ms$/) printf "%f", v + 0;
    else if (v ~ /s$/) printf "%f", v * 1000; else printf "%f", v }')
  eval "${name}_rps=$rps ${name}_p99=$p99_ms ${name}_peak=$peak ${name}_requests=$requests"
  eval "${name}_all_rps+=($rps) ${name}_all_p99+=($p99_ms) ${name}_all_peak+=($peak)"
}
opsrun_all_rps=() opsrun_all_p99=() opsrun_all_peak=() webhook_all_rps=() webhook_all_p99=() webhook_all_peak=()
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

echo "wrk -t $threads -c $conns -d $duration, a $bytes-byte GitHub push signed with HMAC-SHA256, a new delivery id per request"

bench_opsrun() { # ROUND
  local port; port=$(free_port)
  cat > "$work/opsrun-serve.yaml" <<YAML
listen: 127.0.0.1:$port
store: $work/state-$1/opsrun.db
drain: 30
hooks:
  ops: {provider: github, repo: $work/repo, branch: main, secret_env: BENCH_SECRET}
YAML
  BENCH_SECRET="$secret" "$opsrun" serve --config "$work/opsrun-serve.yaml" > "$work/opsrun.out" 2> "$work/opsrun.err" &
  pids+=($!)
  local opsrun_pid=$!
  wait_up "http://127.0.0.1:$port/healthz"
  run_wrk opsrun "http://127.0.0.1:$port/hooks/ops" "$opsrun_pid"
  # every answered request is a delivery in the store, stored once
  local metrics queued dups rows
  metrics=$(curl -s "http://127.0.0.1:$port/metrics")
  queued=$(awk -F' ' '/^opsrun_deliveries_total\{outcome="queued"\}/ {print $2}' <<< "$metrics")
  dups=$(awk -F' ' '/^opsrun_deliveries_total\{outcome="duplicate"\}/ {print $2}' <<< "$metrics")
  [ "$dups" = 0 ] || { echo "opsrun: $dups deliveries were duplicates: the delivery ids are not unique" >&2; exit 1; }
  [ "$queued" -ge "$opsrun_requests" ] || { echo "opsrun: $queued queued < $opsrun_requests answered" >&2; exit 1; }
  rows=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from ops_queue where queue = ?", ("deliveries",)).fetchone()[0])' "$work/state-$1/opsrun.db")
  local depth
  depth=$(awk '/^opsrun_queue_depth/ {print $2}' <<< "$metrics")
  echo "opsrun   $queued deliveries queued, $rows in the store, $depth not yet processed by the workers"
  # how the deliveries were stored: transactions shared by the deliveries that arrived
  # during the one before, and where a transaction's time went (docs/serve.md, /metrics)
  awk -v q="$queued" '
    /^opsrun_delivery_commits_total / {c = $2} /^opsrun_delivery_commit_seconds_total / {cs = $2}
    /^opsrun_store_batches_total / {b = $2}
    /^opsrun_store_batch_seconds_total/ {split($1, p, "\""); t[p[2]] = $2}
    END {
      if (c == 0 || b == 0) exit
      printf "opsrun   %d transactions stored them, %.1f deliveries each, %.0f us from hand-over to disk;", c, q / c, cs / c * 1e6
      printf " the store thread'"'"'s %d batches, mean us: waiting %.0f, committing %.0f, flushing %.0f, returning %.0f\n",
        b, t["waiting"] / b * 1e6, t["committing"] / b * 1e6, t["flushing"] / b * 1e6, t["returning"] / b * 1e6
    }' <<< "$metrics"
  # the workers must keep up during the measurement (a backlog would have spared the
  # receiver their transactions): at the end, at most two full groups may be in flight
  [ -n "$depth" ] || { echo "opsrun: /metrics has no opsrun_queue_depth" >&2; exit 1; }
  [ "$depth" -le 200 ] || { echo "opsrun: the workers fell behind: $depth deliveries not processed at the end" >&2; exit 1; }
  kill -TERM "$opsrun_pid"
  wait "$opsrun_pid" || { echo "opsrun serve did not exit 0 on SIGTERM" >&2; exit 1; }
  rm -rf "$work/state-$1"
}

cat > "$work/hooks.json" <<JSON
[{"id": "ops", "execute-command": "/bin/true", "response-message": "accepted",
  "success-http-response-code": 202,
  "trigger-rule": {"match": {"type": "payload-hmac-sha256", "secret": "$secret",
                             "parameter": {"source": "header", "name": "X-Hub-Signature-256"}}}}]
JSON
bench_webhook() {
  start_webhook "$work/hooks.json" "$work/webhook.log"
  run_wrk webhook "http://127.0.0.1:$webhook_port/hooks/ops" "$webhook_pid"
  kill "$webhook_pid"
  wait "$webhook_pid" 2>/dev/null || true
}

for ((r = 1; r <= rounds; r++)); do
  echo "round $r of $rounds"
  if ((r % 2)); then bench_opsrun "$r"; bench_webhook; else bench_webhook; bench_opsrun "$r"; fi
done
opsrun_rps=$(median "${opsrun_all_rps[@]}") webhook_rps=$(median "${webhook_all_rps[@]}")
opsrun_p99=$(median "${opsrun_all_p99[@]}") webhook_p99=$(median "${webhook_all_p99[@]}")
opsrun_peak=$(median "${opsrun_all_peak[@]}") webhook_peak=$(median "${webhook_all_peak[@]}")
printf 'medians  opsrun %s deliveries/s, p99 %s ms, peak %s KiB; webhook %s/s, p99 %s ms, peak %s KiB\n' \
  "$opsrun_rps" "$opsrun_p99" "$opsrun_peak" "$webhook_rps" "$webhook_p99" "$webhook_peak"
awk -v a="$opsrun_rps" -v b="$webhook_rps" -v pa="$opsrun_p99" -v pb="$webhook_p99" \
    -v ra="$opsrun_peak" -v rb="$webhook_peak" 'BEGIN {
  printf "ratio    opsrun/webhook: deliveries/s %.2fx (target >= 3), p99 %.2fx (target < 1), peak RSS %.2fx (target <= 0.5)\n",
    a / b, pa / pb, ra / rb
  ok = (a >= 3 * b) && (pa < pb) && (ra <= 0.5 * rb)
  print ok ? "targets: met" : "targets: MISSED"
}'
