#!/usr/bin/env bash
# OpenMPI remote-launch agent for scripts/launch/test_multinode.sh: stands in for ssh.
# mpirun calls it as `netns_agent.sh [options] HOST COMMAND...` (plm_rsh_agent); instead of
# logging in to HOST it runs COMMAND (the orted daemon) inside the network namespace named HOST,
# in a UTS namespace of its own whose hostname is HOST, with the bare environment an ssh login
# would give (PATH, HOME, LD_LIBRARY_PATH): what a rank needs beyond that must come from mpirun
# (-x VAR, --mca), as on a real cluster.
#
# Environment (from the test script, read here before the environment is cleared):
#   SSD_MN_PREFIX   only namespaces named PREFIX-* are entered (default ssdmn)
#   SSD_MN_RO_DIR   when set, this directory is bind-mounted read-only on every host except
#                   SSD_MN_RW_HOST, so a write from a rank on another host fails loudly
set -euo pipefail
prefix="${SSD_MN_PREFIX:-ssdmn}"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done   # ssh-style options: ignored
[ $# -ge 2 ] || { echo "netns_agent: usage: netns_agent.sh HOST COMMAND..." >&2; exit 2; }
host="$1"; shift
case "$host" in
  "$prefix"-*) ;;
  *) echo "netns_agent: '$host' is not a test host (expected $prefix-*)" >&2; exit 2 ;;
esac
if ! ip netns list | awk '{print $1}' | grep -qx -- "$host"; then
  echo "netns_agent: no network namespace '$host' (is the test network up?)" >&2; exit 2
fi
cmd="$*"
keep=(PATH="$PATH" HOME="${HOME:-/root}" LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}" USER="${USER:-root}")
if [ -n "${SSD_MN_RO_DIR:-}" ] && [ "$host" != "${SSD_MN_RW_HOST:-}" ]; then
  # A private mount namespace (unshare --mount makes propagation private: nothing leaks out).
  exec ip netns exec "$host" unshare --uts --mount -- env -i "${keep[@]}" /bin/sh -c \
    'hostname "$1" && mount --bind "$2" "$2" && mount -o remount,bind,ro "$2" && exec /bin/sh -c "$3"' \
    sh "$host" "$SSD_MN_RO_DIR" "$cmd"
fi
exec ip netns exec "$host" unshare --uts -- env -i "${keep[@]}" /bin/sh -c \
  'hostname "$1" && exec /bin/sh -c "$2"' sh "$host" "$cmd"
