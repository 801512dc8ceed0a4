#!/usr/bin/env bash
# Several hosts: run this on every host with its own NODE_RANK (0 on the coordinator's host).
#
#   host A (10.0.0.1):  NODE_RANK=0 NNODES=3 PROCS_PER_NODE=1 MASTER_ADDR=10.0.0.1 launch/torchrun_multi_node.sh
#   host B (10.0.0.2):  NODE_RANK=1 NNODES=3 PROCS_PER_NODE=2 MASTER_ADDR=10.0.0.1 launch/torchrun_multi_node.sh
#   host C (10.0.0.3):  NODE_RANK=2 NNODES=3 PROCS_PER_NODE=2 MASTER_ADDR=10.0.0.1 launch/torchrun_multi_node.sh
#
# torchrun numbers the ranks node by node: host A gets rank 0 (the coordinator), host B ranks 1-2
# (worker0, worker1), host C ranks 3-4 (worker2, worker3). PROCS_PER_NODE may differ per host; the
# ranks must add up to num_workers + 1. Extra arguments are Hydra overrides (server.host=10.0.0.1 to
# serve HTTP on host A's private address).
#
# Every host needs the partitions at the same path (model.partitions_dir): split once with
#   chatloop-split --model smollm2 --output /srv/chatloop/smollm2-4 --num-partitions 4
# and copy the folder (each worker reads only its own partition_N.safetensors and manifest.json).
#
# Each rank talks through the interface that routes to MASTER_ADDR (set GLOO_SOCKET_IFNAME or
# TP_SOCKET_IFNAME to choose another). Security: the RPC ports execute pickled data. Keep MASTER_ADDR
# and every worker on a private network, never on the internet.
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec torchrun --nnodes "${NNODES:-2}" --node-rank "$NODE_RANK" --nproc-per-node "${PROCS_PER_NODE:-3}" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-50050}" \
  --no-python "${CHATLOOP_COMMAND:-chatloop-serve}" cluster.num_workers="${NUM_WORKERS:-4}" \
  model.partitions_dir="${PARTITIONS_DIR:-/srv/chatloop/smollm2-4}" "$@"
