"""Micro-batches between ranks over plain TCP: the pipeline's hot path.

A torch RPC call cost 0.45-0.6 ms on a 2-core host (TensorPipe's framing and thread pool, and
an answer for every call: a chain of answers ran back through every stage, competing with the
next step for the cores), a plain TCP hop 20 us; at batch 1 a token crosses one hop per stage
plus one. So the two calls that carry activations and token ids (``forward`` into a stage,
``deliver`` back to the coordinator) go one way over these links, with no answer; a stage that
fails reports to the coordinator over RPC, which also carries everything else (start-up,
heartbeats, progress, cancel, status).

A :class:`Link` is one TCP connection from a sender to a :class:`LinkListener`. Its first bytes
are the generation's secret, which the coordinator hands out over RPC: nothing is unpickled from
a connection that has not shown it. A link notices when its peer goes (the connection closes)
and says so to ``on_closed``: the micro-batches that peer held are lost.
"""

from __future__ import annotations

import hmac
import io
import logging
import pickle
import socket
import struct
import threading
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["Link", "LinkClosedError", "LinkListener", "SECRET_CHARS"]

log = logging.getLogger(__name__)

SECRET_CHARS = 32
"""A link's first bytes: the generation's secret, as text of this length."""
_HEADER = struct.Struct("<Q")
_MAX_FRAME = 1 << 34

Handler = Callable[[str, tuple], None]
"""What a listener runs for each message: (method, args)."""


class LinkClosedError(ConnectionError):
    """The connection under a link closed (the peer stopped, or the generation ended)."""


# ---- messages -------------------------------------------------------------------------------------------
def _tensor_from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(getattr(torch, dtype)) if dtype else tensor


class _Pickler(pickle.Pickler):
    """Tensors travel as numpy arrays: torch's own pickling goes through torch.save (~120 us a tensor, 8 here)."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach().contiguous()
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits travel as int16
                return _tensor_from_numpy, (tensor.view(torch.int16).numpy(), "bfloat16")
            return _tensor_from_numpy, (tensor.numpy(), "")
        return NotImplemented


def encode(message: tuple) -> memoryview:
    """A message as it goes on the wire: its length, then its pickle (a view of the buffer it was written into:
    not copied again, a prefill's activations are megabytes)."""
    body = io.BytesIO()
    body.write(bytes(_HEADER.size))
    _Pickler(body, protocol=5).dump(message)
    data = body.getbuffer()
    _HEADER.pack_into(data, 0, len(data) - _HEADER.size)
    return data


def _read_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buffer


def read_message(sock: socket.socket) -> tuple | None:
    """The next message on ``sock`` (None: the peer closed it)."""
    header = _read_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > _MAX_FRAME:
        raise ConnectionError(f"a message of {length} bytes: not a ChatLoop link")
    body = _read_exactly(sock, length)
    return None if body is None else pickle.loads(body)


# ---- the sender's side ----------------------------------------------------------------------------------
class Link:
    """A connection to ``peer``'s listener at ``address`` ("host:port"); :meth:`send` sends a message on it.

    ``on_closed(reason)`` is called once if the connection closes other than by :meth:`close`.
    """

    def __init__(self, peer: str, address: str, secret: str, connect_timeout_s: float = 10.0,
                 on_closed: Callable[[str], None] | None = None) -> None:
        self.peer = peer
        self.address = address
        host, _, port = address.rpartition(":")
        try:
            self._sock = socket.create_connection((host, int(port)), timeout=connect_timeout_s)
            self._sock.settimeout(None)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.sendall(secret.encode())
        except (OSError, ValueError) as e:
            raise LinkClosedError(f"{peer} is unreachable at {address}: {e}") from None
        self._state = threading.Lock()  # guards _closed; never held while sending
        self._sending = threading.Lock()  # one message at a time on the wire
        self._closed: str | None = None
        self._on_closed = on_closed
        threading.Thread(target=self._watch, name=f"chatloop-link-{peer}", daemon=True).start()

    def send(self, method: str, args: tuple) -> None:
        """Send ``method(*args)`` to the peer; LinkClosedError if the link is closed. It blocks while the peer's
        socket buffer is full (a large prefill to a stopped stage) until :meth:`close` or the peer's end."""
        message = encode((method, args))
        with self._sending:
            if self._closed is not None:
                raise LinkClosedError(f"{self.peer} is unreachable: connection {self._closed}")
            try:
                self._sock.sendall(message)
            except OSError as e:
                with self._state:
                    if self._closed is None:
                        self._closed = f"closed while sending ({e})"
                raise LinkClosedError(f"{self.peer} is unreachable: connection {self._closed}") from None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self) -> None:
        """Close the connection (no ``on_closed``: this side chose to). A send blocked on it fails at once."""
        with self._state:
            if self._closed is None:
                self._closed = "closed by this side"
        _shut(self._sock)

    def _watch(self) -> None:
        """Nothing comes back on a link: a read returns only when the peer closes the connection."""
        try:
            while self._sock.recv(4096):
                pass
            reason = "closed by the peer (EOF)"
        except OSError as e:
            reason = f"closed ({e})"
        with self._state:
            ours = self._closed == "closed by this side"
            if self._closed is None:
                self._closed = reason
        if not ours and self._on_closed is not None:
            self._on_closed(f"the connection to {self.peer} {reason}")


# ---- the receiver's side ----------------------------------------------------------------------------------
class LinkListener:
    """Accepts links on ``host`` (an ephemeral port) and runs their messages with ``handler``, in order.

    Only connections that open with the current secret (:meth:`admit`) are served; admitting a
    new secret drops the connections of the last one.
    """

    def __init__(self, host: str, handler: Handler, name: str = "listener") -> None:
        self.handler = handler
        self.name = name
        self._server = socket.create_server((host, 0))
        self.address = f"{host}:{self._server.getsockname()[1]}"
        self._secret = ""
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        threading.Thread(target=self._accept, name=f"chatloop-{name}-accept", daemon=True).start()

    def admit(self, secret: str) -> None:
        """Serve links that show ``secret`` from now on; close those of the previous one."""
        if len(secret) != SECRET_CHARS:
            raise ValueError(f"a link secret is {SECRET_CHARS} characters, not {len(secret)}")
        with self._lock:
            self._secret = secret
            old, self._connections = self._connections, set()
        for sock in old:
            _shut(sock)

    def close(self) -> None:
        with self._lock:
            self._secret = ""
            old, self._connections = self._connections, set()
        for sock in old:
            _shut(sock)
        _shut(self._server)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), name=f"chatloop-{self.name}-link", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(10.0)
            shown = _read_exactly(sock, SECRET_CHARS)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            shown = None
        with self._lock:
            admitted = (shown is not None and bool(self._secret)
                        and hmac.compare_digest(bytes(shown), self._secret.encode()))
            if admitted:
                self._connections.add(sock)
        if not admitted:
            log.warning("%s: refused a link that did not open with this generation's secret", self.name)
            _shut(sock)
            return
        try:
            while (message := read_message(sock)) is not None:
                self.handler(*message)
        except Exception as e:  # a reset connection, a closed generation, or a message the handler refused
            log.debug("%s: a link closed: %s", self.name, e)
        finally:
            with self._lock:
                self._connections.discard(sock)
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
