"""This host on the network: its addresses, the interface that reaches a peer, whether a host name means this
machine, free ports."""

from __future__ import annotations

import os
import socket

import psutil

__all__ = [
    "GLOO_IFNAME_ENV", "TP_IFNAME_ENV", "free_port", "free_ports", "interface_towards", "local_addresses",
    "rank_address", "rank_interfaces", "resolve", "runs_here", "under_torchrun",
]

GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"
"""The interface Gloo (torch RPC's barrier) binds and connects through."""
TP_IFNAME_ENV = "TP_SOCKET_IFNAME"
"""The interface TensorPipe (torch RPC's transport) listens on and advertises to its peers."""


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


def resolve(host: str) -> str:
    """The IPv4 address of ``host`` (an address stays as it is); ``OSError`` saying what failed."""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as e:
        raise OSError(f"cannot resolve {host!r} ({e}): give an address or a name this host can resolve") from None


def interface_towards(address: str) -> tuple[str, str]:
    """(interface name, local address) this host uses to reach ``address``, as its routing table says.

    A UDP socket's ``connect`` picks the route without sending anything. An address of this
    host itself is reached through the interface that holds it, so a coordinator whose
    MASTER_ADDR is its own private address binds that interface, where its peers reach it.
    """
    target = resolve(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))
        except OSError as e:
            raise OSError(f"no route from this host to {address} ({target}): {e}") from None
        local = s.getsockname()[0]
    if target in local_addresses():
        local = target
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addresses):
            return name, local
    raise OSError(f"the route to {address} leaves from {local}, which no interface of this host holds")


def rank_interfaces(master_addr: str, environ: dict[str, str]) -> dict[str, str]:
    """The GLOO_SOCKET_IFNAME and TP_SOCKET_IFNAME a rank needs to reach ``master_addr``, to add to ``environ``.

    Both must name the same interface: with only one set, Gloo and TensorPipe disagree on the
    address the rank is reached at. What the user set wins; with neither set, the interface
    that routes to ``master_addr``. Hosts whose name resolves to a loopback address (Debian's
    and Ubuntu's default) otherwise advertise 127.0.0.1 to their peers on other hosts.
    """
    given = {name: environ[name] for name in (GLOO_IFNAME_ENV, TP_IFNAME_ENV) if environ.get(name)}
    if len(given) == 2:
        return {}
    interface = next(iter(given.values())) if given else interface_towards(master_addr)[0]
    return {name: interface for name in (GLOO_IFNAME_ENV, TP_IFNAME_ENV) if name not in given}


def rank_address(environ: dict[str, str]) -> str:
    """The IPv4 address this rank is reached at: that of the interface TensorPipe uses (TP_SOCKET_IFNAME, set by
    :func:`rank_interfaces`), so the pipeline's links go where its RPC goes; loopback when none is named."""
    interface = environ.get(TP_IFNAME_ENV)
    if not interface:
        return "127.0.0.1"
    addresses = [a.address for a in psutil.net_if_addrs().get(interface, ()) if a.family == socket.AF_INET]
    if not addresses:
        raise OSError(f"{TP_IFNAME_ENV}={interface} names no interface with an IPv4 address on this host")
    return addresses[0]


def under_torchrun() -> bool:
    """Whether this process is a rank torchrun started (its ranks meet in torchrun's store)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
