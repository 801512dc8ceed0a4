"""The probe a worker runs when it joins: what the placement (:mod:`chatloop.partition.placement`) needs of its host.

Cores and threads it may use (its affinity, its cgroup's CPU quota), the memory it may take (the machine's available
memory, bounded by its cgroup's limit), a measured memory bandwidth, and the time of one decoder layer of the model,
on real weights from the partitions it holds, for a decode step at a few batch sizes and for a prefill chunk; the
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

import psutil
import torch

from ..models import LayerRange, StepBatch
from ..partition import Manifest
from ..partition.placement import HostFigures
from ..partition.ranges import held_in, load_layer_range, loadable_spans, num_layers_of
from ..worker_settings import cpu_quota

__all__ = ["memory_available", "memory_bandwidth", "probe_host", "probe_layer", "probe_spec", "round_trip_s"]

PROBE_BATCHES = (1, 4, 16)
CONTEXT = 64
"""Tokens already in the KV cache when the decode steps are timed."""
PREFILL_TOKENS = 64
MIN_SECONDS = 0.3
"""Each figure is timed over at least this long: three windows of one period of the default CFS quota each."""


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
    """Bytes this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) still allows; None: no limit."""
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
            for limit_name, usage_name in (("memory.max", "memory.current"),
                                           ("memory.limit_in_bytes", "memory.usage_in_bytes")):
                try:
                    limit = (folder / limit_name).read_text().strip()
                    usage = int((folder / usage_name).read_text().strip())
                except (OSError, ValueError):
                    continue
                if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                    rooms.append(max(0, int(limit) - usage))
    return min(rooms) if rooms else None


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


def _probe_layer_index(manifest: Manifest, held: Iterable[str]) -> int:
    """A layer this host holds, in the middle of the model where it can (neither embedding nor head with it)."""
    spans = loadable_spans(manifest, held)
    if not spans:
        raise ValueError("this host holds none of the split's partition files: it has no layer to probe")
    last = num_layers_of(manifest) - 1
    layers = [i for span in spans for i in span.indices]
    middle = [i for i in layers if 0 < i < last]
    return (middle or layers)[0]


@torch.inference_mode()
def probe_layer(directory: str | Path, *, held: Iterable[str] | None = None, batches: Sequence[int] = PROBE_BATCHES,
                dtype: torch.dtype | None = None, pack_weights: bool = True, native_kernels: bool = True,
                min_seconds: float = MIN_SECONDS) -> tuple[dict[int, float], float]:
    """One layer of the split in ``directory`` (from the files ``held``; None: those present), as a worker computes
    it: seconds of a decode step by batch size, and seconds per token of a prefill chunk."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    held = list(held) if held is not None else held_in(directory, manifest)
    index = _probe_layer_index(manifest, held)
    stage = load_layer_range(directory, LayerRange(index, index), held=held, manifest=manifest, dtype=dtype,
                             pack_weights=pack_weights, native_kernels=native_kernels)
    block_size = 16
    blocks_per_seq = math.ceil((max(CONTEXT + 1, PREFILL_TOKENS)) / block_size)
    cache = stage.new_cache(max(batches) * blocks_per_seq, block_size)
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(max(batches))]
    hidden_dtype = next(stage.parameters()).dtype if dtype is None else dtype

    def inputs(b: int, t: int) -> torch.Tensor:
        if stage.is_first:
            return torch.randint(0, stage.args.vocab_size, (b, t))
        return torch.randn(b, t, stage.args.hidden_size).to(hidden_dtype)

    decode = {}
    for b in batches:
        x, batch = inputs(b, 1), StepBatch.build([CONTEXT] * b, [1] * b, tables[:b], block_size)
        decode[b] = _timed(lambda x=x, batch=batch: stage(x, batch, cache), min_seconds)
    x, batch = inputs(1, PREFILL_TOKENS), StepBatch.build([0], [PREFILL_TOKENS], tables[:1], block_size)
    prefill = _timed(lambda: stage(x, batch, cache), min_seconds) / PREFILL_TOKENS
    return decode, prefill


def probe_host(name: str, directory: str | Path, *, held: Iterable[str] | None = None, hop_s: float = 0.0,
               batches: Sequence[int] = PROBE_BATCHES, dtype: torch.dtype | None = None, pack_weights: bool = True,
               native_kernels: bool = True, min_seconds: float = MIN_SECONDS) -> HostFigures:
    """Everything the placement needs of this host (see the module's docstring), measured now, in this process
    with its threads and pinning already set (:func:`~chatloop.worker_settings.apply_worker_settings`)."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    held = list(held) if held is not None else held_in(directory, manifest)
    decode, prefill = probe_layer(directory, held=held, batches=batches, dtype=dtype, pack_weights=pack_weights,
                                  native_kernels=native_kernels, min_seconds=min_seconds)
    return HostFigures(
        name=name, decode_s=decode, prefill_s_per_token=prefill, memory_bytes=memory_available(), hop_s=hop_s,
        held=tuple(loadable_spans(manifest, held)), threads=torch.get_num_threads(),
        cores=len(os.sched_getaffinity(0)), cpu_limit=cpu_quota(),
        bandwidth_gb_s=memory_bandwidth(min_seconds=min_seconds) / 1e9,
    )


def probe_spec(spec) -> HostFigures:
    """:func:`probe_host` for the stage ``spec`` (a :class:`~chatloop.stage.StageSpec`) would build here: its
    folder, its host's files, its dtype and kernels."""
    return probe_host(spec.name, spec.directory, held=spec.held_files, dtype=getattr(torch, spec.dtype),
                      pack_weights=spec.pack_weights, native_kernels=spec.native_kernels)
