#!/usr/bin/env bash
# Where deploy --jobs 1's wall time goes, against the bare opsrun script and the sh
# baseline of bench/deploy_bench.sh: the scheduler's fork/exec/exit tracepoints recorded
# with perf (as root; Debian package linux-perf) and split by bench/deploy_trace.py into
# start, spawn (fork to exec), child (exec to exit), the gaps between children (inside a
# step, and at a step's change) and end.
# Usage (from the repo root), on a repo kept by the deploy benchmark:
#   KEEP=1 ROUNDS=1 bench/deploy_bench.sh        # prints "KEEP: ... stay in DIR"
#   OPSRUN=build/opsrun bench/deploy_trace.sh DIR [RUNS]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
opsrun="${OPSRUN:-$here/../build/opsrun}"
case "$opsrun" in /*) ;; *) opsrun="$PWD/$opsrun" ;; esac
work="${1:?usage: deploy_trace.sh DIR-KEPT-BY-deploy_bench.sh [RUNS]}"
runs="${2:-2}"
[ -d "$work/repo" ] && [ -f "$work/baseline.sh" ] || { echo "$work: not a folder kept by KEEP=1 bench/deploy_bench.sh" >&2; exit 2; }
command -v perf > /dev/null || { echo "perf is needed (apt-get install -y linux-perf)" >&2; exit 2; }
export PATH="$work/bin:$PATH" OPSRUN_STORE="$work/store.db" BENCH_LOG="" BENCH_SLEEP=""
unset BITOPS_ENVIRONMENT ENVIRONMENT OPSRUN_PATH
trace() { # name command...
  local name=$1; shift
  perf record -q -e sched:sched_process_exec,sched:sched_process_exit,sched:sched_process_fork -a \
    -o "$work/trace.data" -- "$@" > /dev/null 2>&1 || true
  perf script -i "$work/trace.data" 2> /dev/null > "$work/trace.txt"
  python3 "$here/deploy_trace.py" "$work/trace.txt" "$name"
}
"$opsrun" deploy --repo "$work/repo" --all --jobs 1 > /dev/null 2>&1 || true # warm-up
for _ in $(seq "$runs"); do
  trace "opsrun deploy --jobs 1" "$opsrun" deploy --repo "$work/repo" --all --jobs 1
  trace "bare opsrun (deploy_floor.lua)" "$opsrun" "$here/deploy_floor.lua" "$work/baseline.sh"
  trace "sh baseline" sh "$work/baseline.sh"
  echo
done
rm -f "$work/trace.data" "$work/trace.txt"
