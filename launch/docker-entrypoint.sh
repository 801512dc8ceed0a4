#!/usr/bin/env bash
# The container's role (CHATLOOP_ROLE), as in the reference deployment:
#   coordinator  chatloop-serve, waiting for the workers to join on ${CHATLOOP_COORDINATOR_HOST}:50050
#   worker       chatloop-worker from /home/chatloop/configs/worker-config.yaml (mounted), else the image's
#                configs/worker-config-${CHATLOOP_WORKER}.yaml, joining ${CHATLOOP_COORDINATOR}
#   all          (default) the coordinator and its 4 workers in this one container
# Extra arguments are Hydra overrides (coordinator, all) or chatloop-worker options (worker).
set -euo pipefail
PARTITIONS=${CHATLOOP_PARTITIONS_DIR:-/home/chatloop/models/partitions}
case "${CHATLOOP_ROLE:-all}" in
  coordinator)
    exec chatloop-serve cluster.launch=external "cluster.master_addr=${CHATLOOP_COORDINATOR_HOST:-coordinator}" \
      server.host=0.0.0.0 "model.partitions_dir=$PARTITIONS" "cluster.num_workers=${CHATLOOP_NUM_WORKERS:-4}" "$@" ;;
  worker)
    CONFIG=${CHATLOOP_WORKER_CONFIG:-/home/chatloop/configs/worker-config.yaml}
    if [ ! -f "$CONFIG" ]; then
      : "${CHATLOOP_WORKER:?set CHATLOOP_WORKER=N, or mount a config at /home/chatloop/configs/worker-config.yaml}"
      CONFIG="$PARTITIONS/configs/worker-config-${CHATLOOP_WORKER}.yaml"
    fi
    # Metrics and health must be reachable through the container's published ports.
    export CHATLOOP_METRICS_HOST=${CHATLOOP_METRICS_HOST:-0.0.0.0}
    exec chatloop-worker --config "$CONFIG" --coordinator "${CHATLOOP_COORDINATOR:-coordinator:50050}" \
      --partitions-dir "$PARTITIONS" "$@" ;;
  all)
    exec chatloop-serve server.host=0.0.0.0 "model.partitions_dir=$PARTITIONS" "$@" ;;
  *) echo "CHATLOOP_ROLE must be coordinator, worker or all (got '${CHATLOOP_ROLE}')" >&2; exit 2 ;;
esac
