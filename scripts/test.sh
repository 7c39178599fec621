#!/usr/bin/env bash
# The test command: installs what is missing, builds everything (CUDA code too when nvcc is
# there), runs the whole ctest suite. CUDA tests skip themselves on machines without a GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/deps.sh"
"$root/scripts/build.sh"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
cd "${SSD_BUILD_DIR:-$root/build}"
ctest --output-on-failure -j "$(nproc)" "$@"
