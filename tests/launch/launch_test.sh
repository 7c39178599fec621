#!/usr/bin/env bash
# Launch-level checks of a multi-process job (CPU, mpirun), each a ctest case:
#   bad_layout  - a layout the world does not divide fails on every rank: one message, non-zero
#                 exit, no run directory
#   kill_rank   - kill -9 of one rank during training: the job ends non-zero within 60 s with a
#                 message naming the rank
#   stop_rank   - a rank stopped (SIGSTOP) mid-training: the others' watchdog ends the job within
#                 parallel.timeout_s plus a margin, naming the stuck operation
# Usage: launch_test.sh CASE path/to/ssdtrain
# LAUNCH_DEVICE=cuda runs the job on GPUs (scripts/gpu_multi_check.sh), else CPU; LAUNCH_COMM
# sets parallel.comm (mpi: ranks sharing one GPU).
set -u
case_name=$1
bin=$2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
work=$(mktemp -d /tmp/ssdtrain_launch.XXXXXX)
trap 'pkill -KILL -f "$work" 2>/dev/null; rm -rf "$work"' EXIT
if [ "${LAUNCH_DEVICE:-cpu}" = cuda ]; then  # the default model: a shape the CUDA kernels take
  tiny=(--set train.device=cuda --set run.log_every=1 --set checkpoint.every=0
        --set parallel.comm="${LAUNCH_COMM:-auto}")
else
  tiny=(--set train.device=cpu --set model.d_model=32 --set model.n_layer=1 --set train.seq_len=64
        --set train.micro_batch=4 --set run.log_every=1 --set checkpoint.every=0)
fi
die() { echo "FAIL: $*"; exit 1; }

# The PID of world rank $1 among the job's processes (its environment names the rank).
rank_pid() {
  for p in $(pgrep -f "$work/run"); do
    if tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1"; then
      echo "$p"; return 0
    fi
  done
  return 1
}

# Starts a long training job in the background; waits until it has logged a few steps.
start_job() {
  mpirun --oversubscribe -np 2 "$bin" train "${tiny[@]}" --set train.max_steps=1000000 \
    --set run.dir="$work/run" "$@" > "$work/out.txt" 2>&1 &
  job=$!
  for _ in $(seq 1 600); do
    [ -f "$work/run/metrics.jsonl" ] && [ "$(wc -l < "$work/run/metrics.jsonl")" -ge 3 ] && return 0
    kill -0 $job 2>/dev/null || { cat "$work/out.txt"; die "the job ended before training"; }
    sleep 0.1
  done
  die "no training progress after 60 s"
}

# Waits up to $1 s for the job to end; sets rc and elapsed.
wait_job() {
  local t0=$SECONDS
  while kill -0 $job 2>/dev/null; do
    [ $((SECONDS - t0)) -gt "$1" ] && { kill -KILL $job; cat "$work/out.txt"; die "job still running after $1 s"; }
    sleep 0.2
  done
  wait $job; rc=$?
  elapsed=$((SECONDS - t0))
}

case "$case_name" in
  bad_layout)
    mpirun --oversubscribe -np 3 "$bin" train "${tiny[@]}" --set parallel.tp=2 \
      --set run.dir="$work/run" > "$work/out.txt" 2>&1
    rc=$?
    cat "$work/out.txt"
    [ $rc -ne 0 ] || die "exit code 0"
    n=$(grep -c "parallel.tp \* parallel.cp = 2 \* 1 = 2 does not divide" "$work/out.txt")
    [ "$n" -eq 1 ] || die "expected the layout message once, got it $n times"
    [ ! -e "$work/run" ] || die "a run directory was left behind"
    ;;
  kill_rank)
    start_job --set parallel.timeout_s=30
    pid=$(rank_pid 1) || die "rank 1 not found"
    kill -KILL "$pid"
    wait_job 60
    grep -v "^step" "$work/out.txt" | tail -30
    [ $rc -ne 0 ] || die "exit code 0 after a rank was killed"
    grep -q "rank 1" "$work/out.txt" || die "no message names rank 1"
    echo "job ended $elapsed s after kill -9 of rank 1, exit code $rc"
    ;;
  stop_rank)
    start_job --set parallel.timeout_s=5
    pid=$(rank_pid 1) || die "rank 1 not found"
    kill -STOP "$pid"
    wait_job 60
    kill -KILL "$pid" 2>/dev/null
    grep -v "^step" "$work/out.txt" | tail -30
    [ $rc -ne 0 ] || die "exit code 0 after a rank was stopped"
    grep -q "rank 0 (host .*): .* on group .* has not finished after" "$work/out.txt" ||
      die "no watchdog message from rank 0 naming the operation"
    echo "job ended $elapsed s after SIGSTOP of rank 1 (timeout 5 s), exit code $rc"
    ;;
  *) die "unknown case $case_name" ;;
esac
echo "PASS: $case_name"
