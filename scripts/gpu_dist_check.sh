#!/usr/bin/env bash
# On a one-GPU machine: the distributed code paths on the CUDA backend. Builds, runs the test
# suite, then
#  1. the NCCL path with a world of one (buckets, overlap, ZeRO-1) against the plain path: the
#     same losses, and the step time at 130m;
#  2. two processes sharing the GPU over the MPI communicator (parallel.comm=mpi, dp=2) against
#     one process at the same global batch (bf16 tolerance).
# Logs go to $OUT (default /tmp/ssd_gpu_dist).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-/tmp/ssd_gpu_dist}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export SSD_BUILD_DIR="${SSD_BUILD_DIR:-$root/build-gpu}"
bin="$SSD_BUILD_DIR/ssdtrain"
step() { echo; echo "=== $* ==="; }
losses() { grep -o '"step": [0-9]*, "loss": [0-9.e+-]*' "$1/metrics.jsonl" | awk '{print $4}'; }
compare() {  # compare two runs' loss columns: largest relative difference
  paste <(losses "$1") <(losses "$2") | awk -v what="$3" '
    { d = ($1 - $2) / $2; if (d < 0) d = -d; if (d > m) m = d; n++ }
    END { printf "%s: %d steps, largest relative loss difference %.3e\n", what, n, m }'
}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step build
  scripts/build.sh > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  step ctest
  (cd "$SSD_BUILD_DIR" && ctest --output-on-failure -j 8 > "$OUT/ctest.log" 2>&1); echo "ctest rc=$?"
  grep -E "tests passed|tests failed|\(Failed\)|\*\*\*Failed" "$OUT/ctest.log" | tail -15
fi

step "world of one: plain vs NCCL (zero 0, zero 1), default config, 200 steps"
common=(--set train.max_steps=200 --set run.log_every=1 --set checkpoint.every=0)
for v in "plain mpi 0" "nccl nccl 0" "nccl_z1 nccl 1"; do
  set -- $v
  rm -rf /tmp/sgd_$1
  "$bin" train "${common[@]}" --set parallel.comm=$2 --set parallel.zero=$3 \
    --set run.dir=/tmp/sgd_$1 > "$OUT/w1_$1.log" 2>&1 || { echo "$1 failed"; tail -5 "$OUT/w1_$1.log"; }
  grep -E "^layout|^ZeRO" "$OUT/w1_$1.log"; tail -1 "$OUT/w1_$1.log"
done
compare /tmp/sgd_nccl /tmp/sgd_plain "NCCL zero=0 vs plain"
compare /tmp/sgd_nccl_z1 /tmp/sgd_plain "NCCL zero=1 vs plain"

# QUICK=1: the correctness runs only (no 130m timings, no 1.3b memory runs).
[ "${QUICK:-0}" = 1 ] && reps="" || reps="1 2 3"
step "130m step time: plain vs NCCL zero 0 / zero 1 (tokens/s of steps 21-60, 3 runs each)"
for rep in $reps; do
  for v in "plain mpi 0" "nccl nccl 0" "nccl_z1 nccl 1"; do
    set -- $v
    rm -rf /tmp/s130_$1
    "$bin" train --config configs/mamba2-130m.yaml --set train.max_steps=60 --set run.log_every=20 \
      --set checkpoint.every=0 --set checkpoint.keep_last=1 --set parallel.comm=$2 --set parallel.zero=$3 \
      --set run.dir=/tmp/s130_$1 > "$OUT/s130_$1_$rep.log" 2>&1 || tail -5 "$OUT/s130_$1_$rep.log"
    echo "$1 rep $rep: $(grep -E '^step +(40|60)/' "$OUT/s130_$1_$rep.log" | sed 's/.*| \([0-9.KM]*\) tok\/s.*/\1/' | paste -sd' ')"
  done
done

step "two processes sharing the GPU (parallel.comm=mpi, dp=2) vs one process, global batch 32"
g=(--set train.max_steps=200 --set run.log_every=1 --set checkpoint.every=0 --set train.micro_batch=16
   --set train.global_batch=32)
rm -rf /tmp/sgd_one /tmp/sgd_dp2
"$bin" train "${g[@]}" --set run.dir=/tmp/sgd_one > "$OUT/one.log" 2>&1 || tail -5 "$OUT/one.log"
mpirun --oversubscribe -np 2 "$bin" train "${g[@]}" --set parallel.comm=mpi --set run.dir=/tmp/sgd_dp2 \
  > "$OUT/dp2.log" 2>&1 || tail -20 "$OUT/dp2.log"
grep -E "^grid|^layout" "$OUT/dp2.log"; tail -2 "$OUT/one.log"; tail -2 "$OUT/dp2.log"
compare /tmp/sgd_dp2 /tmp/sgd_one "dp=2 on one GPU (MPI) vs one process"
paste <(losses /tmp/sgd_dp2) <(losses /tmp/sgd_one) | sed -n '1,5p;50p;100p;200p'

step "context parallelism on one GPU: cp=2 as two processes (MPI) vs one process, 200 steps"
c=(--set train.max_steps=200 --set run.log_every=1 --set checkpoint.every=0 --set model.chunk_size=32)
rm -rf /tmp/scp_one /tmp/scp_cp2
"$bin" train "${c[@]}" --set run.dir=/tmp/scp_one > "$OUT/cp_one.log" 2>&1 || tail -5 "$OUT/cp_one.log"
mpirun --oversubscribe -np 2 "$bin" train "${c[@]}" --set parallel.cp=2 --set parallel.comm=mpi \
  --set run.dir=/tmp/scp_cp2 > "$OUT/cp2.log" 2>&1 || tail -20 "$OUT/cp2.log"
grep -E "^layout|^context" "$OUT/cp2.log"; tail -1 "$OUT/cp_one.log"; tail -1 "$OUT/cp2.log"
for n in 50 100 200; do
  paste <(losses /tmp/scp_cp2 | head -$n) <(losses /tmp/scp_one | head -$n) | awk -v n=$n '
    { d = ($1 - $2) / $2; if (d < 0) d = -d; if (d > m) m = d }
    END { printf "cp=2 vs one process, steps 1-%d: largest relative loss difference %.3e\n", n, m }'
done

step "1.3b at a long sequence: per-rank memory, cp=1 vs cp=2 (two processes sharing the GPU)"
[ "${QUICK:-0}" = 1 ] && lens="" || lens="16384"
for L in $lens; do
  "$bin" bench train --config configs/mamba2-1.3b.yaml --steps 2 --set train.seq_len=$L \
    --set train.micro_batch=1 > "$OUT/b13_cp1_$L.log" 2>&1
  echo "cp=1 L=$L: $(grep -E '^step median' "$OUT/b13_cp1_$L.log")"
  mpirun --oversubscribe -np 2 "$bin" bench train --config configs/mamba2-1.3b.yaml --steps 2 \
    --set train.seq_len=$L --set train.micro_batch=1 --set parallel.cp=2 --set parallel.comm=mpi \
    > "$OUT/b13_cp2_$L.log" 2>&1
  echo "cp=2 L=$L: $(grep -E '^(step median|context)' "$OUT/b13_cp2_$L.log" | paste -sd' ')"
done
