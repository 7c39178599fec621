#!/usr/bin/env bash
# Configures and builds ssdtrain (Release) into build/. CUDA is built when nvcc is found
# (SSD_WITH_CUDA=AUTO); override with SSD_WITH_CUDA=ON|OFF in the environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${SSD_BUILD_DIR:-$root/build}"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DSSD_WITH_CUDA="${SSD_WITH_CUDA:-AUTO}"
fi
cmake --build "$build" -j "$(nproc)"
