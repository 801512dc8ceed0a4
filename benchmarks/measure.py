"""One end-to-end measurement in this process: ChatLoop (RPC or in-process) or transformers' generate().

Every mode gets the same load: ``num_requests`` prompts of ``prompt_tokens`` random token ids
(seeded, below the model's vocabulary), offered at once, each generating exactly
``new_tokens`` tokens greedily (end-of-sequence ignored). ChatLoop batches them continuously
up to ``batching.max_batch_size``; transformers runs them in static batches of that size
(left padded, ``min_new_tokens = max_new_tokens``). Times are taken where the caller sees the
tokens: ChatLoop's stream events, transformers' streamer.

torch.distributed.rpc starts once per process: call :func:`run` once per process
(``benchmarks.run_one`` is that process).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import psutil
import torch

from chatloop.config import ChatLoopConfig

from .config import BenchmarkConfig

__all__ = [
    "run", "ChatLoopSession", "HFSession", "memory_bandwidth", "weight_bytes_per_token", "make_prompts", "summarize",
    "host_info",
]

log = logging.getLogger(__name__)


# ---- helpers shared by every mode -------------------------------------------------------------
def summarize(values_s: list[float]) -> dict:
    """p50 / p99 / mean in milliseconds of a list of durations in seconds."""
    if not values_s:
        return {"p50": None, "p99": None, "mean": None, "n": 0}
    ordered = sorted(values_s)

    def pct(q: float) -> float:
        # Nearest rank on the sorted values: p99 of 10 values is the largest.
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))] * 1e3

    return {
        "p50": statistics.median(ordered) * 1e3,
        "p99": pct(0.99),
        "mean": statistics.fmean(ordered) * 1e3,
        "n": len(ordered),
    }


def make_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``num`` prompts of ``length`` random token ids in [min(256, vocab/2), vocab_size), the same for a seed."""
    low = min(256, vocab_size // 2)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (num, length), generator=generator).tolist()


def memory_bandwidth(num_mb: int, threads: int | None = None, repeats: int = 5) -> dict:
    """Best-of-``repeats`` bandwidth of reading and copying (read + write) a ``num_mb`` MiB tensor, GB/s.

    Reading is timed twice: torch's ``sum`` (one stream per thread) and ChatLoop's kernel reading
    four streams per thread, as its linear layers read weights; ``read_gbs`` is the faster, so
    a decode step is held to the best read rate anything here reaches.
    """
    from chatloop.kernels import load_kernels, stream_read

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.ones(num_mb * 2**20 // 4, dtype=torch.float32)
        y = torch.empty_like(x)
        nbytes = x.numel() * 4
        readers = {"sum": x.sum}
        if load_kernels() is not None and x.numel() % 4096 == 0:
            readers["stream"] = lambda: stream_read(x)
        best = dict.fromkeys(readers, float("inf"))
        copy = float("inf")
        x.sum(), y.copy_(x)  # touch every page first
        for _ in range(repeats):
            for name, read in readers.items():
                t = time.perf_counter()
                read()
                best[name] = min(best[name], time.perf_counter() - t)
            t = time.perf_counter()
            y.copy_(x)
            copy = min(copy, time.perf_counter() - t)
        rates = {f"{name}_gbs": nbytes / seconds / 1e9 for name, seconds in best.items()}
        return {
            "read_gbs": max(rates.values()),
            **rates,
            "copy_gbs": 2 * nbytes / copy / 1e9,
            "threads": torch.get_num_threads(),
            "mb": num_mb,
        }
    finally:
        torch.set_num_threads(saved)


def weight_bytes_per_token(folder: str | Path, dtype: str, quantization: str | None = None) -> int | None:
    """Weight bytes one batch-1 decode step reads in ``dtype``: every tensor once, the input embedding not at all;
    with ``quantization`` (``int8``, ``int4``) the quantized tensors in their blocks' bytes. None for ``gguf``
    (the file decides the formats).

    The embedding is a lookup of one row per token; a tied head reads the embedding matrix
    (counted once). This is the numerator of the memory-bandwidth roofline.
    """
    from chatloop.models import ModelArgs, family_of
    from chatloop.partition.splitter import CheckpointSource
    from chatloop.quant import BLOCK, BLOCK_BYTES
    from chatloop.quant.scheme import format_for

    if quantization == "gguf":
        return None

    folder = Path(folder)
    args = ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text()))
    family = family_of(args)
    source = CheckpointSource.open(folder)
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    total = 0
    for name in source.names:
        key = family.canonical(name)
        if key.endswith(family.ignored_suffixes) or not source.dtypes[name].is_floating_point:
            continue
        if key.startswith(family.first_prefixes) and not (args.tie_word_embeddings and key == family.tied_key):
            continue
        if key == "lm_head.weight" and args.tie_word_embeddings:
            continue  # a tied checkpoint that stores the head too: counted as the embedding
        numel = source.sizes[name] // source.dtypes[name].itemsize
        fmt = format_for(key, tuple(source.shapes[name]), quantization) if quantization else None
        total += numel * BLOCK_BYTES[fmt] // BLOCK if fmt else numel * element
    return total


def host_info() -> dict:
    import transformers

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total,
        "load_avg_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# ---- ChatLoop ---------------------------------------------------------------------------------
class StepRecorder:
    """Observes the pipeline (``Pipeline.add_observer``): when the coordinator sent each micro-batch and got its
    tokens."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int, int, float, float]] = []  # (id, sequences, tokens per sequence, sent, done)

    def __call__(self, record) -> None:
        self.records.append((record.micro_batch, record.num_sequences, record.num_tokens, record.sent, record.done))


def _drive(submit, prompts: list[list[int]], new_tokens: int, timeout: float) -> tuple[list[float], list[list[float]]]:
    """Offer every prompt at once; return each request's submit time and its tokens' arrival times (perf_counter)."""
    from chatloop import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    arrivals: list[list[float]] = [[] for _ in prompts]
    submitted: list[float] = []
    finished = threading.Semaphore(0)
    errors: list[str] = []

    def emitter(i: int):
        def emit(event) -> None:
            now = time.perf_counter()
            arrivals[i].extend([now] * len(event.token_ids))
            if event.finish_reason is not None:
                if event.error is not None or event.finish_reason not in ("length", "stop"):
                    errors.append(f"request {i} ended with {event.finish_reason}: {event.error}")
                finished.release()

        return emit

    for i, prompt in enumerate(prompts):
        submitted.append(time.perf_counter())
        submit(prompt, params, emitter(i))
    deadline = time.monotonic() + timeout
    for _ in prompts:
        if not finished.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"the requests did not finish in {timeout:.0f} s")
    if errors:
        raise RuntimeError(errors[0])
    return submitted, arrivals


def _stage_stats(llm) -> list[dict]:
    """Every stage's report, as a dict (an in-process stage's ``rss_bytes`` is the coordinator's)."""
    return [report.as_dict() for report in llm.describe_stages(timeout=30.0)]


def _take_timings(llm) -> dict[str, list[tuple[int, float, float]]]:
    """Each stage's (micro-batch, start, end) since the last call, in wall-clock seconds; forgets them."""
    return {name: [tuple(t) for t in rows] for name, rows in llm.pipeline.take_timings().items()}


def _check_capacity(llm, cfg: ChatLoopConfig, bench: BenchmarkConfig) -> None:
    """Refuse a load whose concurrent sequences do not fit the KV cache: they would queue and distort the numbers."""
    concurrent = min(bench.num_requests, cfg.batching.max_batch_size)
    per_sequence = -(-(bench.prompt_tokens + bench.new_tokens) // cfg.cache.block_size)
    num_blocks = llm.stats().kv_blocks_total
    if concurrent * per_sequence > num_blocks:
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks of {cfg.cache.block_size} tokens per stage, "
            f"{concurrent} sequences of {bench.prompt_tokens} + {bench.new_tokens} tokens need "
            f"{concurrent * per_sequence}: raise cache.kv_cache_mb"
        )


class ChatLoopSession:
    """ChatLoop started and warmed up for a load: ``measure()`` offers it once; ``close()`` stops ChatLoop."""

    def __init__(self, cfg: ChatLoopConfig, bench: BenchmarkConfig) -> None:
        from chatloop import ChatLoop
        from chatloop.api import prepare_partitions

        in_temporary_thread(prepare_partitions, cfg)  # a first split converts tensors: not on this thread
        started = time.perf_counter()
        self.llm = ChatLoop.start(cfg)
        self.startup_s = time.perf_counter() - started
        self.batch_size, self.new_tokens, self.timeout_s = (
            cfg.batching.max_batch_size, bench.new_tokens, bench.timeout_s)
        try:
            _check_capacity(self.llm, cfg, bench)
            self.prompts = make_prompts(bench.num_requests, bench.prompt_tokens, self.llm.vocab_size, bench.seed)
            self.recorder = StepRecorder()
            self.llm.pipeline.add_observer(self.recorder)
            if bench.warmup_new_tokens:
                _drive(self.llm.submit, self.prompts[: self.batch_size], bench.warmup_new_tokens, bench.timeout_s)
        except BaseException:
            self.llm.shutdown()
            raise

    def measure(self) -> dict:
        """Offer every prompt at once and return the client-side figures (:func:`_latency_metrics`)."""
        self.t0_wall, self.t0 = time.time(), time.perf_counter()
        submitted, arrivals = _drive(self.llm.submit, self.prompts, self.new_tokens, self.timeout_s)
        return _latency_metrics(self.t0, submitted, arrivals, self.batch_size)

    def close(self) -> None:
        self.llm.shutdown()


def measure_chatloop(cfg: ChatLoopConfig, bench: BenchmarkConfig) -> dict:
    session = ChatLoopSession(cfg, bench)
    llm, recorder = session.llm, session.recorder
    try:
        before = {s["name"]: s for s in _stage_stats(llm)}
        _take_timings(llm)
        recorder.records.clear()
        result = session.measure()
        after = _stage_stats(llm)
        timings = _take_timings(llm)
        records = list(recorder.records)
        max_in_flight = llm.scheduler.max_in_flight
        coordinator_rss = psutil.Process().memory_info().rss  # with the stages loaded, for the in-process modes
    finally:
        session.close()
    t0_wall, t0, startup_s = session.t0_wall, session.t0, session.startup_s
    elapsed = result["elapsed_s"]
    stages = []
    for s in after:
        b = before.get(s["name"], {})
        busy = (s.get("busy_s") or 0.0) - (b.get("busy_s") or 0.0)
        stages.append(
            {
                "name": s["name"],
                "layers": s.get("layers"),
                "rss_bytes": s.get("rss_bytes"),
                "busy_s": busy,
                "busy_fraction": busy / elapsed if elapsed > 0 else None,
                "num_micro_batches": (s.get("num_micro_batches") or 0) - (b.get("num_micro_batches") or 0),
                "partition_bytes": s.get("partition_bytes"),
                "kv_cache_bytes": s.get("kv_cache_bytes"),
                "threads": s.get("threads"),
                "cores": s.get("cores"),
                "error": s.get("error"),
            }
        )
    round_trips = [done - sent for _, _, _, sent, done in records]
    decode = [done - sent for _, _, n, sent, done in records if n == 1]
    result.update(
        startup_s=startup_s,
        max_in_flight=max_in_flight,
        coordinator_rss_bytes=coordinator_rss,
        stages=stages,
        micro_batches={
            "count": len(records),
            "mean_sequences": statistics.fmean(r[1] for r in records) if records else None,
            "round_trip_ms": summarize(round_trips),
            "decode_round_trip_ms": summarize(decode),
        },
    )
    if bench.timeline:
        result["timeline"] = {
            "stages": {
                name: [[mb, round(a - t0_wall, 6), round(b - t0_wall, 6)] for mb, a, b in rows]
                for name, rows in timings.items()
            },
            "coordinator": [[mb, n, t, round(a - t0, 6), round(b - t0, 6)] for mb, n, t, a, b in records],
        }
    return result


def stream_all(prompts: list[list[int]], timeout_s: float, one) -> tuple[list[float], list[list[float]]]:
    """Stream every prompt at once over HTTP: ``one(client, prompt, arrivals)`` sends one request, appends each
    token's arrival time (``time.perf_counter()``) to ``arrivals`` and returns when it was sent. Returns (sent,
    arrivals) per prompt: how a server that batches by itself (llama-server, ChatLoop's) is offered a load."""
    import asyncio

    import httpx

    async def run() -> tuple[list[float], list[list[float]]]:
        arrivals: list[list[float]] = [[] for _ in prompts]
        limits = httpx.Limits(max_connections=len(prompts) + 1)
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
            sent = await asyncio.gather(*(one(client, p, a) for p, a in zip(prompts, arrivals)))
        return list(sent), arrivals

    return asyncio.run(run())


def streamed_metrics(server: str, t0: float, sent: list[float], arrivals: list[list[float]], new_tokens: int,
                     batch_size: int) -> dict:
    """:func:`_latency_metrics` of a :func:`stream_all` load, once every request streamed ``new_tokens`` tokens."""
    short = [len(a) for a in arrivals if len(a) != new_tokens]
    if short:
        raise RuntimeError(f"{server} streamed {short[0]} tokens of {new_tokens} for a request")
    return _latency_metrics(t0, sent, arrivals, batch_size)


def _latency_metrics(t0: float, submitted: list[float], arrivals: list[list[float]], batch_size: int) -> dict:
    """Client-side figures of one load. ``decode_tokens_per_s`` is the steady decode rate of a full
    batch: min(batch size, requests) tokens every median inter-token gap; prefill, which the
    end-to-end ``tokens_per_s`` includes (SmolLM2's 16 prompts of 64 tokens take as long as ~12 of its
    batch-16 decode steps), is left out."""
    end = max(a[-1] for a in arrivals)
    elapsed = end - t0
    tokens = sum(len(a) for a in arrivals)
    ttft = [a[0] - s for s, a in zip(submitted, arrivals)]
    itl = [later - earlier for a in arrivals for earlier, later in itertools.pairwise(a)]
    per_request_decode = [(len(a) - 1) / (a[-1] - a[0]) for a in arrivals if len(a) > 1 and a[-1] > a[0]]
    itl_p50 = statistics.median(itl) if itl else None
    return {
        "elapsed_s": elapsed,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "decode_tokens_per_s": min(batch_size, len(arrivals)) / itl_p50 if itl_p50 else None,
        "ttft_ms": summarize(ttft),
        "itl_ms": summarize(itl),
        "request_decode_tokens_per_s": statistics.fmean(per_request_decode) if per_request_decode else None,
    }


# ---- transformers -----------------------------------------------------------------------------
class _StepTimes:
    """A transformers streamer that only notes when each step's tokens arrive (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] with every prompt right-aligned (transformers' batched generate)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids, mask


class HFSession:
    """A transformers model loaded and warmed up for a load: ``measure()`` runs ``generate()`` over it once,
    in batches of ``batching.max_batch_size`` (left padding, greedy, exactly ``new_tokens`` each)."""

    def __init__(self, cfg: ChatLoopConfig, bench: BenchmarkConfig) -> None:
        from transformers import AutoModelForCausalLM

        from chatloop.embedded import resolve_model

        folder = resolve_model(cfg.model.name)
        started = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, cfg.model.dtype)).eval()
        self.startup_s = time.perf_counter() - started
        config = self.model.config
        self.prompts = make_prompts(bench.num_requests, bench.prompt_tokens, config.vocab_size, bench.seed)
        self.batch_size, self.new_tokens = cfg.batching.max_batch_size, bench.new_tokens
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        if bench.warmup_new_tokens:
            self._generate(self.prompts[: self.batch_size], bench.warmup_new_tokens)

    def _generate(self, batch: list[list[int]], new_tokens: int) -> list[float]:
        ids, mask = left_pad(batch, self.pad_id)
        streamer = _StepTimes()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad_id,
                streamer=streamer,
                use_cache=True,
            )
        assert out.shape[1] == ids.shape[1] + new_tokens, (
            f"generate() made {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}"
        )
        return streamer.times

    def measure(self) -> dict:
        """All prompts, offered at once like ChatLoop's requests; the client-side figures (:func:`_latency_metrics`)."""
        t0 = time.perf_counter()
        submitted = [t0] * len(self.prompts)
        arrivals: list[list[float]] = []
        for first in range(0, len(self.prompts), self.batch_size):
            batch = self.prompts[first : first + self.batch_size]
            steps = self._generate(batch, self.new_tokens)
            arrivals.extend([list(steps) for _ in batch])
        return _latency_metrics(t0, submitted, arrivals, self.batch_size)

    def close(self) -> None:
        del self.model


def measure_hf(cfg: ChatLoopConfig, bench: BenchmarkConfig) -> dict:
    session = HFSession(cfg, bench)
    result = session.measure()
    result.update(
        startup_s=session.startup_s,
        max_in_flight=1,
        coordinator_rss_bytes=psutil.Process().memory_info().rss,  # the model is still loaded
        stages=[],
    )
    return result


# ---- the entry point ----------------------------------------------------------------------------
def in_temporary_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on a thread that ends with it, taking its OpenMP pool along.

    A pool left on this (main) thread would slow the stages' compute thread in the in-process
    modes (see chatloop.engine.pipeline.compute_thread); the HF baseline computes on this thread.
    """
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(fn, *args, **kwargs).result()


def run(cfg: ChatLoopConfig, bench: BenchmarkConfig) -> dict:
    """Measure bandwidth, then the configured mode; return the row's measured fields."""
    from chatloop.embedded import resolve_model

    if bench.threads:
        torch.set_num_threads(bench.threads)
    result: dict = {"host": host_info(), "coordinator_threads": torch.get_num_threads()}
    if bench.bandwidth_mb:
        result["bandwidth"] = in_temporary_thread(memory_bandwidth, bench.bandwidth_mb)
    folder = in_temporary_thread(resolve_model, cfg.model.name)  # may write a random checkpoint first
    result["model_path"] = str(folder)
    result["weight_bytes_per_token"] = weight_bytes_per_token(folder, cfg.model.dtype, cfg.model.quantization)
    if bench.mode == "hf":
        result.update(measure_hf(cfg, bench))
    elif bench.mode == "llamacpp":
        from .llamacpp import LlamaServerSession

        session = LlamaServerSession(cfg, bench)
        try:
            result.update(session.measure(), startup_s=session.startup_s)
        finally:
            session.close()
    elif bench.mode == "http":
        raise ValueError("benchmark.mode=http is measured by benchmarks.paired (--modes ...,http)")
    else:
        result.update(measure_chatloop(cfg, bench))
    result["host"]["load_avg_1m_end"] = os.getloadavg()[0]  # other work on the machine disturbs every number
    if bench.bandwidth_mb and result["weight_bytes_per_token"]:
        # One thread: the bound of a worker pinned to one core. Measured last, so that changing the
        # thread count cannot disturb the measurement above.
        result["bandwidth_1t"] = in_temporary_thread(memory_bandwidth, bench.bandwidth_mb, threads=1)
        result["roofline_ms"] = result["weight_bytes_per_token"] / (result["bandwidth"]["read_gbs"] * 1e9) * 1e3
        result["roofline_1t_ms"] = result["weight_bytes_per_token"] / (result["bandwidth_1t"]["read_gbs"] * 1e9) * 1e3
    result["benchmark"] = asdict(bench)
    return result
