#!/usr/bin/env bash
# On a machine with several GPUs (one rank per GPU, NCCL): the runs the multi-GPU records in
# docs/performance.md need. With N GPUs (nvidia-smi -L), N >= 2:
#  1. correctness: dp=2, tp=2 and cp=2 against one GPU, 50 steps of the default config at the
#     same global batch; a checkpoint of the dp=2 run resumed on one GPU against the
#     uninterrupted one-GPU run;
#  2. data-parallel weak scaling 1 -> 2 (-> 4 -> 8 as N allows) for 370m and 1.3b, zero 0 and
#     1: tokens/s, efficiency against N x one GPU, and how long each step waits after the
#     backward for the gradient reductions;
#  3. tensor parallelism for 2.7b: tp=1 against tp=2 (and 4, 8): tokens/s, peak memory per GPU,
#     the bytes of each collective per step and their time (per call: a layer's all-reduce);
#  4. context parallelism for 1.3b: the longest sequence of those tried that one GPU trains,
#     then cp=2 (4, 8) at it and at cp times it, both combines (allgather, ring), against one
#     GPU at the same tokens per GPU;
#  N >= 4 also: a model no one GPU holds (d_model 4096, 64 layers) at tp=4 and 8 (tokens/s,
#     memory, 20-step losses tp=8 against tp=4), and 1.3b at 131072 and 524288 tokens per
#     sequence at cp=4 and 8 against one GPU at the same tokens per GPU (recomputation on);
#  5. N >= 8: dp x tp x cp = 2 x 2 x 2 against one GPU;
#  6. kill -9 of a rank during a 2-GPU run: the job ends within 60 s, naming the rank.
# SMOKE=1 runs the same flow on one GPU shared by the ranks over MPI (parallel.comm=mpi) with
# small models and few steps: a check of this script, not a measurement. SKIP_BUILD=1 uses the
# build that is there. Logs go to $OUT (default /tmp/ssd_gpu_multi).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-/tmp/ssd_gpu_multi}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export SSD_BUILD_DIR="${SSD_BUILD_DIR:-$root/build-gpu}"
bin="$SSD_BUILD_DIR/ssdtrain"
step() { echo; echo "=== $* ==="; }
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
smoke="${SMOKE:-0}"
if [ "$smoke" = 1 ]; then
  comm=(--set parallel.comm=mpi); maxrank=4
else
  [ "$ngpu" -ge 2 ] || { echo "gpu_multi_check: $ngpu GPU(s); it needs 2 or more (or SMOKE=1)"; exit 1; }
  comm=(--set parallel.comm=nccl); maxrank=$ngpu
fi
mpi() { local n=$1; shift; mpirun --oversubscribe --bind-to none -np "$n" "$@"; }
# losses of a run directory as "step loss" lines
losses() { grep -o '"step": [0-9]*, "loss": [0-9.e+-]*' "$1/metrics.jsonl" | awk '{print $2, $4}' | tr -d ,; }
# largest relative loss difference of run $1 against run $2 over the steps both logged in
# [$4, $5] (default: all)
compare() {
  join <(losses "$1" | sort -k1,1) <(losses "$2" | sort -k1,1) | sort -n |
    awk -v what="$3" -v lo="${4:-0}" -v hi="${5:-1e18}" '
      $1 >= lo && $1 <= hi { d = ($2 - $3) / $3; if (d < 0) d = -d; if (d > m) m = d; n++ }
      END { printf "%s: %d steps, largest relative loss difference %.3e\n", what, n, m }'
}
field() { grep -E "^step median" "$1" | sed -n "s/.*| \([0-9]*\) tokens\/s.*/\1/p"; }
peak() { grep -E "^step median" "$1" | sed -n 's/.*peak tensor memory \([0-9.]*\) GiB.*/\1/p'; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step build
  scripts/build.sh > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -12

step "1. correctness: dp=2, tp=2, cp=2 against one GPU (default config, 50 steps, global batch 32)"
[ "$smoke" = 1 ] && n=10 || n=50
g=(--set train.max_steps=$n --set run.log_every=1 --set checkpoint.every=0 --set train.micro_batch=16
   --set train.global_batch=32 --set model.chunk_size=32)
rm -rf /tmp/smg_*
"$bin" train "${g[@]}" --set run.dir=/tmp/smg_one > "$OUT/c_one.log" 2>&1 || tail -5 "$OUT/c_one.log"
for v in "dp2" "tp2 --set parallel.tp=2" "cp2 --set parallel.cp=2"; do
  set -- $v; name=$1; shift
  mpi 2 "$bin" train "${g[@]}" "${comm[@]}" "$@" --set run.dir=/tmp/smg_$name > "$OUT/c_$name.log" 2>&1 ||
    { echo "$name failed"; tail -20 "$OUT/c_$name.log"; }
  grep -E "^layout" "$OUT/c_$name.log" | head -1
  compare /tmp/smg_$name /tmp/smg_one "$name vs one GPU"
done
half=$((n / 2))
mpi 2 "$bin" train "${g[@]}" "${comm[@]}" --set train.stop_after=$half --set checkpoint.every=$half \
  --set run.dir=/tmp/smg_resume > "$OUT/c_resume_a.log" 2>&1 || tail -20 "$OUT/c_resume_a.log"
"$bin" train "${g[@]}" --set checkpoint.every=$half --set run.dir=/tmp/smg_resume \
  > "$OUT/c_resume_b.log" 2>&1 || tail -20 "$OUT/c_resume_b.log"
grep -iE "resum" "$OUT/c_resume_b.log" | head -2
compare /tmp/smg_resume /tmp/smg_one "dp=2 checkpoint resumed on one GPU, steps $((half + 1))-$n" $((half + 1)) $n

step "2. data-parallel weak scaling (same micro-batch per GPU; tokens/s of all ranks)"
# SMOKE: the built-in default model (small: the ranks' gradients are staged through host memory)
if [ "$smoke" = 1 ]; then models="default"; scale="2"; bsteps=2; else models="mamba2-370m mamba2-1.3b"; scale="2 4 8"; bsteps=10; fi
for m in $models; do
  "$bin" bench train --config configs/$m.yaml --steps $bsteps > "$OUT/dp_${m}_1.log" 2>&1
  one=$(field "$OUT/dp_${m}_1.log")
  echo "$m, 1 GPU: $one tokens/s"
  for k in $scale; do
    [ "$k" -le "$maxrank" ] || continue
    for z in 0 1; do
      f="$OUT/dp_${m}_${k}_z$z.log"
      mpi "$k" "$bin" bench train --config configs/$m.yaml --steps $bsteps "${comm[@]}" \
        --set parallel.zero=$z > "$f" 2>&1 || { echo "$m dp=$k zero=$z failed"; tail -5 "$f"; continue; }
      tok=$(field "$f")
      eff=$(awk -v a="$tok" -v b="$one" -v k="$k" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / (k * b) }')
      echo "$m, dp=$k zero=$z: $tok tokens/s, efficiency ${eff}% | $(grep -E '^gradient reductions' "$f" | sed 's/gradient reductions: after the backward, a step //')"
      grep -E "^(AdamW|time in collectives)" "$f"
    done
  done
done

step "3. tensor parallelism, 2.7b (micro-batch 1 x 2048): tp=1 against tp=2 (4, 8)"
if [ "$smoke" = 1 ]; then tcfg=configs/default.yaml; tps="2"; else tcfg=configs/mamba2-2.7b.yaml; tps="2 4 8"; fi
t=(--config $tcfg --steps $bsteps --set train.micro_batch=1 --set train.seq_len=2048)
"$bin" bench train "${t[@]}" > "$OUT/tp_1.log" 2>&1 || tail -5 "$OUT/tp_1.log"
echo "tp=1: $(field "$OUT/tp_1.log") tokens/s, peak $(peak "$OUT/tp_1.log") GiB"
for k in $tps; do
  [ "$k" -le "$maxrank" ] || continue
  mpi "$k" "$bin" bench train "${t[@]}" "${comm[@]}" --set parallel.tp=$k > "$OUT/tp_$k.log" 2>&1 ||
    { echo "tp=$k failed"; tail -5 "$OUT/tp_$k.log"; continue; }
  echo "tp=$k: $(field "$OUT/tp_$k.log") tokens/s, peak $(peak "$OUT/tp_$k.log") GiB per GPU"
  grep -E "^(tensor parallel|collectives per step|time in collectives)" "$OUT/tp_$k.log"
done

if [ "$maxrank" -ge 4 ] && [ "$smoke" != 1 ]; then
  step "3b. a model no one GPU holds (2.7b's shape at d_model 4096, 64 layers): tp=4 and tp=8"
  big=(--config configs/mamba2-2.7b.yaml --set model.d_model=4096 --set model.n_layer=64
       --set train.micro_batch=1 --set train.seq_len=2048)
  for k in 4 8; do
    [ "$k" -le "$maxrank" ] || continue
    mpi "$k" "$bin" bench train "${big[@]}" --steps $bsteps "${comm[@]}" --set parallel.tp=$k \
      > "$OUT/big_tp$k.log" 2>&1 || { echo "big tp=$k failed"; tail -5 "$OUT/big_tp$k.log"; continue; }
    echo "big tp=$k: $(field "$OUT/big_tp$k.log") tokens/s, peak $(peak "$OUT/big_tp$k.log") GiB per GPU"
    grep -E "^(bench train|tensor parallel|time in collectives.*, tp:)" "$OUT/big_tp$k.log"
    rm -rf /tmp/smg_big$k
    mpi "$k" "$bin" train "${big[@]}" "${comm[@]}" --set parallel.tp=$k --set train.max_steps=20 \
      --set run.log_every=1 --set checkpoint.every=0 --set run.dir=/tmp/smg_big$k > "$OUT/big_train$k.log" 2>&1 ||
      { echo "big tp=$k training failed"; tail -5 "$OUT/big_train$k.log"; }
  done
  [ -d /tmp/smg_big8 ] && compare /tmp/smg_big8 /tmp/smg_big4 "big model, tp=8 vs tp=4, 20 steps"
fi

step "4. context parallelism, 1.3b (micro-batch 1): cp against one GPU at the same tokens per GPU"
if [ "$smoke" = 1 ]; then ccfg=configs/default.yaml; tries="2048 4096"; cps="2";
else ccfg=configs/mamba2-1.3b.yaml; tries="16384 24576 32768"; cps="2 4 8"; fi
c=(--config $ccfg --steps $bsteps --set train.micro_batch=1)
longest=0
for L in $tries; do
  "$bin" bench train "${c[@]}" --set train.seq_len=$L > "$OUT/cp_1_$L.log" 2>&1 || break
  longest=$L
  echo "cp=1 L=$L: $(field "$OUT/cp_1_$L.log") tokens/s, peak $(peak "$OUT/cp_1_$L.log") GiB"
done
echo "longest sequence of those tried that one GPU trains: $longest"
for k in $cps; do
  [ "$k" -le "$maxrank" ] && [ "$longest" -gt 0 ] || continue
  for L in $longest $((k * longest)); do
    per=$((L / k))
    [ -f "$OUT/cp_1_$per.log" ] || "$bin" bench train "${c[@]}" --set train.seq_len=$per > "$OUT/cp_1_$per.log" 2>&1
    one=$(field "$OUT/cp_1_$per.log")
    for comb in allgather ring; do
      f="$OUT/cp_${k}_${L}_$comb.log"
      mpi "$k" "$bin" bench train "${c[@]}" "${comm[@]}" --set train.seq_len=$L --set parallel.cp=$k \
        --set parallel.cp_combine=$comb > "$f" 2>&1 || { echo "cp=$k L=$L $comb failed"; tail -5 "$f"; continue; }
      tok=$(field "$f")
      echo "cp=$k L=$L $comb: $tok tokens/s ($(awk -v a="$tok" -v b="$one" -v k="$k" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / (k * b) }')% per GPU of one GPU at $per: $one), peak $(peak "$f") GiB per GPU"
      grep -E "^(context parallel|parallel.cp_combine|time in collectives.*, cp:)" "$f"
    done
  done
done

if [ "$maxrank" -ge 4 ] && [ "$smoke" != 1 ]; then
  step "4b. long sequences, 1.3b with recomputation: cp=4 and cp=8 at 131072 and 524288 tokens"
  r=(--config configs/mamba2-1.3b.yaml --steps $bsteps --set train.micro_batch=1 --set train.recompute=layers)
  for k in 4 8; do
    [ "$k" -le "$maxrank" ] || continue
    for L in 131072 524288; do
      per=$((L / k))
      [ -f "$OUT/long_1_$per.log" ] || "$bin" bench train "${r[@]}" --set train.seq_len=$per > "$OUT/long_1_$per.log" 2>&1
      one=$(field "$OUT/long_1_$per.log")
      f="$OUT/long_${k}_$L.log"
      mpi "$k" "$bin" bench train "${r[@]}" "${comm[@]}" --set train.seq_len=$L --set parallel.cp=$k \
        > "$f" 2>&1 || { echo "cp=$k L=$L failed (the longest that trains is below it)"; tail -3 "$f"; continue; }
      tok=$(field "$f")
      echo "cp=$k L=$L: $tok tokens/s ($(awk -v a="$tok" -v b="$one" -v k="$k" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / (k * b) }')% per GPU of one GPU at $per: ${one:-did not run}), peak $(peak "$f") GiB per GPU"
    done
  done
fi

if [ "$maxrank" -ge 8 ]; then
  step "5. dp x tp x cp = 2 x 2 x 2 against one GPU"
  mpi 8 "$bin" train "${g[@]}" "${comm[@]}" --set parallel.tp=2 --set parallel.cp=2 \
    --set run.dir=/tmp/smg_222 > "$OUT/c_222.log" 2>&1 || tail -20 "$OUT/c_222.log"
  compare /tmp/smg_222 /tmp/smg_one "dp2 x tp2 x cp2 vs one GPU"
fi

step "6. kill -9 of rank 1 during a 2-rank GPU run"
LAUNCH_DEVICE=cuda LAUNCH_COMM="${comm[1]#parallel.comm=}" bash tests/launch/launch_test.sh kill_rank "$bin" 2>&1 | tail -3
