"""Hosts made of Linux network namespaces: each has its own interfaces and loopback; a bridge joins them.

``Hosts(["a", "b", "c"])`` builds ``clA``... with addresses 10.213.X.1.. on one bridge (in a
namespace of its own, so nothing of this machine's own network changes) and a veth from the test's
namespace to that bridge, so the test reaches every host. ``run(host, command)`` starts a process
inside a host. The hostname stays the machine's: on Debian it resolves to 127.0.0.1, the case
that breaks torch's defaults.
"""

from __future__ import annotations

import os
import subprocess
import uuid

__all__ = ["Hosts", "can_make_namespaces"]


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(command, check=check, capture_output=True, text=True)


def can_make_namespaces() -> str | None:
    """None if this process may build network namespaces, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    probe = f"clprobe{uuid.uuid4().hex[:6]}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "iproute2 (ip) is not installed"
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Namespaced hosts on one bridge; use as a context manager (everything is removed on exit)."""

    def __init__(self, names: list[str], subnet: int | None = None) -> None:
        tag = uuid.uuid4().hex[:4]
        self.subnet = subnet if subnet is not None else 100 + int(tag, 16) % 100
        self.tag = tag
        self.names = list(names)
        self.netns = {name: f"cl{tag}{name}" for name in names}
        self.hub = f"cl{tag}hub"
        self.addresses = {name: f"10.213.{self.subnet}.{k + 1}" for k, name in enumerate(names)}
        self.test_address = f"10.213.{self.subnet}.254"
        self._links: dict[str, str] = {}

    def __enter__(self) -> Hosts:
        try:
            self._build()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _build(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("link", "add", "br0", "type", "bridge", netns=self.hub)
        _ip("link", "set", "br0", "up", netns=self.hub)
        for name in self.names:
            ns = self.netns[name]
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", netns=ns)
            outer, inner = f"cl{self.tag}{name}h", f"cl{self.tag}{name}"
            _ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.hub)
            _ip("link", "set", outer, "master", "br0", netns=self.hub)
            _ip("link", "set", outer, "up", netns=self.hub)
            _ip("addr", "add", f"{self.addresses[name]}/24", "dev", inner, netns=ns)
            _ip("link", "set", inner, "up", netns=ns)
            self._links[name] = outer
        # The test's own leg onto the bridge, so that it can talk to every host.
        mine, theirs = f"cl{self.tag}t", f"cl{self.tag}th"
        _ip("link", "add", mine, "type", "veth", "peer", "name", theirs, "netns", self.hub)
        _ip("link", "set", theirs, "master", "br0", netns=self.hub)
        _ip("link", "set", theirs, "up", netns=self.hub)
        _ip("addr", "add", f"{self.test_address}/24", "dev", mine)
        _ip("link", "set", mine, "up")
        self._mine = mine

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.netns[host], *argv]

    def link(self, host: str, up: bool) -> None:
        """Plug ``host`` into the bridge or pull its cable (its processes live on, unreachable)."""
        _ip("link", "set", self._links[host], "up" if up else "down", netns=self.hub)

    def __exit__(self, *exc) -> None:
        for ns in [*self.netns.values(), self.hub]:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        if getattr(self, "_mine", None):
            _ip("link", "del", self._mine, check=False)
