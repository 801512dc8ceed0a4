"""End-to-end sweeps: a Hydra app whose every job measures one configuration in a fresh process.

    python -m benchmarks.sweep -m cluster.num_workers=1,2,4 batching.max_batch_size=1,4,16
    python -m benchmarks.sweep -m --config-name benchmark/baselines           # a sweep kept in conf/benchmark/
    python -m benchmarks.sweep benchmark.mode=hf batching.max_batch_size=4    # one job
    python -m benchmarks.report multirun/2026-11-26/12-00-00/results.jsonl --out report/

The configuration is ``conf/benchmark/sweep.yaml``: ChatLoop's whole configuration (any
``model.*``, ``cluster.*``, ``batching.*``, ``cache.*``, ``worker.*`` override) plus the
``benchmark`` node (:class:`benchmarks.config.BenchmarkConfig`). ``model.name=random:SHAPE``
names a random-weight checkpoint (:mod:`benchmarks.checkpoints`), written on first use.

torch.distributed.rpc starts once per process while Hydra's basic launcher runs every job in
this one, so each job writes its resolved configuration to its output folder and runs
``python -m benchmarks.run_one`` on it. Each job appends one JSON line to the results file
(default ``results.jsonl`` in the sweep folder); a failed job appends a row with ``error`` and
the sweep goes on. Baselines do not depend on the cluster: a job of mode ``hf`` or
``inprocess`` that repeats an earlier row of the same sweep (same model, dtype, batch and
load) is skipped, so ``benchmark.mode=hf,inprocess,chatloop cluster.num_workers=1,2,4``
measures each baseline once per batch size.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from chatloop.config import CONF_DIR
from chatloop.network import free_port

from .config import BenchmarkConfig, SweepConfig, register_sweep_configs
from .results import append_row, read_rows

__all__ = ["main", "run_job", "effective_config"]

log = logging.getLogger("benchmarks.sweep")
REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1

register_sweep_configs()


def effective_config(raw: DictConfig) -> tuple[dict, BenchmarkConfig]:
    """The job's ChatLoop configuration (as a plain dict) after the mode's adjustments, and its benchmark fields."""
    typed: SweepConfig = OmegaConf.to_object(raw)  # runs every __post_init__ check
    bench = typed.benchmark
    config = OmegaConf.to_container(raw, resolve=True)
    config.pop("benchmark")
    if bench.mode == "inprocess":
        # ChatLoop with one stage in one process: the cluster's settings do not apply.
        config["cluster"].update(num_workers=1, in_process=True, workers=[], max_in_flight=None)
        config["model"]["partitions_dir"] = None
    return config, bench


def _baseline_key(config: dict, bench: BenchmarkConfig) -> str:
    """What makes two baseline jobs the same measurement (the cluster's settings do not)."""
    relevant = {
        "model": config["model"],
        "batching": config["batching"],
        "mode": bench.mode,
        "load": [bench.num_requests, bench.prompt_tokens, bench.new_tokens, bench.warmup_new_tokens, bench.seed],
        "tag": bench.tag,  # benchmark.tag=r1,r2,r3 repeats the baselines too
    }
    if bench.mode == "inprocess":
        relevant.update(cache=config["cache"])
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _results_path(bench: BenchmarkConfig, hc) -> Path:
    if bench.results:
        return Path(bench.results)
    folder = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.runtime.output_dir
    return Path(folder) / "results.jsonl"


def run_job(raw: DictConfig) -> dict | None:
    """Measure the job's configuration in a fresh process; append and return its row (None when skipped)."""
    from .checkpoints import resolve_model_name

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    sweep = str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else str(job_dir)
    row: dict = {
        "schema": SCHEMA_VERSION,
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "sweep": sweep,
        "job": hc.job.num if hc.mode == RunMode.MULTIRUN else 0,
        "overrides": list(hc.overrides.task),
        "mode": OmegaConf.select(raw, "benchmark.mode"),
        "model": OmegaConf.select(raw, "model.name"),
    }
    try:
        config, bench = effective_config(raw)
    except Exception as e:  # a bad value: recorded, the sweep goes on
        row["error"] = f"{type(e).__name__}: {e}"
        results = Path(OmegaConf.select(raw, "benchmark.results") or Path(sweep) / "results.jsonl")
        append_row(results, row)
        log.error("job %s: %s", row["job"], row["error"])
        return row
    results = _results_path(bench, hc)
    row.update(
        tag=bench.tag,
        dtype=config["model"]["dtype"],
        num_workers=config["cluster"]["num_workers"] if bench.mode != "hf" else 1,
        in_process=bench.mode != "chatloop" or bool(config["cluster"]["in_process"]),
        max_batch_size=config["batching"]["max_batch_size"],
        num_requests=bench.num_requests,
        prompt_tokens=bench.prompt_tokens,
        new_tokens=bench.new_tokens,
        worker_threads=config["worker"]["worker_threads"],
        key=_baseline_key(config, bench),
    )
    if bench.mode in ("hf", "inprocess"):
        done = [
            r
            for r in read_rows(results)
            if r.get("sweep") == sweep and r.get("key") == row["key"] and not r.get("error")
        ]
        if done:
            log.info(
                "job %s: %s baseline already measured in this sweep (job %s): skipped",
                row["job"],
                bench.mode,
                done[0].get("job"),
            )
            return None
    try:
        config["model"]["name"] = resolve_model_name(config["model"]["name"], config["model"]["dtype"])
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        append_row(results, row)
        return row
    if bench.free_port:
        config["cluster"]["master_port"] = free_port()
    spec = job_dir / "spec.json"
    spec.write_text(
        json.dumps({"config": config, "benchmark": OmegaConf.to_container(raw.benchmark, resolve=True)}, indent=2)
    )
    out, log_path = job_dir / "result.json", job_dir / "run_one.log"
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.monotonic()
    log.info("job %s: %s", row["job"], " ".join(row["overrides"]) or "(defaults)")
    with open(log_path, "w") as log_file:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.run_one", str(spec), str(out)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=bench.timeout_s,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    row["job_s"] = round(time.monotonic() - started, 3)
    row["log"] = str(log_path)
    if out.is_file():
        row.update(json.loads(out.read_text()))
    if code is None:
        row["error"] = f"timed out after {bench.timeout_s:.0f} s (benchmark.timeout_s)"
    elif code != 0 and "error" not in row:
        row["error"] = f"benchmarks.run_one exited with {code}: {_tail(log_path)}"
    row["config"] = config
    append_row(results, row)
    _print_summary(row, results)
    return row


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:])


def _print_summary(row: dict, results: Path) -> None:
    what = (
        f"{row['mode']} {row['model']} {row.get('dtype')} workers={row.get('num_workers')} "
        f"batch={row.get('max_batch_size')}"
    )
    if row.get("error"):
        print(f"[job {row['job']}] {what}: ERROR {row['error']} (log: {row.get('log')})", flush=True)
        return
    print(
        f"[job {row['job']}] {what}: {row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_ms']['p50']:.1f} ms, "
        f"ITL p50 {row['itl_ms']['p50']:.1f} ms p99 {row['itl_ms']['p99']:.1f} ms -> {results}",
        flush=True,
    )


@hydra.main(config_path=CONF_DIR, config_name="benchmark/sweep", version_base=None)
def main(raw: DictConfig) -> None:
    row = run_job(raw)
    if row and row.get("error") and HydraConfig.get().mode == RunMode.RUN:
        sys.exit(1)  # one job: fail; a multirun goes on to the next job


if __name__ == "__main__":
    main()
