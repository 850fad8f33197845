#!/usr/bin/env bash
# Deploy: the orchestration overhead of `opsrun deploy`, two targets, each against its
# baseline measured in the same run (see bench/README.md, "Deploy").
#   1. ENVS (50) environments x 4 tools (terraform, ansible, helm, cloudformation) with
#      no-op tool binaries: `opsrun deploy --all --jobs 1` against a sh script running the
#      same commands, in the same folders, one after the other; wall time, median of
#      ROUNDS (5) runs each, interleaved; target ratio <= 1.2. (The default --jobs 4,
#      --jobs 8, the same commands run by a bare opsrun script and the deploy copying
#      every environment afresh are printed too.)
#   2. the same repo with tools whose deploying command sleeps SLEEP (1) s:
#      `opsrun deploy --all --jobs JOBS` (8) against the ideal wall time of the step graph
#      the engine builds (bench/deploy_ideal.lua); target within 10 %.
# The tools are stand-ins put first on PATH (opsrun calls them by name); the repo is
# generated in a temp dir. The sh baseline's commands are those opsrun's --dry-run prints,
# and a logged run checks that opsrun really runs exactly those.
# Usage (from the repo root):
#   bench/deploy_bench.sh                        # OPSRUN=build/opsrun
#   OPSRUN=/tmp/b/opsrun ENVS=20 ROUNDS=3 bench/deploy_bench.sh
#   KEEP=1 bench/deploy_bench.sh                 # leaves the generated repo for profiling
set -euo pipefail
export LC_ALL=C
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
opsrun="${OPSRUN:-$root/build/opsrun}"
case "$opsrun" in /*) ;; *) opsrun="$PWD/$opsrun" ;; esac
envs="${ENVS:-50}"
rounds="${ROUNDS:-5}"
jobs="${JOBS:-8}"
sleep_s="${SLEEP:-1}"
[ -x "$opsrun" ] || { echo "no opsrun at $opsrun (set OPSRUN)" >&2; exit 2; }
work="$(mktemp -d /tmp/opsrun-deploy-bench-XXXXXX)"
if [ -n "${KEEP:-}" ]; then echo "KEEP: the repo, tools and baseline stay in $work" >&2; else trap 'rm -rf "$work"' EXIT; fi
repo="$work/repo"
export OPSRUN_STORE="$work/store.db"
unset BITOPS_ENVIRONMENT ENVIRONMENT OPSRUN_PATH

median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) exit 1; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.6f", b - a}'; }
verdict() { awk -v r="$1" -v t="$2" 'BEGIN {print (r <= t) ? "ok" : "MISSED"}'; }

# ---- the tools: one script under four names ----
mkdir -p "$work/bin"
cat > "$work/bin/tool" <<'TOOL'
#!/bin/sh
# A stand-in for terraform, ansible-playbook, helm and aws: does nothing, except
#  - log its arguments when BENCH_LOG is set (the check run only);
#  - `aws cloudformation describe-stacks` answers as AWS does for a stack that does not
#    exist, so that opsrun takes the create path (the one --dry-run prints);
#  - with BENCH_SLEEP, the command that deploys (terraform apply, ansible-playbook,
#    helm upgrade, aws cloudformation create-stack) sleeps that long: one per step.
name=${0##*/}
[ -z "$BENCH_LOG" ] || echo "$name $*" >> "$BENCH_LOG"
case "$name $1 $2" in
  "aws cloudformation describe-stacks")
    echo "An error occurred (ValidationError) when calling the DescribeStacks operation: Stack with id $4 does not exist" >&2
    exit 255 ;;
esac
if [ -n "$BENCH_SLEEP" ]; then
  case "$name $1 $2" in
    "terraform apply "*|"terraform apply"|ansible-playbook*|"helm upgrade "*|"aws cloudformation create-stack") sleep "$BENCH_SLEEP" ;;
  esac
fi
exit 0
TOOL
chmod +x "$work/bin/tool"
for t in terraform ansible-playbook helm aws; do ln -s tool "$work/bin/$t"; done
export PATH="$work/bin:$PATH"
export BENCH_LOG="" BENCH_SLEEP=""

# ---- the repo: ENVS environments, each with the four tools ----
for i in $(seq -w 1 "$envs"); do
  e="$repo/env$i"
  mkdir -p "$e/terraform" "$e/ansible" "$e/helm/web/templates" "$e/cloudformation"
  echo 'resource "terraform_data" "x" {}' > "$e/terraform/main.tf"
  printf 'terraform:\n  options:\n    stack-action: apply\n' > "$e/terraform/bitops.config.yaml"
  printf -- '- hosts: localhost\n  gather_facts: false\n  tasks: []\n' > "$e/ansible/playbook.yaml"
  printf 'ansible:\n  cli:\n    extra-vars: "env=env%s"\n' "$i" > "$e/ansible/bitops.config.yaml"
  printf 'apiVersion: v2\nname: web\nversion: 0.1.0\n' > "$e/helm/web/Chart.yaml"
  printf 'replicas: 1\n' > "$e/helm/web/values.yaml"
  printf 'helm:\n  cli:\n    namespace: env%s\n' "$i" > "$e/helm/bitops.config.yaml"
  printf 'Resources:\n  Bucket:\n    Type: AWS::S3::Bucket\n' > "$e/cloudformation/template.yaml"
  printf 'cloudformation:\n  options:\n    cfn-stack-name: bench-env%s\n' "$i" > "$e/cloudformation/bitops.config.yaml"
done

# ---- the sh baseline: the commands of the dry run, in the repo's folders ----
"$opsrun" deploy --repo "$repo" --all --dry-run --jobs 1 > "$work/dry.out" 2> "$work/dry.err"
# "[env/tool] would run: CMD" then "    in: DIR"; DIR and paths in CMD are in the run's
# working copy (OPSRUN workdir/ENV/...): point them at the repo, which has the same tree
wd=$(sed -n 's/^    in: \(.*\)\/env[0-9]*\/[a-z]*$/\1/p' "$work/dry.out" | awk 'NR == 1')
[ -n "$wd" ] || { echo "cannot read the dry run's output:" >&2; head "$work/dry.out" "$work/dry.err" >&2; exit 1; }
{
  echo "#!/bin/sh"
  awk -v wd="$wd" -v repo="$repo" '
    function fix(s) { gsub(wd, repo, s); return s }
    /^\[[^]]*\] would run: / { cmd = $0; sub(/^\[[^]]*\] would run: /, "", cmd); next }
    /^    in: / && cmd != "" { dir = $0; sub(/^    in: /, "", dir); print "cd " fix(dir) " && " fix(cmd); cmd = "" }
  ' "$work/dry.out"
} > "$work/baseline.sh"
ncmd=$(($(wc -l < "$work/baseline.sh") - 1))

# ---- check: a real run runs exactly those commands ----
BENCH_LOG="$work/real.log" "$opsrun" deploy --repo "$repo" --all --jobs 1 > /dev/null 2> "$work/real.err" \
  || { echo "opsrun deploy failed:" >&2; tail "$work/real.err" >&2; exit 1; }
BENCH_LOG="$work/sh.log" sh "$work/baseline.sh" > /dev/null 2>&1 || true
norm() { sed -E 's#/tmp/opsrun-run-[A-Za-z0-9]+#REPO#g; s#'"$repo"'#REPO#g' "$1"; }
if ! diff <(norm "$work/real.log") <(norm "$work/sh.log") > "$work/diff.out"; then
  echo "opsrun ran other commands than its dry run printed:" >&2; head -20 "$work/diff.out" >&2; exit 1
fi

echo "opsrun: $opsrun"
echo "machine: $(nproc) CPUs, $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "repo: $envs environments x 4 tools = $((envs * 4)) steps, $ncmd commands (checked: a real run runs the dry run's commands)"
echo

# ---- 1. no-op tools ----
# Besides the target's pair, runs that say where the difference goes: the same commands
# started by a bare opsrun script (the runtime alone, bench/deploy_floor.lua), and the
# deploy copying every environment afresh (OPSRUN_KEEP_COPIES=0: a first run; the others
# reuse the copies the warm-up kept, docs/config.md "The working copy").
"$opsrun" deploy --repo "$repo" --all --jobs 1 > /dev/null 2>&1; sh "$work/baseline.sh" > /dev/null 2>&1 || true # warm-up
: > "$work/t_ops1"; : > "$work/t_ops8"; : > "$work/t_opsd"; : > "$work/t_sh"; : > "$work/t_floor"; : > "$work/t_fresh"
timed() { # file command...: appends the command's wall time in seconds
  local out=$1; shift
  local t0=$EPOCHREALTIME; "$@" > /dev/null 2>&1 || true; local t1=$EPOCHREALTIME
  { elapsed "$t0" "$t1"; echo; } >> "$out"
}
for _ in $(seq "$rounds"); do
  timed "$work/t_ops1" "$opsrun" deploy --repo "$repo" --all --jobs 1
  timed "$work/t_sh" sh "$work/baseline.sh"
  timed "$work/t_ops8" "$opsrun" deploy --repo "$repo" --all --jobs "$jobs"
  timed "$work/t_opsd" "$opsrun" deploy --repo "$repo" --all
  timed "$work/t_floor" "$opsrun" "$here/deploy_floor.lua" "$work/baseline.sh"
  timed "$work/t_fresh" env OPSRUN_KEEP_COPIES=0 "$opsrun" deploy --repo "$repo" --all --jobs 1
done
a1=$(median < "$work/t_ops1"); a8=$(median < "$work/t_ops8"); ad=$(median < "$work/t_opsd"); b=$(median < "$work/t_sh")
fl=$(median < "$work/t_floor"); sm=$(median < "$work/t_fresh")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
r1=$(ratio "$a1" "$b"); r8=$(ratio "$a8" "$b"); rd=$(ratio "$ad" "$b"); rf=$(ratio "$fl" "$b")
echo "no-op tools: whole-process wall time, median of $rounds runs each"
awk -v a="$a1" -v c="$a8" -v d="$ad" -v b="$b" -v f="$fl" -v n="$ncmd" -v j="$jobs" 'BEGIN {
  printf "  opsrun deploy --all --jobs 1   %8.1f ms  (%.2f ms per command)\n", a * 1000, a * 1000 / n
  printf "  sh, the same commands          %8.1f ms  (%.2f ms per command)\n", b * 1000, b * 1000 / n
  printf "  opsrun deploy --all (jobs 4)   %8.1f ms  (the default)\n", d * 1000
  printf "  opsrun deploy --all --jobs %-3d %8.1f ms\n", j, c * 1000
  printf "  the same commands, bare opsrun %8.1f ms  (bench/deploy_floor.lua: no engine)\n", f * 1000}'
awk -v s="$sm" 'BEGIN {printf "  --jobs 1, copying afresh       %8.1f ms  (OPSRUN_KEEP_COPIES=0)\n", s * 1000}'
echo "  ratio opsrun --jobs 1 / sh: $r1   (target <= 1.2: $(verdict "$r1" 1.2))"
echo "  ratio opsrun (default --jobs 4) / sh: $rd"
echo "  ratio opsrun --jobs $jobs / sh: $r8"
echo "  ratio bare opsrun / sh: $rf   (the runtime's floor)"
echo "  ratio --jobs 1 copying afresh / sh: $(ratio "$sm" "$b")"
echo

# ---- 2. tools that sleep ----
ideal=$("$opsrun" "$here/deploy_ideal.lua" "$repo" "$jobs" "$sleep_s")
bound=$(echo "$ideal" | sed -n 's/^bound=//p'); engine=$(echo "$ideal" | sed -n 's/^engine_ideal=//p')
chain=$(echo "$ideal" | sed -n 's/^longest_chain=//p')
t0=$EPOCHREALTIME
BENCH_SLEEP="$sleep_s" "$opsrun" deploy --repo "$repo" --all --jobs "$jobs" > /dev/null 2>&1
t1=$EPOCHREALTIME
w=$(elapsed "$t0" "$t1")
re=$(awk -v a="$w" -v b="$engine" 'BEGIN {printf "%.3f", a / b}')
rb=$(awk -v a="$w" -v b="$bound" 'BEGIN {printf "%.3f", a / b}')
echo "tools whose deploying command sleeps ${sleep_s}s (one per step), --jobs $jobs"
echo "  graph: $((envs * 4)) steps in $envs chains of $chain (the steps of an environment run in order)"
echo "  lower bound max(ceil(steps/$jobs), chain) x ${sleep_s}s:         ${bound} s"
echo "  the engine's schedule (longest chain first, $jobs at a time): ${engine} s"
awk -v w="$w" 'BEGIN {printf "  opsrun deploy --all --jobs '"$jobs"'                      %.2f s\n", w}'
echo "  ratio to the engine's ideal: $re   (target <= 1.10: $(verdict "$re" 1.10))"
echo "  ratio to the lower bound:    $rb"
echo
echo "summary: no-op $r1 x sh (--jobs 1), $rd x sh (default jobs); sleeping tools ${re} x the engine's ideal ($engine s), ${rb} x the bound ($bound s)"
