#!/usr/bin/env bash
# The container's role (CHATLOOP_ROLE), as in the reference deployment:
#   coordinator  chatloop-serve, waiting for the workers to join on ${CHATLOOP_COORDINATOR_HOST}:50050
#   worker       chatloop-worker from /home/chatloop/configs/worker-config.yaml (mounted), else the image's
#                configs/worker-config-${CHATLOOP_WORKER}.yaml, joining ${CHATLOOP_COORDINATOR}
#   all          (default) the coordinator and its 4 workers in this one container
# Extra arguments are Hydra overrides (coordinator, all) or chatloop-worker options (worker).
# The coordinator's API key: $CHATLOOP_API_KEY, or a secret mounted at /run/secrets/chatloop_api_key. Published
# beyond loopback (CHATLOOP_PUBLISH_ADDR, set by docker-run.sh and the compose file) it refuses to start without one.
set -euo pipefail
PARTITIONS=${CHATLOOP_PARTITIONS_DIR:-/home/chatloop/models/partitions}
SECRET=/run/secrets/chatloop_api_key
key=()
if [ -f "$SECRET" ]; then key=("server.api_key_file=$SECRET"); fi
closed_or_keyed() {
  case "${CHATLOOP_PUBLISH_ADDR:-127.0.0.1}" in 127.*|localhost|::1|"[::1]") return 0 ;; esac
  [ -n "${CHATLOOP_API_KEY:-}" ] || [ ${#key[@]} -gt 0 ] && return 0
  echo "chatloop: refusing to serve: the HTTP API is published on $CHATLOOP_PUBLISH_ADDR without an API key (anyone" \
    "who reaches it could use the model). Set CHATLOOP_API_KEY or mount the key at $SECRET, or publish on" \
    "127.0.0.1 (PUBLISH_ADDR, the default)." >&2
  exit 2
}
case "${CHATLOOP_ROLE:-all}" in
  coordinator)
    closed_or_keyed
    exec chatloop-serve cluster.launch=external "cluster.master_addr=${CHATLOOP_COORDINATOR_HOST:-coordinator}" \
      server.host=0.0.0.0 "model.partitions_dir=$PARTITIONS" "cluster.num_workers=${CHATLOOP_NUM_WORKERS:-4}" \
      "${key[@]}" "$@" ;;
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
    closed_or_keyed
    exec chatloop-serve server.host=0.0.0.0 "model.partitions_dir=$PARTITIONS" "${key[@]}" "$@" ;;
  *) echo "CHATLOOP_ROLE must be coordinator, worker or all (got '${CHATLOOP_ROLE}')" >&2; exit 2 ;;
esac
