#!/usr/bin/env bash
# Runs every test twice, from scratch: a normal build, then an AddressSanitizer +
# UndefinedBehaviorSanitizer build. Both with -Wall -Wextra -Werror. Installs what it
# needs first (Debian packages).
#   ./test.sh            everything
#   ./test.sh -R proc    only the ctest tests whose name matches
set -euo pipefail
cd "$(dirname "$0")"
build-aux/install-deps.sh
jobs=$(nproc)
for variant in normal sanitize; do
  dir=build-test/$variant
  rm -rf "$dir"
  flags=(-DOPSRUN_WERROR=ON)
  if [ $variant = sanitize ]; then
    flags+=(-DOPSRUN_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug)
  fi
  echo "== $variant build" >&2
  cmake -S . -B "$dir" "${flags[@]}" >/dev/null
  cmake --build "$dir" -j"$jobs"
  echo "== $variant tests" >&2
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" "$@"
done
echo "all tests passed (normal and sanitizer builds)" >&2
