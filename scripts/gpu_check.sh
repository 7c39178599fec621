#!/usr/bin/env bash
# On a GPU machine: build, run the whole test suite (CUDA tests included), train the default
# config on the GPU and on the CPU and compare their losses, export the GPU run and check it with
# Hugging Face transformers, and run the benchmarks. Logs go to $OUT (default /tmp/ssd_gpu).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-/tmp/ssd_gpu}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export SSD_BUILD_DIR="$root/build-gpu"
bin="$SSD_BUILD_DIR/ssdtrain"
step() { echo; echo "=== $* ==="; }

step build
scripts/build.sh > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

step ctest
(cd "$SSD_BUILD_DIR" && ctest --output-on-failure -j 8 > "$OUT/ctest.log" 2>&1); echo "ctest rc=$?"
grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/ctest.log" | tail -15

step "default config on the GPU (scripts/run.sh's job)"
rm -rf /tmp/ssd_gpu_run
( time "$bin" train --set run.dir=/tmp/ssd_gpu_run ) > "$OUT/train_gpu.log" 2>&1; echo "gpu rc=$?"
head -3 "$OUT/train_gpu.log"; tail -8 "$OUT/train_gpu.log"

step "export + transformers check"
ck=$(ls /tmp/ssd_gpu_run/checkpoints/*.h5 | tail -1)
"$bin" export --checkpoint "$ck" --out /tmp/ssd_export --with-reference && \
  python3 scripts/check_hf_export.py /tmp/ssd_export 2>&1 | tail -5
"$bin" export --checkpoint "$ck" --out /tmp/ssd_export_bf16 --dtype bf16 --with-reference && \
  python3 scripts/check_hf_export.py /tmp/ssd_export_bf16 2>&1 | tail -3

step "bench ssd (issue #3 shapes: batch seqlen heads)"
for shape in "8 2048 48" "4 4096 64" "4 4096 80" "1 32768 64"; do
  set -- $shape
  "$bin" bench ssd --batch $1 --seqlen $2 --heads $3 --headdim 64 --groups 1 --dstate 128 --chunk 256 \
    > "$OUT/bench_ssd_$1_$2_$3.log" 2>&1
  echo "b=$1 L=$2 h=$3: $(grep -E 'median' "$OUT/bench_ssd_$1_$2_$3.log" | tr -s ' ' | paste -sd' ')"
done
cat "$OUT/bench_ssd_8_2048_48.log"
for m in 130m 370m 780m 1.3b 2.7b; do
  step "bench train $m (per-op table in $OUT/bench_train_$m.log)"
  "$bin" bench train --config configs/mamba2-$m.yaml --steps "${BENCH_STEPS:-5}" --breakdown \
    > "$OUT/bench_train_$m.log" 2>&1
  grep -E "^(bench train|step median|mean loss)" "$OUT/bench_train_$m.log"
done
cat "$OUT/bench_train_130m.log"
step "bench train 1.3b with activation recomputation (train.recompute=layers)"
"$bin" bench train --config configs/mamba2-1.3b.yaml --steps "${BENCH_STEPS:-5}" \
  --set train.recompute=layers 2>&1 | tail -2
