"""This host on the network: its addresses, whether a configured host name means this machine, free ports."""

from __future__ import annotations

import socket

import psutil

__all__ = ["free_port", "free_ports", "local_addresses", "runs_here"]


def local_addresses() -> set[str]:
    """Every address of every interface of this host (IPv4 and IPv6, loopback included)."""
    families = (socket.AF_INET, socket.AF_INET6)
    return {
        address.address.split("%")[0]
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family in families
    }


def runs_here(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine: it resolves to one of its interfaces' addresses."""
    if host in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(resolved & local_addresses())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now on ``host`` (the kernel picks it; another process may take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free TCP ports on ``host`` (worker k serves metrics on base + k)."""
    for _ in range(200):
        base = free_port(host)
        if base + count >= 65536:
            continue
        sockets = []
        try:
            for k in range(count):
                s = socket.socket()
                sockets.append(s)
                s.bind((host, base + k))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"found no {count} consecutive free ports on {host}")
