"""Where the ranks meet: a key-value store on the coordinator, and one torch RPC world per generation.

The coordinator hosts a ``TCPStore`` (on one host: bound to ``cluster.master_addr`` only,
loopback by default; under torchrun: torchrun's own store at MASTER_ADDR:MASTER_PORT). Workers
join it, announce themselves for a generation, and every rank then starts torch RPC for that
generation over its own key prefix. A generation ends when the coordinator says so (a worker was
lost, or the service shuts down); ranks that live on tear their RPC agent down and start the next
generation in the same process, keeping their loaded weights.

Keys (under a prefix per store): ``generation`` (the one the coordinator is forming),
``ready/G/K`` (worker K is ready for generation G, JSON about it), ``start/G``, ``end/G``,
``closed`` (the service stopped: workers leave), ``evict/K/PID`` (that process of worker K stopped
answering: its supervisor kills it), ``failed/K`` (worker K's supervisor gave it up, and why).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc
from torch.distributed.rendezvous import register_rendezvous_handler

from ..engine.errors import first_line
from ..network import resolve

__all__ = ["Rendezvous", "RendezvousError", "init_rpc_generation", "shutdown_rpc"]

log = logging.getLogger(__name__)

SCHEME = "chatloop"
POLL_S = 0.05


class RendezvousError(RuntimeError):
    """The store cannot be reached or served: the message says where and what to change."""


class Rendezvous:
    """One side of the membership protocol over a base store (see the module's docstring)."""

    def __init__(self, store: dist.Store, prefix: str, where: str, listener: socket.socket | None = None) -> None:
        self.store = dist.PrefixStore(prefix, store)
        self.base = store
        self.where = where
        """host:port of the store, for messages."""
        self._listener = listener  # the coordinator's bound socket, kept open as long as its store serves

    # ---- making one --------------------------------------------------------------------------
    @classmethod
    def host(cls, address: str, port: int, timeout_s: float) -> Rendezvous:
        """The coordinator's store on ``address:port`` only (not on every interface, as TCPStore binds by itself)."""
        ip = resolve(address)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((ip, port))
            listener.listen(256)
        except OSError as e:
            listener.close()
            raise RendezvousError(
                f"cannot listen on {address}:{port} for the workers ({e.strerror or e}): is another ChatLoop running "
                f"there? set cluster.master_port to a free port"
            ) from None
        store = dist.TCPStore(ip, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                              master_listen_fd=listener.fileno())
        return cls(store, "chatloop/", f"{address}:{port}", listener)

    @classmethod
    def join(cls, address: str, port: int, timeout_s: float) -> Rendezvous:
        """A worker's connection to the coordinator's store (retried until ``timeout_s``)."""
        try:
            store = dist.TCPStore(address, port, None, False, timedelta(seconds=timeout_s))
        except (RuntimeError, OSError) as e:
            raise RendezvousError(
                f"cannot reach the coordinator at {address}:{port} within {timeout_s:.0f} s ({first_line(e)}): is it "
                f"running, and is the address right?"
            ) from None
        return cls(store, "chatloop/", f"{address}:{port}")

    @classmethod
    def torchrun(cls, timeout_s: float) -> Rendezvous:
        """torchrun's own store (its agent's, at MASTER_ADDR:MASTER_PORT), for every rank of a torchrun launch."""
        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        try:
            store = dist.TCPStore(address, port, None, False, timedelta(seconds=timeout_s))
        except (RuntimeError, OSError) as e:
            raise RendezvousError(f"cannot reach torchrun's store at {address}:{port} ({first_line(e)})") from None
        # A restart of the group under torchrun keeps the agent's store: a prefix per attempt.
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return cls(store, f"chatloop/{attempt}/", f"{address}:{port}")

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # ---- keys ----------------------------------------------------------------------------------
    def _has(self, key: str) -> bool:
        return self.store.check([key])

    def _get(self, key: str) -> str:
        return self.store.get(key).decode()

    # ---- the coordinator's side -----------------------------------------------------------------
    def open_generation(self, generation: int) -> None:
        """Ask every worker to announce itself for ``generation``."""
        self.store.set("generation", str(generation))

    def ready(self, generation: int, num_workers: int) -> dict[int, dict[str, Any]]:
        """The workers that announced themselves for ``generation`` so far: {index: what they said}."""
        return {k: json.loads(self._get(f"ready/{generation}/{k}")) for k in range(num_workers)
                if self._has(f"ready/{generation}/{k}")}

    def start(self, generation: int) -> None:
        self.store.set(f"start/{generation}", "1")

    def end(self, generation: int) -> None:
        """Every rank leaves ``generation`` (and joins the next, unless :meth:`close_service` came first)."""
        self.store.set(f"end/{generation}", "1")

    def close_service(self, graceful: bool = True) -> None:
        """The service stops: workers leave for good once their generation ends (call before :meth:`end`).

        ``graceful``: every rank is there, and RPC goes down on all of them together; else each rank tears its
        agent down at once (a graceful shutdown would wait for the rank that is gone)."""
        self.store.set("closed", "graceful" if graceful else "at once")

    def closed(self) -> bool:
        return self._has("closed")

    def closes_gracefully(self) -> bool:
        """The service closed with every rank there (:meth:`close_service`)."""
        return self._has("closed") and self._get("closed") == "graceful"

    def evict(self, index: int, pid: int) -> None:
        """Worker ``index``'s process ``pid`` stopped answering: its supervisor kills it and starts another."""
        self.store.set(f"evict/{index}/{pid}", "1")

    def evicted(self, index: int, pid: int) -> bool:
        return self._has(f"evict/{index}/{pid}")

    def report_failure(self, index: int, reason: str) -> None:
        """A supervisor gave worker ``index`` up: why (the coordinator shows it)."""
        self.store.set(f"failed/{index}", reason)

    def failure(self, index: int) -> str | None:
        return self._get(f"failed/{index}") if self._has(f"failed/{index}") else None

    # ---- a worker's side ---------------------------------------------------------------------
    def next_generation(self, after: int, timeout_s: float) -> int | None:
        """The generation the coordinator forms once it is past ``after``; None if the service closed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._has("closed"):
                return None
            if self._has("generation"):
                generation = int(self._get("generation"))
                if generation > after and not self._has(f"end/{generation}"):
                    return generation
            time.sleep(POLL_S)
        raise RendezvousError(f"the coordinator at {self.where} formed no generation in {timeout_s:.0f} s")

    def announce(self, generation: int, index: int, info: dict[str, Any]) -> None:
        self.store.set(f"ready/{generation}/{index}", json.dumps(info))

    def wait_start(self, generation: int) -> bool:
        """Wait until ``generation`` starts (True) or ends before it started, or the service closed (False)."""
        while True:
            if self._has(f"start/{generation}"):
                return True
            if self._has(f"end/{generation}") or self._has("closed"):
                return False
            time.sleep(POLL_S)

    def wait_end(self, generation: int, poll_s: float = 0.2) -> bool:
        """Wait until ``generation`` ends; True if the service closed with it."""
        while not self._has(f"end/{generation}"):
            if self._has("closed"):
                return True
            time.sleep(poll_s)
        return self._has("closed")


# ---- torch RPC, one world per generation ------------------------------------------------------
_STORES: dict[str, Rendezvous] = {}
"""The stores of the ``init_rpc`` calls under way in this process, by the key their init URL names. torch's
rendezvous handlers are registered process-wide by URL scheme and get only the URL, so ``chatloop://`` finds its
store here; :func:`init_rpc_generation` adds one for the length of its ``init_rpc`` call only."""


def _handler(url: str, **kwargs) -> Iterator[tuple[dist.Store, int, int]]:
    query = parse_qs(urlparse(url).query)
    rendezvous = _STORES[query["store"][0]]
    generation, rank, world_size = (int(query[name][0]) for name in ("generation", "rank", "world_size"))
    yield dist.PrefixStore(f"gen{generation}/", rendezvous.store), rank, world_size
    raise RuntimeError("a ChatLoop generation does not rendezvous twice")


register_rendezvous_handler(SCHEME, _handler)


TESTED_TORCH = "2.13"
"""The torch release whose private RPC state :func:`init_rpc_generation` resets, checked by the test suite."""


def check_private_rpc_state() -> None:
    """Raise ``RuntimeError`` saying what to do if this torch lacks the private RPC state a new generation resets.

    pyproject allows torch >= 2.5 for the rest of ChatLoop, but self-healing's generations reset counters that are
    not torch's public API (``rpc._init_counter``, ``rpc.api._all_gather_*``); only TESTED_TORCH is tested.
    """
    api = getattr(rpc, "api", None)
    missing = [name for owner, name in ((rpc, "_init_counter"), (api, "_all_gather_dict_lock"),
                                        (api, "_all_gather_sequence_id"), (api, "_all_gather_sequence_id_to_states"))
               if not hasattr(owner, name)]
    if missing:
        raise RuntimeError(
            f"torch {torch.__version__} lacks torch.distributed.rpc's {', '.join(missing)}, which ChatLoop resets for "
            f"each generation of workers: install torch {TESTED_TORCH} (constraints.txt pins it)")


def init_rpc_generation(
    name: str, rank: int, world_size: int, generation: int, rendezvous: Rendezvous,
    options: rpc.TensorPipeRpcBackendOptions,
) -> None:
    """``rpc.init_rpc`` for one generation, over that generation's own keys of the store.

    torch keeps per-process counters that it assumes every rank shares (the store prefix of
    each ``init_rpc`` call, the sequence numbers of its start-up all-gather). A rank that has
    lived through earlier generations would disagree with a fresh one and the start-up waits
    out its timeout; each generation has keys of its own, so they start from zero everywhere.
    """
    check_private_rpc_state()
    key = f"{id(rendezvous)}-{generation}"
    rpc._init_counter = 0  # type: ignore[attr-defined]
    with rpc.api._all_gather_dict_lock:
        rpc.api._all_gather_sequence_id.clear()
        rpc.api._all_gather_sequence_id_to_states.clear()
    options.init_method = f"{SCHEME}://generation?store={key}&generation={generation}"
    _STORES[key] = rendezvous
    try:
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    finally:
        _STORES.pop(key, None)


def shutdown_rpc(graceful: bool, timeout_s: float = 10.0, barrier_s: float = 1.0) -> bool:
    """Tear this rank's RPC agent down; False if that hung for ``timeout_s``.

    ``graceful``: with every rank at once, after the calls in flight (the service closes), waiting
    at most ``barrier_s`` for the other ranks (torch's own default waits for ever: a rank that is
    gone held the shutdown up until ``timeout_s``), then at once anyway. Otherwise at once, without
    waiting for peers (a generation ends because one of them was lost).
    """
    done = threading.Event()

    def run() -> None:
        try:
            if graceful:
                rpc.shutdown(graceful=True, timeout=barrier_s)
            else:
                rpc.shutdown(graceful=False)
        except Exception as e:  # a dead peer fails the graceful barrier
            log.debug("RPC shutdown: %s", first_line(e))
            if graceful:
                try:
                    rpc.shutdown(graceful=False)
                except Exception:  # already torn down
                    pass
        done.set()

    threading.Thread(target=run, daemon=True, name="chatloop-rpc-shutdown").start()
    return done.wait(timeout_s)
