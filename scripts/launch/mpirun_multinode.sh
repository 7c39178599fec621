#!/usr/bin/env bash
# Example multi-node launcher: ssdtrain with one rank per GPU on every host of a hostfile.
#
#   scripts/launch/mpirun_multinode.sh HOSTFILE [ssdtrain train arguments...]
#   e.g. NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5 MPI_IF=ib0 \
#        scripts/launch/mpirun_multinode.sh hosts.txt --config configs/mamba2-1.3b.yaml \
#          --set train.global_batch=256 --set run.dir=/shared/runs/1.3b
#
# HOSTFILE: one line per node, `node01 slots=8` (slots = GPUs). Lines starting with # are skipped.
# ssdtrain picks its GPU from its local rank (ranks restart at 0 on each node), so nothing here
# sets CUDA_VISIBLE_DEVICES. run.dir must be on a filesystem every node sees: rank 0 writes the
# checkpoints, every rank reads them on resume.
#
# Environment (all optional):
#   GPUS_PER_NODE   ranks per node (default 8)
#   SSDTRAIN        the binary (default build/ssdtrain of this checkout; same path on every node)
#   MPI_IF          network OpenMPI uses between nodes, an interface or CIDR list
#                   (btl_tcp_if_include + oob_tcp_if_include), e.g. ib0, eth0, 10.1.0.0/16
#   PML             ob1 (default: TCP between nodes, shared memory inside) or ucx (InfiniBand)
#   BIND            none (default) or numa: ranks bound to the NUMA node of their GPU
#                   (--map-by ppr:GPUS_PER_NODE/NUMA_PER_NODE:numa; check `nvidia-smi topo -m`)
#   NUMA_PER_NODE   NUMA nodes per host for BIND=numa (default 2)
#   NCCL_*          every NCCL_ variable set here is forwarded to all ranks (-x). Usual ones:
#                   NCCL_SOCKET_IFNAME (bootstrap/socket interface, e.g. ib0 or ^lo,docker0),
#                   NCCL_IB_HCA (e.g. mlx5 or mlx5_0,mlx5_1), NCCL_DEBUG=WARN|INFO.
#                   NCCL_NVLS_ENABLE defaults to 0 here (NVLink SHARP off; set 1 to allow it).
#   KEEPALIVE_S     mpirun notices a node that stopped answering after about this long
#                   (OpenMPI's own default is ~8 minutes); default 60
#   MPIRUN_ARGS     extra mpirun arguments, word-split (e.g. "--mca plm_rsh_agent ...")
#   DRY_RUN=1       print the command instead of running it
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[ $# -ge 1 ] || { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 2; }
hostfile="$1"; shift
[ -r "$hostfile" ] || { echo "mpirun_multinode: cannot read hostfile '$hostfile'" >&2; exit 2; }
gpn="${GPUS_PER_NODE:-8}"
ssdtrain="${SSDTRAIN:-$root/build/ssdtrain}"
nodes=$(grep -cEv '^[[:space:]]*(#|$)' "$hostfile" || true)
[ "$nodes" -ge 1 ] || { echo "mpirun_multinode: no hosts in '$hostfile'" >&2; exit 2; }
np=$((nodes * gpn))

export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
args=(--hostfile "$hostfile" -np "$np")
case "${BIND:-none}" in
  none) args+=(--map-by "ppr:$gpn:node" --bind-to none) ;;
  numa) args+=(--map-by "ppr:$((gpn / ${NUMA_PER_NODE:-2})):numa" --bind-to numa) ;;
  *) echo "mpirun_multinode: BIND must be none or numa" >&2; exit 2 ;;
esac
case "${PML:-ob1}" in
  ob1) args+=(--mca pml ob1 --mca btl self,vader,tcp) ;;
  ucx) args+=(--mca pml ucx --mca btl ^openib) ;;
  *) echo "mpirun_multinode: PML must be ob1 or ucx" >&2; exit 2 ;;
esac
if [ -n "${MPI_IF:-}" ]; then
  args+=(--mca btl_tcp_if_include "$MPI_IF" --mca oob_tcp_if_include "$MPI_IF")
fi
# A lost node: TCP keepalive on mpirun's daemon connections (idle, then probes); ssdtrain's own
# watchdog (parallel.timeout_s) covers a collective that never finishes.
ka="${KEEPALIVE_S:-60}"
args+=(--mca oob_tcp_keepalive_time "$((ka / 2 > 1 ? ka / 2 : 1))"
       --mca oob_tcp_keepalive_intvl "$((ka / 8 > 1 ? ka / 8 : 1))"
       --mca oob_tcp_keepalive_probes 4)
# What every rank needs from this shell (mpirun's daemons start with a bare ssh environment).
for v in PATH LD_LIBRARY_PATH OMP_NUM_THREADS $(compgen -e | grep '^NCCL_' || true); do
  [ -n "${!v+x}" ] && args+=(-x "$v")
done
# shellcheck disable=SC2206
extra=(${MPIRUN_ARGS:-})
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)

cmd=(mpirun "${args[@]}" "${extra[@]}" "$ssdtrain" train "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
echo "mpirun_multinode: $nodes node(s) x $gpn rank(s) = $np ranks" >&2
exec "${cmd[@]}"
