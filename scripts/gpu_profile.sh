#!/usr/bin/env bash
# On a GPU machine with Nsight Compute: hardware-counter profiles of the SSD kernels at one
# shape (default: issue #3's first shape), one launch each. The whole report goes to
# $OUT/ncu_ssd.txt; the main lines are printed. Needs a built build-gpu/ (scripts/gpu_check.sh).
#   scripts/gpu_profile.sh [kernel-regex] [bench ssd flags...]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/ssd_gpu}"
mkdir -p "$OUT"
bin="${SSD_BUILD_DIR:-$root/build-gpu}/ssdtrain"
regex="${1:-chunk_scan_fwd|chunk_scan_bwd_dx|chunk_bwd_dbdc_v2_kernel|chunk_state_kernel}"
shift || true
ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
[ -x "$ncu" ] || { echo "ncu not found"; exit 1; }
"$ncu" --clock-control none -k "regex:$regex" -c 12 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis --section SchedulerStats --section ComputeWorkloadAnalysis \
  "$bin" bench ssd --iters 1 --warmup 1 "$@" > "$OUT/ncu_ssd.txt" 2>&1
echo "ncu rc=$?"
grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|L1/TEX Hit|L2 Hit|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Block Limit|Issued Warp Per Scheduler|No Eligible|Stall|Warp Cycles Per Issued" \
  "$OUT/ncu_ssd.txt" | head -150
