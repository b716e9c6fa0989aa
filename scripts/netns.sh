#!/usr/bin/env bash
# Run a command in a loopback-only network namespace with its own PID namespace,
# so a local Ray cluster neither reaches nor listens on outside networks, and
# every process it leaves behind is reaped when the command exits.
# Falls back to running the command directly (with a warning) where Linux does
# not allow unprivileged namespaces.
set -euo pipefail
if [ "$#" -eq 0 ]; then
  echo "usage: scripts/netns.sh COMMAND [ARGS...]" >&2
  exit 2
fi
if [ "${DISAGG_IN_NETNS:-}" = "1" ]; then
  exec "$@"
fi
if unshare --net --pid --fork --mount-proc true 2>/dev/null; then
  exec unshare --net --pid --fork --mount-proc -- \
    env DISAGG_IN_NETNS=1 bash -c 'ip link set lo up 2>/dev/null || true; exec "$@"' netns "$@"
fi
if unshare --user --map-root-user --net --pid --fork --mount-proc true 2>/dev/null; then
  exec unshare --user --map-root-user --net --pid --fork --mount-proc -- \
    env DISAGG_IN_NETNS=1 bash -c 'ip link set lo up 2>/dev/null || true; exec "$@"' netns "$@"
fi
echo "WARNING: cannot create a network namespace here; running without one (Ray binds all interfaces)" >&2
exec "$@"
