#!/usr/bin/env bash
# Installs the Debian packages opsrun builds and tests with, if any is missing.
# Runs apt-get as root (or through sudo); does nothing when all are there.
set -euo pipefail

packages=(
  # build
  build-essential cmake pkg-config
  liblua5.4-dev libuv1-dev libyaml-dev lua-cjson-dev libcurl4-openssl-dev libssl-dev
  libsqlite3-dev libh2o-dev libsimdjson-dev libcmocka-dev
  # run and test
  git bash curl ca-certificates python3 lua-busted ansible-core sqlite3 procps
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null; then
  sudo=(sudo)
else
  echo "install-deps: missing packages (${missing[*]}); run as root or install sudo" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
