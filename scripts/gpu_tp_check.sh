#!/usr/bin/env bash
# On a one-GPU machine: tensor parallelism and packed-document data on the CUDA backend. Builds,
# runs the GPU-dependent tests (the CUDA op and model suites, the layouts over MPI with ranks
# sharing the GPU: dp, cp and tp), then
#  1. per-rank parameter, gradient and optimizer memory of 2.7B at tp=1 and at tp=2 (two
#     processes sharing the GPU over MPI);
#  2. 130m training speed with the indexed (Megatron .bin/.idx) loader against synthetic MQAR.
# Logs go to $OUT (default /tmp/ssd_gpu_tp).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-/tmp/ssd_gpu_tp}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export SSD_BUILD_DIR="${SSD_BUILD_DIR:-$root/build-gpu}"
bin="$SSD_BUILD_DIR/ssdtrain"
step() { echo; echo "=== $* ==="; }

# SKIP_BUILD=1: a build that is there already, no tests; SKIP_2P7B=1: no 2.7b runs;
# IDX=PREFIX: an indexed dataset made elsewhere (this machine's build may lack PCRE2, which the
# fixture tokenizer's split pattern needs).
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step build
  scripts/build.sh > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  step "ctest (GPU-dependent tests)"
  (cd "$SSD_BUILD_DIR" && timeout 300 ctest --output-on-failure -j 8 -R "${TESTS:-Cuda|cuda|mpitest|TpOps}" \
    > "$OUT/ctest.log" 2>&1); echo "ctest rc=$?"
  grep -E "tests passed|tests failed|\(Failed\)|\*\*\*Failed|Timeout" "$OUT/ctest.log" | tail -15
fi
step "the layouts on the GPU (ranks sharing it over MPI) against the one-process CPU reference"
timeout 200 mpirun --oversubscribe -np 4 "$SSD_BUILD_DIR/mpitest_cuda_layouts" 2>&1 | grep -E "^np=|OK|FAILED"

[ "${SKIP_2P7B:-0}" = 1 ] || {
step "2.7b memory per rank: tp=1 vs tp=2 (two processes sharing the GPU, parallel.comm=mpi)"
m=(--config configs/mamba2-2.7b.yaml --steps 2 --set train.micro_batch=1 --set train.seq_len=2048)
timeout 120 "$bin" bench train "${m[@]}" > "$OUT/b27_tp1.log" 2>&1
grep -E "^(bench train|AdamW|step median)" "$OUT/b27_tp1.log"
timeout 200 mpirun --oversubscribe -np 2 "$bin" bench train "${m[@]}" --set parallel.tp=2 \
  --set parallel.comm=mpi > "$OUT/b27_tp2.log" 2>&1 || tail -5 "$OUT/b27_tp2.log"
grep -E "^(bench train|AdamW|tensor parallel|collectives|step median)" "$OUT/b27_tp2.log"
}

step "130m: indexed loader vs synthetic MQAR (tokens/s of steps 21-40 and 41-60)"
idx="${IDX:-/tmp/ssd_idx/repo}"
if [ -z "${IDX:-}" ]; then
  mkdir -p /tmp/ssd_idx
  "$bin" tokenize --tokenizer data/fixtures/tokenizer.json --input src docs README.md \
    --out "$idx" 2>&1 | tail -1
fi
for rep in 1 2; do
  for kind in mqar indexed; do
    extra=()
    [ $kind = indexed ] && extra=(--set data.kind=indexed --set data.path=$idx
                                  --set data.val_fraction=0.02)
    rm -rf /tmp/s130_$kind
    timeout 120 "$bin" train --config configs/mamba2-130m.yaml --set train.max_steps=60 \
      --set run.log_every=20 --set run.eval_every=0 --set checkpoint.every=0 \
      --set run.dir=/tmp/s130_$kind "${extra[@]}" > "$OUT/s130_${kind}_$rep.log" 2>&1 ||
      tail -5 "$OUT/s130_${kind}_$rep.log"
    echo "$kind rep $rep: $(grep -E '^step +(40|60)/' "$OUT/s130_${kind}_$rep.log" | sed 's/.*| \([0-9.KM]*\) tok\/s.*/\1/' | paste -sd' ')"
  done
done
