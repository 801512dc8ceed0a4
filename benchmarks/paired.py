"""ChatLoop's workers against its baselines, measured in turns within one run.

A sweep measures each mode in its own job, a minute or more apart, and this VM's speed drifts
by up to 1.5x within minutes: one pair of jobs gave 4 workers / 1 process ratios from 0.72 to
0.99 on the same code. This command loads every mode once, each in its own process (its own
OpenMP pool, memory and, for ``chatloop``, RPC workers), then offers the same load to each in
turn, round after round, rotating the order; ratios are taken within a round and their median
is reported. Every mode's model is in memory at once (SmolLM2 and the 1.1B shape fit; 7B does not).

    python -m benchmarks.paired --rounds 7 cluster.num_workers=4 batching.max_batch_size=16
    python -m benchmarks.paired --config-name benchmark/tinyllama model.dtype=float32 batching.max_batch_size=16 \\
        benchmark.prompt_tokens=16 benchmark.new_tokens=16
    python -m benchmarks.paired --modes inprocess,chatloop --json paired.json worker.native_kernels=false
    python -m benchmarks.paired --modes llamacpp,inprocess,chatloop model.quantization=gguf   # vs llama.cpp Q4_1

Overrides are the sweep's (``conf/benchmark/sweep.yaml``): any ChatLoop field plus ``benchmark.*``
(``benchmark.mode`` is set per contender).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import sys
from dataclasses import asdict
from itertools import combinations
from pathlib import Path

from .config import MODES

__all__ = ["Contender", "measure_paired", "main"]

ORDER = ("llamacpp", "hf", "inprocess", "chatloop", "http")  # ratios: later over earlier
LABELS = {"llamacpp": "llama.cpp", "hf": "transformers", "inprocess": "1 process", "chatloop": "workers",
          "http": "workers over HTTP"}
FIGURES = ("decode_tokens_per_s", "tokens_per_s")


def job_specs(config_name: str, overrides: list[str], modes: list[str]) -> dict[str, dict]:
    """Each mode's spec (``config`` and ``benchmark`` dicts, as the sweep writes them) from one set of overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from chatloop.config import CONF_DIR
    from chatloop.network import free_port

    from .checkpoints import resolve_model_name
    from .config import register_sweep_configs
    from .sweep import effective_config

    register_sweep_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        raw = compose(config_name=config_name, overrides=overrides)
    specs = {}
    for mode in modes:
        with open_dict(raw):
            raw.benchmark.mode = mode
        config, bench = effective_config(raw)
        config["model"]["name"] = resolve_model_name(config["model"]["name"], config["model"]["dtype"])
        if bench.free_port:
            config["cluster"]["master_port"] = free_port()
        specs[mode] = {"config": config, "benchmark": asdict(bench)}
    return specs


def _serve(mode: str, spec: dict, conn) -> None:
    """A contender's process: load (answering its start-up time, or the error), then measure once per request
    until None comes."""
    logging.basicConfig(level=logging.WARNING)
    import torch

    from .measure import ChatLoopSession, HFSession
    from .run_one import typed_spec

    try:
        cfg, bench = typed_spec(spec)
        if bench.threads:
            torch.set_num_threads(bench.threads)
        if mode == "llamacpp":
            from .llamacpp import LlamaServerSession

            session = LlamaServerSession(cfg, bench)
        elif mode == "http":
            from .http_session import ChatLoopHttpSession

            session = ChatLoopHttpSession(cfg, bench, spec)
        else:
            session = HFSession(cfg, bench) if mode == "hf" else ChatLoopSession(cfg, bench)
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})
        return
    conn.send({"startup_s": session.startup_s})
    try:
        while conn.recv() is not None:
            try:
                conn.send(session.measure())
            except Exception as e:
                conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        session.close()


class Contender:
    """One mode, loaded in a process of its own; ``measure()`` runs the load there once."""

    def __init__(self, mode: str, spec: dict) -> None:
        self.mode = mode
        self._timeout = spec["benchmark"]["timeout_s"]  # per load, and for loading
        self._conn, child = multiprocessing.Pipe()
        # Not a daemon: ChatLoop starts its workers from this process.
        self._process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(mode, spec, child), name=f"paired-{mode}")
        self._process.start()
        self.startup_s = self._answer()["startup_s"]

    def _answer(self) -> dict:
        if not self._conn.poll(self._timeout):
            raise TimeoutError(f"{self.mode}: no answer in {self._timeout:.0f} s (benchmark.timeout_s)")
        try:
            answer = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.mode}: its process exited with {self._process.exitcode}") from None
        if "error" in answer:
            raise RuntimeError(f"{self.mode}: {answer['error']}")
        return answer

    def measure(self) -> dict:
        self._conn.send("measure")
        return self._answer()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(60)
        if self._process.is_alive():
            self._process.kill()


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_paired(specs: dict[str, dict], rounds: int, bandwidth_mb: int = 0) -> dict:
    """Load every contender, then ``rounds`` rounds of one load each (order rotating); per-round ratios.

    With ``bandwidth_mb``, each round first measures the memory bandwidth here (``measure.memory_bandwidth``, while
    the contenders wait) and, where the weight bytes a decode step reads are known, every figure's fraction of the
    roofline: a full batch's step reads the weights once, so the roofline is batch x bandwidth / weight bytes
    tokens/s (KV-cache reads left out)."""
    modes = list(specs)
    contenders: dict[str, Contender] = {}
    per_round = []
    try:
        for mode in modes:  # one after another: a load has the machine to itself
            contenders[mode] = Contender(mode, specs[mode])
        weight_bytes = _weight_bytes(specs[modes[-1]]) if bandwidth_mb else None
        for r in range(rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            load = os.getloadavg()[0]
            bandwidth = _bandwidth(bandwidth_mb) if bandwidth_mb else None
            row = {"load_avg_1m": load} | {mode: contenders[mode].measure() for mode in order}
            if bandwidth:
                row["bandwidth_gbs"] = bandwidth
                if weight_bytes:
                    batch = specs[modes[-1]]["config"]["batching"]["max_batch_size"]
                    roofline = batch * bandwidth * 1e9 / weight_bytes
                    row["roofline_tokens_per_s"] = roofline
                    for mode in modes:
                        row[mode]["fraction_of_roofline"] = row[mode]["decode_tokens_per_s"] / roofline
            per_round.append(row)
    finally:
        for contender in contenders.values():
            contender.close()
    ratios = {}
    for base, other in combinations([m for m in ORDER if m in modes], 2):
        ratios[f"{other}/{base}"] = {
            figure: _spread([row[other][figure] / row[base][figure] for row in per_round]) for figure in FIGURES
        }
    result = {"specs": specs, "rounds": per_round, "ratios": ratios}
    if bandwidth_mb and weight_bytes:
        result["weight_bytes_per_token"] = weight_bytes
        result["fraction_of_roofline"] = {
            mode: _spread([row[mode]["fraction_of_roofline"] for row in per_round]) for mode in modes}
    return result


def _bandwidth(num_mb: int) -> float:
    from .measure import in_temporary_thread, memory_bandwidth

    return in_temporary_thread(memory_bandwidth, num_mb, repeats=3)["read_gbs"]


def _weight_bytes(spec: dict) -> int | None:
    """Weight bytes a batch-1 decode step reads: a GGUF file's tensors as stored (``gguf_files.bytes_per_token``),
    else ``measure.weight_bytes_per_token`` of the checkpoint."""
    from chatloop.embedded import EMBEDDED_MODELS, embedded_gguf, resolve_model

    from .measure import weight_bytes_per_token

    model = spec["config"]["model"]
    name, quantization = str(model["name"]), model["quantization"]
    if quantization == "gguf":
        from .gguf_files import bytes_per_token

        if name.lower() in EMBEDDED_MODELS:
            return bytes_per_token(embedded_gguf(name.lower()))
        return bytes_per_token(Path(name)) if name.endswith(".gguf") else None
    return weight_bytes_per_token(resolve_model(name), model["dtype"], quantization)


def _describe(spec: dict) -> str:
    config, bench = spec["config"], spec["benchmark"]
    return (
        f"{Path(config['model']['name']).name} {config['model']['dtype']}, {config['cluster']['num_workers']} workers, "
        f"batch {config['batching']['max_batch_size']}, {bench['num_requests']} requests x "
        f"({bench['prompt_tokens']} + {bench['new_tokens']}) tokens"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paired", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="hf,inprocess,chatloop", help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--config-name", default="benchmark/sweep",
                        help="a sweep file of conf/, e.g. benchmark/tinyllama")
    parser.add_argument("--json", type=Path, help="also write every round and ratio here")
    parser.add_argument("--bandwidth-mb", type=int, default=0,
                        help="measure the memory bandwidth (a tensor of this many MiB) before each round, and report "
                             "each mode's fraction of the roofline (0: do not)")
    parser.add_argument("overrides", nargs="*",
                        help="sweep overrides, e.g. cluster.num_workers=4 batching.max_batch_size=16")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or len(set(modes)) < 2:
        parser.error(f"--modes {args.modes!r}: give two or more of {', '.join(MODES)}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: need >= 1")
    specs = job_specs(args.config_name, args.overrides, modes)
    print(_describe(specs[modes[-1]]), flush=True)
    try:
        result = measure_paired(specs, args.rounds, args.bandwidth_mb)
    except (RuntimeError, TimeoutError) as e:
        print(f"paired: {e}", file=sys.stderr)
        return {}
    labels = dict(LABELS)
    for mode in ("chatloop", "http"):
        if mode in specs:
            labels[mode] = f"{specs[mode]['config']['cluster']['num_workers']} workers" + (
                " over HTTP" if mode == "http" else "")
    for r, row in enumerate(result["rounds"], 1):
        cells = [f"{labels[m]} {row[m]['decode_tokens_per_s']:.1f} ({row[m]['tokens_per_s']:.1f})" for m in modes]
        extra = ""
        if "roofline_tokens_per_s" in row:
            extra = (f" | bandwidth {row['bandwidth_gbs']:.1f} GB/s, "
                     f"roofline {row['roofline_tokens_per_s']:.0f} tok/s, "
                     "fractions " + " ".join(f"{row[m]['fraction_of_roofline']:.2f}" for m in modes))
        print(f"round {r}: decode tok/s (end-to-end): " + " | ".join(cells) + extra, flush=True)
    for name, figures in result["ratios"].items():
        other, base = name.split("/")
        d, e = figures["decode_tokens_per_s"], figures["tokens_per_s"]
        print(
            f"{labels[other]} / {labels[base]}: decode {d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}), "
            f"end-to-end {e['median']:.2f} ({e['min']:.2f}-{e['max']:.2f}), median of {args.rounds} rounds"
        )
    if "fraction_of_roofline" in result:
        print(f"weights read per token: {result['weight_bytes_per_token'] / 1e6:.1f} MB; fraction of the roofline: "
              + ", ".join(f"{labels[m]} {f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f})"
                          for m, f in result["fraction_of_roofline"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":  # the guard matters: contenders are spawned from this module
    sys.exit(0 if main() else 1)
