#!/usr/bin/env bash
# Builds the request-path fuzz target with clang (libFuzzer + ASan + UBSan) and runs it for a
# bounded time: FUZZ_SECONDS (default 30). New inputs go to a scratch corpus, not this tree.
#   tests/fuzz/run.sh            # 30 s
#   FUZZ_SECONDS=600 tests/fuzz/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${FUZZ_BUILD_DIR:-/tmp/opsrun-fuzz-http}"
seconds="${FUZZ_SECONDS:-30}"
mkdir -p "$out/corpus"
command -v clang >/dev/null || { echo "clang is needed (apt-get install -y clang)" >&2; exit 2; }

# sched.c gives the host functions http_server.c calls (the fuzzed path never reaches them)
clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Wall -Wextra \
  -I"$root/runtime" $(pkg-config --cflags lua5.4 libuv libh2o) \
  "$here/fuzz_http_request.c" "$root/runtime/sched.c" \
  $(pkg-config --libs lua5.4 libuv libh2o) -lm -ldl \
  -o "$out/fuzz_http_request"

cp -n "$here"/corpus/* "$out/corpus/" 2>/dev/null || true
export ASAN_OPTIONS="detect_leaks=1:${ASAN_OPTIONS:-}"
"$out/fuzz_http_request" -max_total_time="$seconds" -max_len=20000 -timeout=10 \
  "$out/corpus" "$here/corpus"
