"""What a worker tells the coordinator when it joins a generation, and how the coordinator names it in messages.

A worker announces its pid and host, and how a person starts it again when it is gone for good:

- in a container (``CHATLOOP_CONTAINER`` names it; ``launch/docker-run.sh`` and the compose file set it, with
  ``CHATLOOP_CONTAINER_ENGINE`` the engine command, ``docker`` by default): ``docker start chatloop-worker-2``.
  A container stopped by hand (``docker stop``/``kill``, ``podman stop``/``kill``) is not restarted by any
  restart policy, so only a person brings it back;
- started by hand (``chatloop-worker --config ...``): that command;
- started by the coordinator or under torchrun: nothing (their supervisor starts them again).

The coordinator keeps what each worker said (:attr:`RpcCluster.known`) and names a lost worker with it:
"worker2 (container chatloop-worker-2)", "worker1 (pid 12 on vm)".
"""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Mapping
from typing import Any

from ..engine.pipeline import stage_name

__all__ = ["CONTAINER_ENV", "ENGINE_ENV", "announcement", "bring_back", "label", "not_back", "while_away"]

CONTAINER_ENV = "CHATLOOP_CONTAINER"
"""The name of the container this worker runs in (set by launch/docker-run.sh and the compose file)."""
ENGINE_ENV = "CHATLOOP_CONTAINER_ENGINE"
"""The container engine's command (``docker``, ``podman``, ``podman --runtime runc``): the user's DOCKER."""


def announcement(command: list[str] | None = None) -> dict[str, Any]:
    """This worker's pid, host and, where a person must start it again, how: its container or ``command``."""
    info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
    container = os.environ.get(CONTAINER_ENV, "").strip()
    if container:
        info["container"] = container
        info["engine"] = os.environ.get(ENGINE_ENV, "").strip() or "docker"
    elif command:
        info["command"] = shlex.join(command)
    return info


def label(index: int, info: Mapping[str, Any] | None) -> str:
    """'worker2 (container chatloop-worker-2)', 'worker1 (pid 12 on vm)' or 'worker1' when it never joined."""
    name = stage_name(index)
    if not info:
        return name
    if info.get("container"):
        return f"{name} (container {info['container']})"
    if info.get("pid") is not None:
        return f"{name} (pid {info['pid']}{' on ' + str(info['host']) if info.get('host') else ''})"
    return name


def bring_back(info: Mapping[str, Any] | None) -> str | None:
    """The command that starts this worker again ('docker start chatloop-worker-2'); None when its supervisor does."""
    if not info:
        return None
    if info.get("container"):
        return f"{info.get('engine') or 'docker'} start {shlex.quote(str(info['container']))}"
    return info.get("command") or None


def while_away(info: Mapping[str, Any] | None, waited: str) -> str | None:
    """What to do while the coordinator waits (``waited``: 'cluster.recovery_timeout_s=60 s') for a lost worker
    that nobody here restarts: '...: if its container was stopped by hand, bring it back with `docker start ...`'."""
    command = bring_back(info)
    if command is None:
        return None
    what = "its container was stopped by hand or exited" if info and info.get("container") else "it is not running"
    return f"waiting up to {waited} for it to rejoin: if {what}, bring it back with `{command}`"


def not_back(index: int, info: Mapping[str, Any] | None, where: str, waited: str) -> str | None:
    """Why worker ``index``, which joined before, did not rejoin the coordinator at ``where`` within ``waited``, and
    the command that brings it back; None when nothing is known of it (it never joined, or a supervisor restarts it)."""
    command = bring_back(info)
    if command is None:
        return None
    head = (f"{label(index, info)} did not rejoin the coordinator at {where} within {waited}: it is not running "
            f"(stopped by hand, or it exited) or cannot reach that address")
    if info and info.get("container"):
        return (f"{head}; a container stopped by hand stays stopped whatever its restart policy: bring it back "
                f"with `{command}`")
    return f"{head}; start it again with `{command}`"
