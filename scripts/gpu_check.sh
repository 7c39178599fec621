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

step "default config, GPU vs CPU (200 steps)"
rm -rf /tmp/ssd_gpu_run /tmp/ssd_cpu_run
"$bin" train --set run.dir=/tmp/ssd_gpu_run --set train.max_steps=200 --set checkpoint.every=0 > "$OUT/train_gpu.log" 2>&1; echo "gpu rc=$?"
"$bin" train --set run.dir=/tmp/ssd_cpu_run --set train.max_steps=200 --set checkpoint.every=0 --set train.device=cpu > "$OUT/train_cpu.log" 2>&1; echo "cpu rc=$?"
head -3 "$OUT/train_gpu.log"; tail -3 "$OUT/train_gpu.log"
python3 - <<'PY'
import json
def losses(p): return {d["step"]: d["loss"] for d in map(json.loads, open(p)) if "loss" in d}
g, c = losses("/tmp/ssd_gpu_run/metrics.jsonl"), losses("/tmp/ssd_cpu_run/metrics.jsonl")
for s in sorted(g):
    print(f"step {s:4d}  gpu {g[s]:.4f}  cpu {c.get(s, float('nan')):.4f}  diff {g[s]-c.get(s, float('nan')):+.4f}")
PY

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
for m in 130m 370m; do
  step "bench train $m"
  "$bin" bench train --config configs/mamba2-$m.yaml --steps 5 2>&1 | tail -2
done
