"""Which interface a rank uses to reach the coordinator, and whether a host name means this machine."""

from __future__ import annotations

import socket

import pytest

from chatloop.network import interface_towards, local_addresses, rank_interfaces, resolve, runs_here


def test_loopback_is_reached_through_lo():
    name, address = interface_towards("127.0.0.1")
    assert address == "127.0.0.1" and name in {n for n in __import__("psutil").net_if_addrs()}


def test_the_interfaces_follow_the_route_unless_the_user_chose():
    name, _ = interface_towards("127.0.0.1")
    assert rank_interfaces("127.0.0.1", {}) == {"GLOO_SOCKET_IFNAME": name, "TP_SOCKET_IFNAME": name}
    # One set: the other follows it (Gloo and TensorPipe must advertise the same address).
    assert rank_interfaces("127.0.0.1", {"TP_SOCKET_IFNAME": "eth7"}) == {"GLOO_SOCKET_IFNAME": "eth7"}
    assert rank_interfaces("127.0.0.1", {"GLOO_SOCKET_IFNAME": "eth7"}) == {"TP_SOCKET_IFNAME": "eth7"}
    assert rank_interfaces("127.0.0.1", {"GLOO_SOCKET_IFNAME": "a", "TP_SOCKET_IFNAME": "b"}) == {}


def test_an_address_of_this_host_is_reached_through_the_interface_that_holds_it():
    others = sorted(a for a in local_addresses() if "." in a and not a.startswith("127."))
    if not others:
        pytest.skip("this host has no IPv4 address besides loopback")
    name, address = interface_towards(others[0])
    assert address == others[0] and name != "lo"


def test_unknown_hosts_say_what_to_do():
    with pytest.raises(OSError, match="cannot resolve 'no-such-host.invalid'"):
        resolve("no-such-host.invalid")
    assert not runs_here("no-such-host.invalid") and not runs_here("192.0.2.77")
    assert runs_here("localhost") and runs_here(socket.gethostname())
