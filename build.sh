#!/usr/bin/env bash
# Installs what opsrun needs (Debian packages), then builds build/opsrun.
#   ./build.sh [extra cmake options]
set -euo pipefail
cd "$(dirname "$0")"
build-aux/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build build -j"$(nproc)" --target opsrun
echo "built $(pwd)/build/opsrun" >&2
