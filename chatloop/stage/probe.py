"""The probe a worker runs when it joins: what the placement (:mod:`chatloop.partition.placement`) needs of its host.

Cores and threads it may use (its affinity, its cgroup's CPU quota), the memory it may take (the machine's available
memory, bounded by its cgroup's limit), a measured memory bandwidth, and the decode step of a stage of the model, on
real weights from the partitions it holds, at a few batch sizes: its fixed cost, one layer's, and the head's with
the sampling (stages of one layer, of two, of as many as outgrow the caches, and of the last layer), and a prefill
chunk's time per token; the
round trip to a neighbour is timed by the caller's ``ping``. Times are totals over several CFS periods, not medians
of calls: a worker held to a third of a core runs a short call at full speed and then waits, and only the total
shows the wait.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import psutil
import torch

from ..engine.requests import SamplerInput
from ..engine.sampling import sample
from ..kernels.experts import release_freed_memory
from ..models import LayerRange, StepBatch
from ..partition import Manifest
from ..partition.costs import model_costs
from ..partition.placement import HostFigures
from ..partition.ranges import held_in, load_layer_range, loadable_spans, num_layers_of
from ..worker_settings import cpu_quota

__all__ = ["LayerProbe", "memory_available", "memory_bandwidth", "probe_host", "probe_layer", "probe_seconds",
           "probe_spec", "round_trip_s"]

PROBE_BATCHES = (1, 4, 16)
CONTEXT = 64
"""Tokens already in the KV cache when the decode steps are timed."""
PREFILL_TOKENS = 64
MIN_SECONDS = 0.3
"""Each figure is timed over at least this long: three windows of one period of the default CFS quota each."""
STREAM_BYTES = 192 * 2**20
"""A stage whose weights pass this reads them from memory each step, not from the caches: here a stage of 4 SmolLM2
float32 layers (57 MB) took 0.62 ms a layer at batch 1 and one of 12 or more (170 MB+) 1.31-1.35 ms, so one layer
timed alone is ~2x too fast for a whole stage. The probe times a stage this big (as the host's memory allows)."""


def _timed(fn: Callable[[], object], min_seconds: float, warmup: int = 2, windows: int = 3) -> float:
    """Seconds per call of ``fn``: the median over ``windows`` windows (a burst of another process's work spoils one)
    of each window's total over its calls, the windows together at least ``min_seconds`` long, after ``warmup``."""
    for _ in range(warmup):
        fn()
    per_call = []
    for _ in range(windows):
        calls, start = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - start < min_seconds / windows:
            fn()
            calls += 1
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def _cgroup_memory_room(root: Path, membership: Path) -> int | None:
    """Bytes this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) still allows, the inactive page
    cache counted as room; None: no limit."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers and "memory" not in controllers.split(","):
            continue
        mount = root if not controllers else root / "memory"
        own = mount / path.strip("/")
        # Its group and every parent's limit apply; inside a container the mount is its own cgroup.
        chain = [f for f in (own, *own.parents) if f == mount or mount in f.parents] if own.is_dir() else [mount]
        for folder in chain:
            for limit_name, usage_name, cache_name in (("memory.max", "memory.current", "inactive_file"),
                                                       ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                        "total_inactive_file")):
                try:
                    limit = (folder / limit_name).read_text().strip()
                    usage = int((folder / usage_name).read_text().strip())
                except (OSError, ValueError):
                    continue
                if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                    rooms.append(max(0, int(limit) - usage + _stat(folder / "memory.stat", cache_name)))
    return min(rooms) if rooms else None


def _stat(path: Path, name: str) -> int:
    """A figure of a cgroup's ``memory.stat`` (0 where absent): the usage counts the page cache, and the inactive
    part of it (files read once, such as the partitions at load) goes before the group runs out."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def memory_available(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int:
    """Bytes this process can still take: the machine's available memory, or less where its cgroup is limited."""
    available = psutil.virtual_memory().available
    room = _cgroup_memory_room(root, membership)
    return available if room is None else min(available, room)


def memory_bandwidth(num_bytes: int = 64 * 2**20, min_seconds: float = MIN_SECONDS) -> float:
    """Bytes a second this process moves copying a buffer far larger than the caches (read + write)."""
    source = torch.ones(num_bytes // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    seconds = _timed(lambda: target.copy_(source), min_seconds, warmup=1)
    return 2 * num_bytes / seconds


def round_trip_s(ping: Callable[[], object], tries: int = 5) -> float:
    """The median round trip of ``ping`` (a call to a neighbour that returns once it answered)."""
    ping()  # the first opens connections
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        ping()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _probe_layer_index(manifest: Manifest, held: Iterable[str]) -> tuple[int, int]:
    """A layer this host holds, in the middle of the model where it can (neither embedding nor head with it), and
    how many layers from it on are held with it and in the middle too (two or more: a stage of two is timed beside
    one, and a stage of many, to read its weights from memory)."""
    spans = loadable_spans(manifest, held)
    if not spans:
        raise ValueError("this host holds none of the split's partition files: it has no layer to probe")
    last = num_layers_of(manifest) - 1
    runs = [[i for i in span.indices if 0 < i < last] for span in spans]
    runs = [run for run in runs if run]
    if not runs:
        return next(i for span in spans for i in span.indices), 1
    longest = max(runs, key=len)
    return longest[0], len(longest)


class LayerProbe(NamedTuple):
    """What :func:`probe_layer` measures, in seconds, by batch size where by batch."""

    decode_s: dict[int, float]
    """One more layer in a stage's decode step, its weights read from memory where the host holds enough layers to
    time a stage bigger than the caches (:data:`STREAM_BYTES`); else as one or two layers run (from the caches)."""
    prefill_s_per_token: float
    step_fixed_s: dict[int, float] | None
    """A stage's decode step whatever its layers (one layer's step less a layer); None: no two layers to time."""
    head_s: dict[int, float] | None
    """The last stage's norm, head and greedy sampling; None: the host does not hold the head."""


@torch.inference_mode()
def probe_layer(directory: str | Path, *, held: Iterable[str] | None = None, batches: Sequence[int] = PROBE_BATCHES,
                dtype: torch.dtype | None = None, pack_weights: bool = True, native_kernels: bool = True,
                min_seconds: float = MIN_SECONDS, stream_bytes: int = STREAM_BYTES) -> LayerProbe:
    """The split in ``directory`` (from the files ``held``; None: those present) as a worker computes it: a decode
    step of a stage of one layer and of two (their difference: a layer from the caches; the rest: the step's fixed
    cost, which dominates a small model's layer), of as many layers as hold ``stream_bytes`` of weights (a layer
    read from memory, as a whole stage reads them; at most a quarter of the memory available, and the layers held)
    and of the last layer with the head and sampling, by batch size, and a prefill chunk's time per token. The
    stages take turns window by window and each figure is the median of its windows' differences, so a burst of
    other work on the host spoils one round, not one stage's figure."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    held = list(held) if held is not None else held_in(directory, manifest)
    index, run = _probe_layer_index(manifest, held)
    pair = run >= 2
    layer_bytes = max(1, model_costs(manifest, kv_cache_mb=0, num_hosts=1).layer_bytes[index])
    many = min(run, math.ceil(min(stream_bytes, memory_available() / 4) / layer_bytes))
    last = num_layers_of(manifest) - 1
    holds_head = any(last in span.indices for span in loadable_spans(manifest, held)) and index != last
    block_size = 16
    blocks_per_seq = math.ceil((max(CONTEXT + 1, PREFILL_TOKENS)) / block_size)
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(max(batches))]
    greedy = SamplerInput(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0, step=0)
    ranges = {"one": LayerRange(index, index)}
    if pair:
        ranges["two"] = LayerRange(index, index + 1)
    if many > 2:
        ranges["many"] = LayerRange(index, index + many - 1)
    if holds_head:
        ranges["head"] = LayerRange(last, last)
    stages = {key: load_layer_range(directory, layers, held=held, manifest=manifest, dtype=dtype,
                                    pack_weights=pack_weights, native_kernels=native_kernels)
              for key, layers in ranges.items()}
    caches = {key: stage.new_cache(max(batches) * blocks_per_seq, block_size) for key, stage in stages.items()}

    def call(key: str, b: int, t: int) -> Callable[[], object]:
        stage, cache = stages[key], caches[key]
        hidden_dtype = next(stage.parameters()).dtype if dtype is None else dtype
        x = (torch.randint(0, stage.args.vocab_size, (b, t)) if stage.is_first
             else torch.randn(b, t, stage.args.hidden_size).to(hidden_dtype))
        batch = (StepBatch.build([CONTEXT] * b, [1] * b, tables[:b], block_size) if t == 1
                 else StepBatch.build([0], [t], tables[:1], block_size))
        if stage.is_last and t == 1:  # the worker samples there too
            return lambda: sample(stage(x, batch, cache), [greedy] * b)
        return lambda: stage(x, batch, cache)

    decode: dict[int, float] = {}
    fixed: dict[int, float] | None = {} if pair else None
    head: dict[int, float] | None = {} if holds_head else None
    for b in batches:
        windows = _paired({key: call(key, b, 1) for key in stages}, min_seconds)
        one = statistics.median(windows["one"])
        decode[b] = one
        if fixed is not None:
            # A difference of two noisy times: kept between a tenth of the one-layer step (a layer is not free)
            # and all of it
            decode[b] = min(one, max(statistics.median(_minus(windows["two"], windows["one"])), one / 10))
            fixed[b] = one - decode[b]
            if "many" in windows:  # the same layers from memory: not faster than from the caches
                decode[b] = max(decode[b], (statistics.median(windows["many"]) - fixed[b]) / many)
        if head is not None:
            head[b] = max(0.0, statistics.median(_minus(windows["head"], windows["one"])))
    prefill = _timed(call("one", 1, PREFILL_TOKENS), min_seconds) / PREFILL_TOKENS
    stages.clear(), caches.clear()
    release_freed_memory()  # the memory figure is read next: the probe's stages must not count as taken
    return LayerProbe(decode, prefill, fixed, head)


def _paired(calls: dict[str, Callable[[], object]], min_seconds: float, rounds: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, a window each in turn for ``rounds`` rounds (see :func:`_timed`)."""
    for fn in calls.values():
        fn(), fn()
    return {key: times for key, times in zip(calls, zip(*(
        [_timed(fn, min_seconds / rounds, warmup=0, windows=1) for fn in calls.values()] for _ in range(rounds))))}


def _minus(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def probe_host(name: str, directory: str | Path, *, held: Iterable[str] | None = None, hop_s: float = 0.0,
               batches: Sequence[int] = PROBE_BATCHES, dtype: torch.dtype | None = None, pack_weights: bool = True,
               native_kernels: bool = True, min_seconds: float | None = None) -> HostFigures:
    """Everything the placement needs of this host (see the module's docstring), measured now, in this process
    with its threads and pinning already set (:func:`~chatloop.worker_settings.apply_worker_settings`).
    ``min_seconds``: how long each figure is timed (None: :func:`probe_seconds`)."""
    if min_seconds is None:
        min_seconds = probe_seconds(cpu_quota(), torch.get_num_threads())
    directory = Path(directory)
    manifest = Manifest.load(directory)
    held = list(held) if held is not None else held_in(directory, manifest)
    layer = probe_layer(directory, held=held, batches=batches, dtype=dtype, pack_weights=pack_weights,
                        native_kernels=native_kernels, min_seconds=min_seconds)
    return HostFigures(
        name=name, decode_s=layer.decode_s, prefill_s_per_token=layer.prefill_s_per_token,
        step_fixed_s=layer.step_fixed_s, head_s=layer.head_s, memory_bytes=memory_available(), hop_s=hop_s,
        held=tuple(loadable_spans(manifest, held)), threads=torch.get_num_threads(),
        cores=len(os.sched_getaffinity(0)), cpu_limit=cpu_quota(),
        bandwidth_gb_s=memory_bandwidth(min_seconds=min_seconds) / 1e9,
    )


def probe_seconds(cpu_limit: float | None, threads: int) -> float:
    """How long to time each figure: :data:`MIN_SECONDS`, longer under a CPU limit (up to 4x): a window of one CFS
    period holds one grant of the quota, and where it starts in the period (and a call running past its end)
    moves its total; windows of several periods average that out."""
    share = 1.0 if not cpu_limit else min(1.0, cpu_limit / max(1, threads))
    return MIN_SECONDS * min(4.0, 1.0 / share)


def probe_spec(spec) -> HostFigures:
    """:func:`probe_host` for the stage ``spec`` (a :class:`~chatloop.stage.StageSpec`) would build here: its
    folder, its host's files, its dtype and kernels."""
    return probe_host(spec.name, spec.directory, held=spec.held_files, dtype=getattr(torch, spec.dtype),
                      pack_weights=spec.pack_weights, native_kernels=spec.native_kernels)
