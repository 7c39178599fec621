#!/usr/bin/env bash
# The main job: installs what is missing, builds, and trains. With no arguments it trains the
# built-in default config (configs/default.yaml: a tiny Mamba-2 on synthetic recall data, under two
# minutes on 2 CPU cores; on the GPU when there is one). Arguments go to `ssdtrain train`, e.g.
#   scripts/run.sh --config configs/mamba2-130m.yaml --set train.max_steps=1000
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/deps.sh"
"$root/scripts/build.sh" >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
cd "$root"
exec "${SSD_BUILD_DIR:-$root/build}/ssdtrain" train "$@"
