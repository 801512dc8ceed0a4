#!/usr/bin/env bash
# Several hosts: run this on every host with its own NODE_RANK (0 on the coordinator's host).
#
#   host A (10.0.0.1):  NODE_RANK=0 NNODES=2 PROCS_PER_NODE=3 MASTER_ADDR=10.0.0.1 launch/torchrun_multi_node.sh
#   host B (10.0.0.2):  NODE_RANK=1 NNODES=2 PROCS_PER_NODE=2 MASTER_ADDR=10.0.0.1 launch/torchrun_multi_node.sh
#
# torchrun numbers the ranks node by node: host A gets ranks 0-2 (coordinator, worker0, worker1),
# host B ranks 3-4 (worker2, worker3). With uneven PROCS_PER_NODE use the same value everywhere
# or torchrun's --nproc-per-node per host; WORLD_SIZE must be num_workers + 1.
#
# Every host needs the partitions at the same path (model.partitions_dir): split once with
#   chatloop-split --model smollm2 --output /srv/chatloop/smollm2-4 --num-partitions 4
# and copy the folder (each worker reads only its own partition_N.safetensors and manifest.json).
#
# Security: the RPC ports execute pickled data. Keep MASTER_ADDR and every worker on a private
# network (TP_SOCKET_IFNAME / GLOO_SOCKET_IFNAME pick the interface), never on the internet.
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec torchrun --nnodes "${NNODES:-2}" --node-rank "$NODE_RANK" --nproc-per-node "${PROCS_PER_NODE:-3}" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-50050}" \
  --no-python "${CHATLOOP_COMMAND:-chatloop-serve}" cluster.num_workers="${NUM_WORKERS:-4}" \
  model.partitions_dir="${PARTITIONS_DIR:-/srv/chatloop/smollm2-4}" "$@"
