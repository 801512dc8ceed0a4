"""``chatloop-generate`` and ``chatloop-chat``: Hydra apps over ``conf/``.

    chatloop-generate prompt='The capital of France is' chat=false max_new_tokens=16 sampling.temperature=0
    chatloop-chat cluster.num_workers=2

With no overrides they run the embedded SmolLM2 split over 4 workers, spawned on this
machine. Under torchrun every rank runs the same command: rank 0 becomes the coordinator,
the others workers (``torchrun --nproc-per-node 5 --no-python chatloop-generate ...``).

SIGTERM, at any moment (starting, generating, serving), shuts the cluster down and ends the process with
status 143 within about a second, its workers with it; so does ``docker stop`` where the command is a
container's PID 1 (which ignores any signal it has no handler for).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from .config import CONF_DIR, ChatLoopConfig, register_configs, to_config

__all__ = ["Terminated", "generate_main", "chat_main", "run_rank"]

register_configs()


def run_rank(cfg: ChatLoopConfig, coordinator: Callable[[ChatLoopConfig], None]) -> None:
    """Run ``coordinator(cfg)`` on rank 0; on the other torchrun ranks, supervise a worker process."""
    from .engine.pipeline import stage_name
    from .network import under_torchrun
    from .runtime import StartupError

    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rank = int(os.environ.get("RANK", "0")) if under_torchrun() else 0
    if rank > 0:
        try:
            sys.exit(_supervise_rank(rank - 1, cfg))
        except (OSError, RuntimeError) as e:
            raise StartupError(f"{stage_name(rank - 1)}: {e}") from None
    coordinator(cfg)


def _supervise_rank(index: int, cfg: ChatLoopConfig) -> int:
    """A torchrun worker rank: run worker ``index`` as a child process and start it again when it dies.

    The rank itself never fails (that would make torchrun stop every rank, the coordinator with
    its running requests): the coordinator replaces the lost stage in a new generation.
    """
    import shutil

    from .network import rank_interfaces
    from .runtime.processes import write_config
    from .runtime.rendezvous import Rendezvous
    from .runtime.supervisor import WorkerSupervisor, supervise_forever

    os.environ.update(rank_interfaces(os.environ["MASTER_ADDR"], dict(os.environ)))
    config_file = write_config(cfg)
    rendezvous = Rendezvous.torchrun(cfg.cluster.startup_timeout_s)
    supervisor = WorkerSupervisor.for_worker(cfg, index, config_file, "torchrun")
    try:
        return supervise_forever(supervisor, closed=rendezvous.closed,
                                 evicted=lambda pid: rendezvous.evicted(index, pid),
                                 report=lambda reason: rendezvous.report_failure(index, reason))
    finally:
        supervisor.stop()
        shutil.rmtree(config_file.parent, ignore_errors=True)


class Terminated(SystemExit):
    """SIGTERM came: raised in the main thread, it unwinds the stack (``with ChatLoop...`` shuts the cluster down
    on its way), and the command then ends with status 143 (:func:`hydra_app`)."""


_TERMINATING = threading.Event()


def _on_sigterm(signum: int, _frame) -> None:
    if _TERMINATING.is_set():  # one is enough: a second one must not cut the shutdown short
        return
    _TERMINATING.set()
    raise Terminated(128 + signum)


def _exit_now(code: int) -> None:
    """End the process with ``code`` once the cluster is shut down, its log written out, without the interpreter's
    exit (which first collects every object of torch, transformers and the model: seconds on a small machine)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _start(cfg: ChatLoopConfig):
    """``ChatLoop.start`` with Ctrl-C (SIGINT) and SIGTERM blocked in every thread it starts (threads inherit the
    mask), so that the kernel hands them to the main thread rather than to them: one handed to another thread
    interrupts no wait of the main thread. Threads started before (torch's own) may still take it: hence
    :class:`_StdinLines`."""
    from .api import ChatLoop

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return ChatLoop.start(cfg)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _generate(cfg: ChatLoopConfig) -> None:
    with _start(cfg) as llm:
        for piece in llm.stream(cfg.prompt, chat=cfg.chat, **_sampling(cfg)):
            print(piece, end="", flush=True)
        print()


class _StdinLines:
    """Lines of standard input that wait in steps of 0.2 s: a Ctrl-C is raised in the main thread at the next step
    even where the kernel handed SIGINT to another thread, which interrupts no read. (The Ctrl-C test's hangs
    turned out to be an ignored SIGINT inherited from pytest, fixed in the test; this guards the other case.)"""

    def __init__(self) -> None:
        self.fd, self.pending = sys.stdin.fileno(), b""

    def read(self, prompt: str) -> str:
        print(prompt, end="", flush=True)
        while b"\n" not in self.pending:
            if not select.select([self.fd], [], [], 0.2)[0]:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:  # end of input: the last line, or Ctrl-D
                if not self.pending:
                    raise EOFError
                break
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode(errors="replace")


def _chat(cfg: ChatLoopConfig) -> None:
    with _start(cfg) as llm:
        messages: list[dict] = []
        lines = _StdinLines()
        print("ChatLoop chat: type a message, /reset to start over, Ctrl-D or /quit to leave.", flush=True)
        while True:
            try:
                line = lines.read("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if line in ("/quit", "/exit"):
                return
            if line == "/reset":
                messages.clear()
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            answer = []
            try:
                for piece in llm.stream(messages, chat=True, **_sampling(cfg)):
                    answer.append(piece)
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:  # stop this answer, keep the conversation
                print(" [interrupted]", end="")
            print(flush=True)
            messages.append({"role": "assistant", "content": "".join(answer)})


def _sampling(cfg: ChatLoopConfig) -> dict:
    s = cfg.sampling
    return dict(
        max_new_tokens=cfg.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        repetition_penalty=s.repetition_penalty, seed=s.seed, stop=tuple(s.stop),
    )


def hydra_app(coordinator: Callable[[ChatLoopConfig], None], program: str = "chatloop") -> Callable[[], None]:
    """A console command over conf/: bad config prints one error line and exits 2; runs ``coordinator`` on rank 0."""
    @hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
    def app(raw: DictConfig) -> None:
        try:
            cfg = to_config(raw)
            run_rank(cfg, coordinator)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"{program}: error: {e}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        # Before Hydra reads the command line: it would write the key into the run folder.
        if any(arg.lstrip("+~").startswith("server.api_key=") for arg in sys.argv[1:]):
            print(f"{program}: error: do not put the API key on the command line (ps shows it, and it would be "
                  "written to the run folder): set CHATLOOP_API_KEY, or server.api_key_file=PATH", file=sys.stderr)
            sys.exit(2)
        # Python's default for SIGTERM is to die on the spot: the workers then noticed within 0.5 s, the temporary
        # config folder stayed behind, and as a container's PID 1 the signal was ignored (docker stop: 10 s, then
        # SIGKILL). uvicorn (chatloop-serve) handles it while it serves and raises it again after: it lands here.
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            app()
        except Terminated as e:
            logging.getLogger(__name__).info("%s: stopped by SIGTERM", program)
            _exit_now(int(e.code or 143))

    return main


generate_main = hydra_app(_generate, program="chatloop-generate")
chat_main = hydra_app(_chat, program="chatloop-chat")
