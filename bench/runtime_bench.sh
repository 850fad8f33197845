#!/usr/bin/env bash
# Runtime: the three speed targets of the first issue, each against its baseline measured
# in the same run, printing both figures and the ratio.
#   1. start-up: `opsrun -e ''` against `lua5.4 -e ''`, median of RUNS (30) runs each
#      (hyperfine -N if installed, else an interleaved loop of ours); target ratio <= 2.
#   2. SPAWNS (1000) sequential ops.proc.run{"/bin/true"} against a `sh` loop running
#      /bin/true as often; wall time of the whole process, median of ROUNDS (5) runs each,
#      interleaved; target ratio <= 1.3.
#   3. a child writing BYTES (1 GiB) of 100-byte lines, read through a line callback,
#      against the same generator piped into `cat > /dev/null`; MB/s from the wall time,
#      median of GIB_ROUNDS (5) runs each, interleaved; target ratio >= 0.5, and opsrun's
#      peak RSS (VmHWM at the end of the script) under 32 MiB.
# Usage (from the repo root):
#   bench/runtime_bench.sh                     # OPSRUN=build/opsrun
#   OPSRUN=/tmp/b/opsrun RUNS=50 bench/runtime_bench.sh
set -euo pipefail
export LC_ALL=C # EPOCHREALTIME and awk with a '.' decimal point
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
opsrun="${OPSRUN:-$root/build/opsrun}"
case "$opsrun" in /*) ;; *) opsrun="$PWD/$opsrun" ;; esac
runs="${RUNS:-30}"
spawns="${SPAWNS:-1000}"
rounds="${ROUNDS:-5}"
bytes="${BYTES:-1073741824}"
gib_rounds="${GIB_ROUNDS:-5}"
[ -x "$opsrun" ] || { echo "no opsrun at $opsrun (set OPSRUN)" >&2; exit 2; }
command -v lua5.4 >/dev/null || { echo "lua5.4 is needed (apt-get install -y lua5.4)" >&2; exit 2; }
[ "$runs" -ge 20 ] || { echo "RUNS must be at least 20" >&2; exit 2; }
work="$(mktemp -d /tmp/opsrun-runtime-bench-XXXXXX)"
trap 'rm -rf "$work"' EXIT
cd "$work" # neutral directory: no repo, no .opsrun/ overrides

# median of the numbers on stdin
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) exit 1; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
# elapsed seconds between two EPOCHREALTIME readings
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.6f", b - a}'; }
verdict() { awk -v r="$1" -v t="$2" -v op="$3" 'BEGIN {ok = (op == "<=") ? r <= t : r >= t; print ok ? "ok" : "MISSED"}'; }

echo "opsrun: $opsrun"
echo "machine: $(nproc) CPUs, $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# ---- 1. start-up ----
if command -v hyperfine >/dev/null; then
  how="hyperfine -N, 5 warm-up runs"
  hyperfine -N --style none -w 5 -r "$runs" --export-csv "$work/start.csv" \
    -n opsrun "$opsrun -e ''" -n lua5.4 "lua5.4 -e ''" > /dev/null 2> "$work/hyperfine.err" \
    || { cat "$work/hyperfine.err" >&2; exit 1; }
  if grep -q outliers "$work/hyperfine.err"; then how="$how; hyperfine saw outliers"; fi
  # command,mean,stddev,median,user,system,min,max (seconds)
  s_ops=$(awk -F, '$1 == "opsrun" {print $4}' "$work/start.csv")
  s_lua=$(awk -F, '$1 == "lua5.4" {print $4}' "$work/start.csv")
else
  how="interleaved loop, 3 warm-up runs"
  for _ in 1 2 3; do "$opsrun" -e '' && lua5.4 -e ''; done
  : > "$work/s_ops"; : > "$work/s_lua"
  for _ in $(seq "$runs"); do
    t0=$EPOCHREALTIME; "$opsrun" -e ''; t1=$EPOCHREALTIME; elapsed "$t0" "$t1" >> "$work/s_ops"; echo >> "$work/s_ops"
    t0=$EPOCHREALTIME; lua5.4 -e ''; t1=$EPOCHREALTIME; elapsed "$t0" "$t1" >> "$work/s_lua"; echo >> "$work/s_lua"
  done
  s_ops=$(median < "$work/s_ops"); s_lua=$(median < "$work/s_lua")
fi
r_start=$(awk -v a="$s_ops" -v b="$s_lua" 'BEGIN {printf "%.2f", a / b}')
echo "start-up, median of $runs runs each ($how)"
awk -v a="$s_ops" -v b="$s_lua" 'BEGIN {
  printf "  opsrun -e '"''"'   %8.2f ms\n  lua5.4 -e '"''"'   %8.2f ms\n", a * 1000, b * 1000}'
echo "  ratio opsrun/lua5.4: $r_start   (target <= 2: $(verdict "$r_start" 2 "<="))"
echo

# ---- 2. sequential processes ----
sh_loop="i=0; while [ \$i -lt $spawns ]; do /bin/true; i=\$((i+1)); done"
"$opsrun" "$here/runtime_spawn.lua" 20 > /dev/null; sh -c "$sh_loop" # warm-up
: > "$work/p_ops"; : > "$work/p_sh"; : > "$work/p_loop"
for _ in $(seq "$rounds"); do
  t0=$EPOCHREALTIME; "$opsrun" "$here/runtime_spawn.lua" "$spawns" > "$work/spawn.out"; t1=$EPOCHREALTIME
  { elapsed "$t0" "$t1"; echo; } >> "$work/p_ops"
  sed -n 's/^spawn_seconds=//p' "$work/spawn.out" >> "$work/p_loop"
  t0=$EPOCHREALTIME; sh -c "$sh_loop"; t1=$EPOCHREALTIME
  { elapsed "$t0" "$t1"; echo; } >> "$work/p_sh"
done
p_ops=$(median < "$work/p_ops"); p_sh=$(median < "$work/p_sh"); p_loop=$(median < "$work/p_loop")
r_proc=$(awk -v a="$p_ops" -v b="$p_sh" 'BEGIN {printf "%.2f", a / b}')
echo "$spawns sequential runs of /bin/true, whole process wall time, median of $rounds runs each"
awk -v a="$p_ops" -v l="$p_loop" -v b="$p_sh" -v n="$spawns" 'BEGIN {
  printf "  opsrun, ops.proc.run   %8.1f ms  (%.0f us per run; the loop alone %.1f ms)\n", a * 1000, a * 1e6 / n, l * 1000
  printf "  sh while loop          %8.1f ms  (%.0f us per run)\n", b * 1000, b * 1e6 / n}'
echo "  ratio opsrun/sh: $r_proc   (target <= 1.3: $(verdict "$r_proc" 1.3 "<="))"
echo

# ---- 3. 1 GiB of lines through a line callback ----
# 100-byte lines (99 digits and a newline); the last line is cut short at $bytes
gen="yes \"\$(printf %099d 0)\" | head -c $bytes"
want_lines=$(( (bytes + 99) / 100 ))
: > "$work/g_ops"; : > "$work/g_cat"; : > "$work/g_rss"
for _ in $(seq "$gib_rounds"); do
  t0=$EPOCHREALTIME; sh -c "$gen | cat > /dev/null"; t1=$EPOCHREALTIME
  { elapsed "$t0" "$t1"; echo; } >> "$work/g_cat"
  t0=$EPOCHREALTIME; "$opsrun" "$here/runtime_lines.lua" "$gen" > "$work/lines.out"; t1=$EPOCHREALTIME
  { elapsed "$t0" "$t1"; echo; } >> "$work/g_ops"
  got=$(sed -n 's/^lines=\([0-9]*\) .*/\1/p' "$work/lines.out")
  [ "$got" = "$want_lines" ] || { echo "the line callback saw $got lines, not $want_lines" >&2; exit 1; }
  sed -n 's/.*hwm_kib=\([0-9]*\).*/\1/p' "$work/lines.out" >> "$work/g_rss"
done
g_ops=$(median < "$work/g_ops"); g_cat=$(median < "$work/g_cat"); g_rss=$(sort -n "$work/g_rss" | tail -1)
r_lines=$(awk -v a="$g_ops" -v b="$g_cat" 'BEGIN {printf "%.2f", b / a}')
echo "$bytes bytes of 100-byte lines from sh -c '$gen', median of $gib_rounds runs each"
awk -v a="$g_ops" -v b="$g_cat" -v n="$bytes" -v l="$want_lines" 'BEGIN {
  printf "  opsrun, stdout = function(line) n = n + 1 end   %7.0f MB/s  (%.2f s, %.0f lines/s)\n", n / a / 1e6, a, l / a
  printf "  | cat > /dev/null                             %7.0f MB/s  (%.2f s)\n", n / b / 1e6, b}'
echo "  ratio opsrun/cat throughput: $r_lines   (target >= 0.5: $(verdict "$r_lines" 0.5 ">="))"
rss_mib=$(awk -v k="$g_rss" 'BEGIN {printf "%.1f", k / 1024}')
echo "  opsrun peak RSS (VmHWM): $rss_mib MiB   (target < 32 MiB: $(verdict "$rss_mib" 32 "<="))"
echo
echo "summary: start-up $r_start x lua5.4; $spawns runs $r_proc x sh; lines $r_lines x cat, peak RSS $rss_mib MiB"
