"""The pipeline's links: messages arrive whole and in order, only with the generation's secret, and a link says
when its peer is gone."""

from __future__ import annotations

import queue
import socket
import threading

import pytest
import torch

from chatloop.runtime.links import SECRET_CHARS, Link, LinkClosedError, LinkListener

SECRET = "a" * SECRET_CHARS


@pytest.fixture
def inbox():
    """A listener on loopback whose messages land in ``inbox.messages``."""
    messages: queue.Queue = queue.Queue()
    listener = LinkListener("127.0.0.1", lambda method, args: messages.put((method, args)), name="test")
    listener.admit(SECRET)
    listener.messages = messages
    yield listener
    listener.close()


def _closed_reasons():
    reasons: queue.Queue = queue.Queue()
    return reasons, reasons.put


def test_tensors_of_every_dtype_arrive_equal_and_in_order(inbox):
    link = Link("test", inbox.address, SECRET)
    hidden = torch.randn(2, 3, 576)
    sent = [hidden, hidden.to(torch.bfloat16), torch.arange(6).reshape(2, 3), torch.tensor([[True, False]]),
            hidden[:, :, ::2]]  # not contiguous
    for k, tensor in enumerate(sent):
        link.send("forward", (k, tensor, ("a", None, 1.5)))
    for k, tensor in enumerate(sent):
        method, (number, got, rest) = inbox.messages.get(timeout=5)
        assert (method, number, rest) == ("forward", k, ("a", None, 1.5))
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)
    link.close()


def test_a_link_without_the_secret_is_refused_before_anything_is_unpickled(inbox):
    reasons, on_closed = _closed_reasons()
    intruder = Link("test", inbox.address, "b" * SECRET_CHARS, on_closed=on_closed)
    assert reasons.get(timeout=5) == "the connection to test closed by the peer (EOF)"
    with pytest.raises(LinkClosedError, match="test is unreachable: connection closed by the peer"):
        intruder.send("forward", (2,))
    host, port = inbox.address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    raw.sendall(b"\0" * 64)  # bytes that are no secret: dropped, not unpickled
    assert raw.recv(1) == b""
    assert inbox.messages.empty()


def test_a_new_secret_drops_the_links_of_the_last_generation(inbox):
    reasons, on_closed = _closed_reasons()
    old = Link("worker1", inbox.address, SECRET, on_closed=on_closed)
    old.send("forward", (1,))
    assert inbox.messages.get(timeout=5) == ("forward", (1,))
    inbox.admit("c" * SECRET_CHARS)
    assert reasons.get(timeout=5) == "the connection to worker1 closed by the peer (EOF)"
    new = Link("worker1", inbox.address, "c" * SECRET_CHARS)
    new.send("forward", (2,))
    assert inbox.messages.get(timeout=5) == ("forward", (2,))
    with pytest.raises(ValueError, match="32 characters"):
        inbox.admit("short")


def test_a_link_says_when_its_peer_is_gone_but_not_when_it_closes_itself(inbox):
    reasons, on_closed = _closed_reasons()
    mine = Link("worker2", inbox.address, SECRET, on_closed=on_closed)
    mine.close()
    with pytest.raises(LinkClosedError, match="closed by this side"):
        mine.send("forward", (1,))
    theirs = Link("worker2", inbox.address, SECRET, on_closed=on_closed)
    inbox.close()
    assert reasons.get(timeout=5).startswith("the connection to worker2 closed")
    assert reasons.empty()  # one call, for the link the peer closed
    with pytest.raises(LinkClosedError):
        theirs.send("forward", (1,))


def test_a_link_to_nothing_names_the_peer_and_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(LinkClosedError, match=f"worker3 is unreachable at 127.0.0.1:{port}"):
            Link("worker3", f"127.0.0.1:{port}", SECRET, connect_timeout_s=2)


def test_messages_from_several_threads_do_not_interleave(inbox):
    link = Link("test", inbox.address, SECRET)
    big = torch.randn(64, 1024)

    def send_many(start: int) -> None:
        for k in range(start, start + 50):
            link.send("forward", (k, big))

    threads = [threading.Thread(target=send_many, args=(start,)) for start in (0, 1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = [inbox.messages.get(timeout=5) for _ in range(100)]
    assert sorted(args[0] for _, args in got) == list(range(50)) + list(range(1000, 1050))
    assert all(torch.equal(args[1], big) for _, args in got)
    link.close()


def test_closing_a_link_fails_a_send_blocked_on_a_peer_that_stopped_reading():
    """A stopped stage fills the socket buffer of a large message; the generation's end must not wait for it."""
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts, never reads: a SIGSTOPped stage
        host, port = server.getsockname()
        link = Link("worker1", f"{host}:{port}", SECRET)
        peer, _ = server.accept()
        outcome: queue.Queue = queue.Queue()

        def send_big() -> None:
            try:
                link.send("forward", (1, torch.zeros(8, 1024, 1024)))  # 32 MB: far past the socket buffers
                outcome.put("sent")
            except LinkClosedError as e:
                outcome.put(str(e))

        sender = threading.Thread(target=send_big)
        sender.start()
        with pytest.raises(queue.Empty):
            outcome.get(timeout=1)  # blocked
        link.close()
        assert outcome.get(timeout=5).startswith("worker1 is unreachable")
        sender.join(5)
        peer.close()
