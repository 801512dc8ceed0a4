"""Recovery time: kill a worker in the middle of a batch of streams and time how long until they go on.

    python -m benchmarks.recovery --rounds 3                                   # SmolLM2, 4 workers, kill worker2
    python -m benchmarks.recovery --rounds 3 model.name=random:tinyllama-1.1b model.dtype=float32
    python -m benchmarks.recovery --rounds 3 --kill all                        # every worker at once

Each round offers ``--streams`` greedy streams of ``--new-tokens`` tokens, SIGKILLs the worker(s)
``--after`` seconds in, and reports: the watchdog noticing the loss (kill -> noticed), the pipeline
rebuilt (noticed -> back, ``chatloop_recovery_seconds``), and the first token of a resumed stream
(kill -> resumed: detection, rebuild and the replayed prefills). Every stream's tokens are checked
against a run without the fault. Any other argument is a Hydra override of ChatLoop's config.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time

__all__ = ["main", "measure_round"]


def _streams(llm, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    out: list[dict] = [{} for _ in prompts]

    def one(i: int) -> None:
        times, ids = [], []
        for event in llm.stream_events(prompts[i], max_new_tokens=new_tokens, ignore_eos=True):
            times.extend([time.monotonic()] * len(event.token_ids))
            ids.extend(event.token_ids)
        out[i] = {"ids": ids, "times": times}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def measure_round(llm, prompts: list[list[int]], new_tokens: int, after_s: float, victims: list[int],
                  reference: list[dict]) -> dict:
    """One fault: the figures of the module's docstring, in seconds."""
    watchdog = llm.cluster.watchdog
    done = len(watchdog.recovery_seconds)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(streams=_streams(llm, prompts, new_tokens)))
    runner.start()
    time.sleep(after_s)
    pids = [llm.describe_stages(10.0)[k].pid for k in victims]
    killed = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    runner.join()
    streams = result["streams"]
    if [s["ids"] for s in streams] != [s["ids"] for s in reference]:
        raise AssertionError("a stream's tokens changed across the fault")
    resumed = []
    for s in streams:
        gaps = [(b - a, b) for a, b in zip(s["times"], s["times"][1:]) if b > killed]
        if gaps:
            resumed.append(max(gaps)[1])
    if len(watchdog.recovery_seconds) != done + 1:
        raise AssertionError(f"expected one recovery, the watchdog made {len(watchdog.recovery_seconds) - done}")
    return {
        "kill_to_noticed_s": watchdog.last_noticed - killed,
        "noticed_to_back_s": watchdog.recovery_seconds[-1],
        "kill_to_resumed_s": min(resumed) - killed,
        "replays": llm.stats().replays,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--after", type=float, default=None, help="seconds into the batch (default: a third of it)")
    parser.add_argument("--kill", default="worker2", help="a worker's name, or 'all'")
    parser.add_argument("--json", help="also write the rounds here")
    ns, overrides = parser.parse_known_args(argv)
    if ns.rounds < 1:
        parser.error("--rounds must be at least 1")

    from chatloop import ChatLoop, load_config

    from .checkpoints import resolve_model_name
    from .measure import make_prompts

    cfg = load_config(["cluster.num_workers=4", *overrides])
    cfg.model.name = resolve_model_name(cfg.model.name, cfg.model.dtype)
    with ChatLoop.start(cfg) as llm:
        prompts = make_prompts(ns.streams, ns.prompt_tokens, llm.vocab_size, 0)
        started = time.monotonic()
        reference = _streams(llm, prompts, ns.new_tokens)
        batch_s = time.monotonic() - started
        after = ns.after if ns.after is not None else batch_s / 3
        victims = (list(range(cfg.cluster.num_workers)) if ns.kill == "all"
                   else [llm.stage_names.index(ns.kill)])
        print(f"{cfg.model.name}, {cfg.cluster.num_workers} workers, {ns.streams} streams x ({ns.prompt_tokens} + "
              f"{ns.new_tokens}) tokens: {batch_s:.1f} s without a fault; killing {ns.kill} {after:.1f} s in")
        rounds = []
        for r in range(ns.rounds):
            rounds.append(measure_round(llm, prompts, ns.new_tokens, after, victims, reference))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in rounds[-1].items()), flush=True)
    for key in ("kill_to_noticed_s", "noticed_to_back_s", "kill_to_resumed_s"):
        values = [r[key] for r in rounds]
        print(f"{key}: median {statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f})")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"model": cfg.model.name, "kill": ns.kill, "batch_s": batch_s, "rounds": rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
