"""One hop, without a model: torch RPC (a 2-rank TensorPipe group) against the pipeline's links.

Micro-batches travel over :mod:`chatloop.runtime.links` (one TCP message a hop, no answer);
everything else over RPC. :class:`LinkEcho` measures the first, :class:`EchoGroup` the second.

A round trip of ``rpc_async(echo, identity, (tensor,))`` is two hops (there and back), each a
pickle, a TensorPipe send over loopback and a wake-up of the other side's RPC thread. The
product's pipeline makes S + 1 such hops per micro-batch (coordinator -> worker0 -> ... ->
coordinator), so ``per hop x (S + 1)`` is the transport's share of a decode step.

torch.distributed.rpc starts once per process: a process that opens :class:`EchoGroup` cannot
start a ChatLoop cluster afterwards (pytest-benchmark runs it in the test process, which
starts no cluster). The product keeps its RPC calls in ``chatloop/runtime/``; this module is
measurement code beside it, with the same backend options.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time

import torch
import torch.distributed.rpc as rpc

from chatloop.config import ClusterConfig
from chatloop.runtime.links import SECRET_CHARS, Link, LinkListener

__all__ = ["EchoGroup", "LinkEcho", "identity"]


def identity(x: torch.Tensor) -> torch.Tensor:
    """The echo rank's whole stage."""
    return x


def _options(port: int, timeout: float) -> rpc.TensorPipeRpcBackendOptions:
    cluster = ClusterConfig()  # the product's transports and channels
    return rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=cluster.num_rpc_threads,
        rpc_timeout=timeout,
        init_method=f"tcp://127.0.0.1:{port}",
        _transports=list(cluster.rpc_transports),
        _channels=list(cluster.rpc_channels),
    )


def _serve(port: int, timeout: float) -> None:
    torch.set_num_threads(1)
    rpc.init_rpc("echo", rank=1, world_size=2, rpc_backend_options=_options(port, timeout))
    rpc.shutdown(graceful=True)  # serves until rank 0 shuts down


class EchoGroup:
    """Rank 0 (this process) and an echo rank (spawned); ``round_trip(x)`` sends ``x`` there and back."""

    def __init__(self, timeout: float = 60.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._process = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, timeout), daemon=True)
        self._process.start()
        rpc.init_rpc(f"bench{os.getpid()}", rank=0, world_size=2, rpc_backend_options=_options(port, timeout))

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        return rpc.rpc_async("echo", identity, args=(x,)).wait()

    def per_hop_seconds(self, x: torch.Tensor, calls: int = 200) -> float:
        """Median round trip / 2 over ``calls`` calls (after 20 warm-up calls)."""
        return _median_half_round_trip(self.round_trip, x, calls)

    def close(self) -> None:
        rpc.shutdown(graceful=True)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


def _median_half_round_trip(round_trip, x: torch.Tensor, calls: int) -> float:
    for _ in range(20):
        round_trip(x)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        round_trip(x)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] / 2


def _echo_links(connection, secret: str) -> None:
    """The spawned side of :class:`LinkEcho`: every message goes straight back."""
    torch.set_num_threads(1)
    back: list[Link] = []
    listener = LinkListener("127.0.0.1", lambda method, args: back[0].send(method, args), name="echo")
    listener.admit(secret)
    connection.send(listener.address)
    back.append(Link("bench", connection.recv(), secret))
    connection.send("ready")  # messages may come now: they have a way back
    connection.recv()  # until the parent closes


class LinkEcho:
    """This process and a spawned echo process joined by two links (there and back), as stages are."""

    def __init__(self) -> None:
        secret = os.urandom(SECRET_CHARS // 2).hex()
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._listener = LinkListener("127.0.0.1", lambda method, args: self._replies.put(args[0]), name="bench")
        self._listener.admit(secret)
        self._connection, theirs = multiprocessing.Pipe()
        self._process = multiprocessing.get_context("spawn").Process(target=_echo_links, args=(theirs, secret),
                                                                     daemon=True)
        self._process.start()
        self._link = Link("echo", self._connection.recv(), secret)
        self._connection.send(self._listener.address)
        self._connection.recv()

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        self._link.send("forward", (x,))
        return self._replies.get(timeout=30)

    def per_hop_seconds(self, x: torch.Tensor, calls: int = 200) -> float:
        """Median round trip / 2 over ``calls`` calls (after 20 warm-up calls)."""
        return _median_half_round_trip(self.round_trip, x, calls)

    def close(self) -> None:
        self._link.close()
        self._connection.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
        self._listener.close()


if __name__ == "__main__":
    shapes = ((1, 1, 576), (16, 1, 576), (1, 1, 4096), (16, 1, 4096), (1, 64, 4096))
    links = LinkEcho()
    group = EchoGroup()
    try:
        for shape in shapes:
            x = torch.randn(shape)
            link_hop, rpc_hop = links.per_hop_seconds(x), group.per_hop_seconds(x)
            print(f"[{', '.join(map(str, shape))}] float32: link {link_hop * 1e3:.3f} ms, torch RPC "
                  f"{rpc_hop * 1e3:.3f} ms per hop")
    finally:
        links.close()
        group.close()
