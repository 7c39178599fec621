#!/usr/bin/env bash
# Installs the Debian packages in scripts/packages.txt that are missing, and nothing else.
# Where everything is present (or there is no package registry, as on the GPU machines, whose
# image ships the libraries), it installs nothing and the build goes ahead.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mapfile -t wanted < <(grep -v '^\s*#' "$here/packages.txt" | grep -v '^\s*$')

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "deps: missing packages: ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "deps: no apt-get here; continuing (CMake will name anything that is really absent)"
  exit 0
fi
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
if $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
  echo "deps: installed ${missing[*]}"
else
  # The GPU machine has the libraries but no registry: do not stop here, let CMake decide.
  echo "deps: could not install ${missing[*]}; continuing (CMake will name anything really absent)"
fi
