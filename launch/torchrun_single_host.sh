#!/usr/bin/env bash
# One host, 1 coordinator + 4 workers as torchrun ranks (rank 0 coordinates, rank k is worker k-1).
# The rendezvous port is the reference deployment's coordinator port, 50050. Extra arguments are Hydra overrides.
set -euo pipefail
NUM_WORKERS="${NUM_WORKERS:-4}"
exec torchrun --nnodes 1 --nproc-per-node "$((NUM_WORKERS + 1))" \
  --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-50050}" \
  --no-python chatloop-generate cluster.num_workers="$NUM_WORKERS" "$@"
