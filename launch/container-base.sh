#!/usr/bin/env bash
# Containers without a Docker engine or a registry (how ChatLoop's container test runs): podman with runc
# (crun fails on hybrid cgroups), default ulimits off (sandboxes forbid raising them), and a Debian base image
# made with mmdebstrap. Prints the base image's name; build on it with
#   DOCKER="podman --runtime runc" BUILD_ARGS="--network host --build-arg BASE=localhost/debian-py:bookworm" \
#     launch/docker-run.sh build
set -euo pipefail
IMAGE=${1:-localhost/debian-py:bookworm}
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null
fi
mkdir -p /etc/containers
grep -q '^default_ulimits' /etc/containers/containers.conf 2>/dev/null \
  || printf '[containers]\ndefault_ulimits = []\n' >> /etc/containers/containers.conf
if ! podman image exists "$IMAGE"; then
  T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
  mmdebstrap --variant=minbase --include=python3,python3-venv,python3-pip,gcc,libc6-dev,ca-certificates bookworm \
    "$T/rootfs.tar" >/dev/null 2>&1
  podman import "$T/rootfs.tar" "$IMAGE" >/dev/null
fi
echo "$IMAGE"
