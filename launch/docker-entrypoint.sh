#!/usr/bin/env bash
# CHATLOOP_ROLE=all (default): coordinator and its workers in one container.
# CHATLOOP_ROLE=torchrun: one node of a multi-container cluster (see docker-compose.yml).
set -euo pipefail
case "${CHATLOOP_ROLE:-all}" in
  all) exec chatloop-serve server.host=0.0.0.0 "$@" ;;
  torchrun) exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$PROCS_PER_NODE" \
      --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-50050}" --no-python chatloop-serve server.host=0.0.0.0 "$@" ;;
  *) echo "CHATLOOP_ROLE must be all or torchrun" >&2; exit 2 ;;
esac
