#!/usr/bin/env bash
# The reference deployment's docker-run.ps1, for Linux and macOS: the same verbs.
#   launch/docker-run.sh build                 build chatloop-all-in-one:latest (once)
#   launch/docker-run.sh run-coordinator       the coordinator (HTTP on 8000), waiting for its workers
#   launch/docker-run.sh run-worker N          worker N (0-3), metrics on 909(1+N)
#   launch/docker-run.sh status                the containers, then chatloop-status inside the coordinator
#   launch/docker-run.sh stop                  stop and remove this deployment's containers
# DOCKER="podman --runtime runc" uses podman; MODELS=DIR mounts DIR/partitions (your own split) read-only;
# BUILD_ARGS passes more to the build (a base image, a proxy's CA, a local wheel folder: see README, Deploy);
# HTTP_PORT and METRICS_PORT (host ports, default 8000 and 9091 + N) and PREFIX (container names, default
# chatloop) let a second deployment run beside the first.
# Closed by default: the ports are published on PUBLISH_ADDR (default 127.0.0.1, this host only; IPv6 in brackets). Publishing the
# HTTP API anywhere else needs an API key, CHATLOOP_API_KEY or API_KEY_FILE=PATH (its first line; mounted read-only
# as a secret), which clients send as 'Authorization: Bearer KEY'; the script refuses otherwise.
# Restart policy: unless-stopped. A container that exits by itself (a crash, or status 75: the worker lost the
# coordinator) comes back, and the coordinator replays the interrupted streams. One stopped by hand (docker/podman
# stop or kill) stays stopped under any policy while the engine runs; "always" would differ only in starting it
# again when the engine (or the host) restarts, against what the person who stopped it meant. The coordinator
# then names the container and the command that brings it back (`docker start chatloop-worker-2`): each worker
# is told its container's name and the engine command (CHATLOOP_CONTAINER, CHATLOOP_CONTAINER_ENGINE=$DOCKER).
RESTART=unless-stopped
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
IMAGE=${IMAGE:-chatloop-all-in-one:latest}
NETWORK=${NETWORK:-chatloop}
PREFIX=${PREFIX:-chatloop}
HTTP_PORT=${HTTP_PORT:-8000}
METRICS_PORT=${METRICS_PORT:-9091}
PUBLISH_ADDR=${PUBLISH_ADDR:-127.0.0.1}
eval "BUILD_EXTRA=(${BUILD_ARGS:-})"   # shell words: quote a value with spaces
mounts=()
if [ -n "${MODELS:-}" ]; then mounts=(-v "$(cd "$MODELS" && pwd)/partitions:/home/chatloop/models/partitions:ro"); fi

key=()   # how the coordinator container gets the API key: never on the command line
if [ -n "${API_KEY_FILE:-}" ]; then key=(-v "$(realpath "$API_KEY_FILE"):/run/secrets/chatloop_api_key:ro")
elif [ -n "${CHATLOOP_API_KEY:-}" ]; then key=(-e CHATLOOP_API_KEY); fi
on_loopback() { case "$PUBLISH_ADDR" in 127.*|localhost|::1|"[::1]") return 0 ;; *) return 1 ;; esac; }

network() { $DOCKER network inspect "$NETWORK" >/dev/null 2>&1 || $DOCKER network create "$NETWORK" >/dev/null; }

case "${1:-}" in
  build)
    $DOCKER build "${BUILD_EXTRA[@]}" -f launch/Dockerfile -t "$IMAGE" . ;;
  run-coordinator)
    if ! on_loopback && [ ${#key[@]} -eq 0 ]; then
      echo "docker-run.sh: refusing to publish the HTTP API on $PUBLISH_ADDR without an API key: anyone who reaches" \
        "that address could use the model. Set CHATLOOP_API_KEY (or API_KEY_FILE=PATH), or publish on this host" \
        "only with PUBLISH_ADDR=127.0.0.1 (the default)." >&2
      exit 2
    fi
    network
    $DOCKER run -d --name "$PREFIX-coordinator" --network "$NETWORK" --network-alias coordinator \
      --restart "$RESTART" -e CHATLOOP_ROLE=coordinator -e CHATLOOP_PUBLISH_ADDR="$PUBLISH_ADDR" "${key[@]}" \
      -p "$PUBLISH_ADDR:$HTTP_PORT:8000" "${mounts[@]}" "$IMAGE" "${@:2}" ;;
  run-worker)
    n=${2:?usage: docker-run.sh run-worker N}
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "worker number must be 0, 1, 2, ... (got '$n')" >&2; exit 2; }
    on_loopback || echo "docker-run.sh: worker $n's metrics (no API key: Prometheus reads them) are published on" \
      "$PUBLISH_ADDR:$((METRICS_PORT + n)): keep that address private" >&2
    network
    $DOCKER run -d --name "$PREFIX-worker-$n" --network "$NETWORK" --network-alias "worker-$n" --restart "$RESTART" \
      -e CHATLOOP_CONTAINER="$PREFIX-worker-$n" -e CHATLOOP_CONTAINER_ENGINE="$DOCKER" \
      -e CHATLOOP_ROLE=worker -e CHATLOOP_WORKER="$n" -p "$PUBLISH_ADDR:$((METRICS_PORT + n)):$((9091 + n))" "${mounts[@]}" \
      "$IMAGE" "${@:3}" ;;
  status)
    $DOCKER ps -a --filter "name=^$PREFIX-" --format 'table {{.Names}}\t{{.Status}}\t{{.Ports}}'
    echo
    $DOCKER exec "$PREFIX-coordinator" chatloop-status --url http://127.0.0.1:8000 "${@:2}" ;;
  stop)
    ids=$($DOCKER ps -aq --filter "name=^$PREFIX-")
    if [ -n "$ids" ]; then $DOCKER rm -f $ids >/dev/null; fi ;;
  *)
    sed -n '2,11p' "$0" >&2; exit 2 ;;
esac
