"""One stage at work: its model slice and KV pool running micro-batches, and the one factory that builds it.

:class:`StageSpec` says everything a process needs to build a stage (picklable: a worker gets
it over RPC as it is); :func:`build_stage_runner` builds the :class:`StageRunner`, both for the
in-process pipeline and on a worker, and :func:`kv_pools` is the one capacity check, also run
before any worker starts.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from ..config import ChatLoopConfig
from ..engine.blocks import window_span_blocks
from ..engine.errors import StageError, StageLostError
from ..engine.pipeline import StageReport, StageTiming, stage_name
from ..engine.requests import SamplerInput
from ..engine.sampling import NOT_FINITE, sample
from ..engine.scoring import sample_and_score
from ..kernels.experts import release_freed_memory
from ..models import LayerRange, ModelArgs, StageModel, StepBatch
from ..models.kv_cache import IN_PLACE_MAX_TOKENS, blocks_for_stage, bytes_per_block
from ..partition import Manifest, load_stage
from ..partition.ranges import files_for_range, load_layer_range
from ..worker_settings import SPIN_ENV, cpu_quota, machine_id

__all__ = [
    "CapacityError", "StageRunner", "StageSpec", "build_stage_runner", "kv_blocks", "kv_pools",
    "stage_specs", "window_pool_blocks",
]

log = logging.getLogger(__name__)



def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T] whether each row of ``x`` [B, T, C] is finite: 0 * x sums to exactly 0 unless a value is NaN or
    infinite (2-40x faster than ``isfinite(x).all(-1)`` here: 17 us for a decode step of 16 x 4096)."""
    return (x * 0).sum(-1) == 0


class CapacityError(ValueError):
    """The KV cache budget cannot hold one ordinary request on a stage."""


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """How to build stage ``index`` from the partitions in ``directory``."""

    name: str
    index: int
    directory: str
    expected_layers: LayerRange | None = None
    """The layers the configuration gives this stage; the partition must hold exactly these."""
    expected_file: str | None = None
    """The partition file the configuration names; it must be the manifest's for this stage."""
    host: str | None = None
    """The host the configuration puts this stage on (checked by a worker before it loads)."""
    dtype: str = "float32"
    kv_cache_mb: float = 512
    block_size: int = 16
    min_capacity_tokens: int = 256
    window_blocks: int = 0
    """Where the model mixes windowed and full layers: the blocks the coordinator wants in the windowed layers' own
    pool (:func:`window_pool_blocks`; a stage gives it fewer where its budget holds fewer); 0: one pool."""
    verify_sha256: bool = True
    pack_weights: bool = True
    native_kernels: bool = True
    planned: bool = False
    """``expected_layers`` come from ``cluster.plan=auto``: any range the host's files cover, not the split's own."""
    held_files: tuple[str, ...] | None = None
    """The partition files this stage's host holds (its worker config's ``holds``); None: those in ``directory``.
    Read only when ``expected_layers`` are not the split's own partition ``index`` (a plan of other ranges)."""


def window_pool_blocks(cfg: ChatLoopConfig, args: ModelArgs) -> int:
    """The blocks of the windowed layers' own pool of a model that mixes windowed and full layers: every running
    sequence holds what its window and its largest step span (a prefill chunk, or a token and its drafts), as the
    policy reserves them; 0 (one pool, every block kept) for other models and without prefill chunks, where a
    prompt's window spans it whole: a windowed pool would need the full one's size and free nothing, and where
    ``cache.window_pool`` is off."""
    window, chunk = args.mixed_window, cfg.batching.prefill_chunk_tokens
    if window is None or not chunk or not cfg.cache.window_pool:
        return 0
    step = max(chunk, 1 + cfg.speculative.num_tokens)
    return cfg.batching.max_batch_size * window_span_blocks(window, step, cfg.cache.block_size)


def stage_specs(cfg: ChatLoopConfig, directory: str | Path) -> list[StageSpec]:
    """One spec per stage of a configuration."""
    specs = []
    window_blocks = window_pool_blocks(cfg, ModelArgs.from_hf_config(Manifest.load(Path(directory)).model_config))
    for k in range(cfg.cluster.num_workers):
        name = stage_name(k, cfg.cluster.in_process)
        worker = cfg.cluster.workers[k] if cfg.cluster.workers else None
        specs.append(StageSpec(
            name=name, index=k, directory=os.path.abspath(directory),
            expected_layers=LayerRange(worker.start_layer, worker.end_layer) if worker else None,
            expected_file=(worker.partition or None) if worker else None,
            host=(worker.host or None) if worker else None,
            dtype=cfg.model.dtype, kv_cache_mb=cfg.cache.kv_cache_mb, block_size=cfg.cache.block_size,
            min_capacity_tokens=cfg.cache.min_capacity_tokens, window_blocks=window_blocks,
            verify_sha256=cfg.model.verify_sha256,
            pack_weights=cfg.worker.pack_weights, native_kernels=cfg.worker.native_kernels,
        ))
    if cfg.cluster.plan == "auto" and cfg.cluster.figures:  # planned from the hosts' probes
        from .planning import plan_from_files

        specs = plan_from_files(cfg, specs, directory)
    return specs


def kv_blocks(spec: StageSpec, args: ModelArgs, num_layers: int) -> int:
    """Blocks of ``spec.block_size`` tokens that ``spec.kv_cache_mb`` holds for ``num_layers`` layers of ``args``.

    Raises :class:`CapacityError` when they hold fewer than ``spec.min_capacity_tokens`` tokens.
    """
    num_blocks = blocks_for_stage(spec.kv_cache_mb, spec.block_size, args, num_layers, getattr(torch, spec.dtype))
    if num_blocks * spec.block_size < spec.min_capacity_tokens:
        raise CapacityError(
            f"cache.kv_cache_mb={spec.kv_cache_mb} holds {num_blocks * spec.block_size} tokens on {spec.name} "
            f"({num_layers} layers), fewer than cache.min_capacity_tokens={spec.min_capacity_tokens}: "
            f"raise cache.kv_cache_mb"
        )
    return num_blocks


def kv_pools(spec: StageSpec, args: ModelArgs, layers: LayerRange) -> tuple[int, int]:
    """(blocks of the full layers' pool, blocks of the windowed layers' own pool) that ``spec.kv_cache_mb`` holds
    for ``layers`` of ``args``: (:func:`kv_blocks`, 0) where the stage keeps one pool. Otherwise the windowed pool
    gets ``spec.window_blocks`` (no more than an even split gives) and the full one the rest; a stage without full
    layers says what its whole budget would hold of one layer (no stage's full pool holds more, every stage has the
    same budget: it limits nothing where the coordinator takes the smallest).

    Raises :class:`CapacityError` when the full pool holds fewer than ``spec.min_capacity_tokens`` tokens.
    """
    windowed = 0 if args.mixed_window is None or not spec.window_blocks else sum(
        args.layer_types[i] == "sliding_attention" for i in layers.indices)
    if not windowed:
        return kv_blocks(spec, args, len(layers)), 0
    per_layer = bytes_per_block(1, spec.block_size, args.num_kv_heads, args.head_dim, getattr(torch, spec.dtype))
    budget = int(spec.kv_cache_mb * 2**20) // per_layer  # one layer's blocks
    num_window = min(spec.window_blocks, budget // len(layers))
    full = len(layers) - windowed
    num_full = (budget - num_window * windowed) // full if full else budget
    if num_window < 1 or num_full * spec.block_size < spec.min_capacity_tokens:
        raise CapacityError(
            f"cache.kv_cache_mb={spec.kv_cache_mb} holds {num_full * spec.block_size} tokens of full layers and "
            f"{num_window} blocks of windowed ones on {spec.name} ({len(layers)} layers), fewer than "
            f"cache.min_capacity_tokens={spec.min_capacity_tokens}: raise cache.kv_cache_mb"
        )
    return num_full, num_window


def build_stage_runner(spec: StageSpec, manifest: Manifest | None = None) -> StageRunner:
    """Load ``spec``'s partition (checked against the manifest) and give it its KV pool."""
    manifest = manifest or Manifest.load(Path(spec.directory))
    dtype = getattr(torch, spec.dtype)
    if _is_split_partition(spec, manifest):
        stage = load_stage(
            spec.directory, spec.index, manifest=manifest, expected_layers=spec.expected_layers,
            expected_file=spec.expected_file, dtype=dtype,
            verify_sha256=spec.verify_sha256, pack_weights=spec.pack_weights, native_kernels=spec.native_kernels,
        )
        files = [manifest.partitions[spec.index]]
    else:  # a planned range across the split's partitions (chatloop.partition.placement)
        stage = load_layer_range(
            spec.directory, spec.expected_layers, held=spec.held_files, manifest=manifest, dtype=dtype,
            verify_sha256=spec.verify_sha256, pack_weights=spec.pack_weights, native_kernels=spec.native_kernels,
        )
        files = files_for_range(manifest, spec.expected_layers)
    num_blocks, num_window_blocks = kv_pools(spec, stage.args, stage.layers_range)
    return StageRunner(stage, num_blocks, spec.block_size, spec.name, spec.index, "+".join(p.file for p in files),
                       sum(p.num_bytes for p in files), num_window_blocks=num_window_blocks)


def _is_split_partition(spec: StageSpec, manifest: Manifest) -> bool:
    """Whether ``spec`` asks for the split's own partition ``spec.index``: all but a planned range of others (explicit
    ranges must be the split's, which :func:`load_stage` checks)."""
    if not spec.planned or spec.expected_layers is None or spec.expected_file is not None:
        return True
    if not 0 <= spec.index < manifest.num_partitions:
        return False
    return manifest.partitions[spec.index].layers == spec.expected_layers


@dataclass
class StageRunner:
    """One stage with its KV pool: runs a micro-batch's share of the model.

    Returns hidden states for the next stage, or, on the last stage, the sampled token ids.
    """

    stage: StageModel
    num_blocks: int
    block_size: int
    name: str = "stage"
    index: int = 0
    partition: str | None = None
    partition_bytes: int | None = None
    max_timings: int = 10_000
    timings: list[StageTiming] = field(default_factory=list)
    num_window_blocks: int = 0
    """Blocks of its windowed layers' own pool (0: one pool for every layer; see :func:`kv_pools`)."""

    def __post_init__(self) -> None:
        self.cache = self.stage.new_cache(self.num_blocks, self.block_size, num_window_blocks=self.num_window_blocks)
        self.num_window_blocks = self.cache.num_window_blocks
        self.busy_seconds = 0.0
        self.num_micro_batches = 0
        self.started = time.time()
        self.unhealthy: str | None = None
        """Why this stage's outputs cannot be trusted (they turned NaN or infinite), once they did; it then computes
        nothing more: its process is to be replaced, which loads and verifies the partition again."""
        # Read on the thread that computes (the runner is built there): what its matmuls use.
        self._compute_settings = dict(
            cores=tuple(sorted(os.sched_getaffinity(0))), threads=torch.get_num_threads(),
            simd=torch.backends.cpu.get_cpu_capability(), omp_spin_count=os.environ.get(SPIN_ENV),
            machine=machine_id(), cpu_limit=cpu_quota(),
        )

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, batch: StepBatch, sampling: list[SamplerInput], micro_batch: int = -1):
        if self.unhealthy is not None:  # lost like a stopped stage's: with self-healing it is replayed once replaced
            raise StageLostError(f"{self.name} is unhealthy: {self.unhealthy}", stage=self.index,
                                 cause=f"unhealthy: {self.unhealthy}")
        start = time.perf_counter()
        try:
            if self.stage.is_last and any(p.scores for p in sampling):
                hidden = self.stage(inputs, batch, self.cache, hidden=True)
                result = sample_and_score(self.stage.head, hidden, batch, sampling)
            else:
                out = self.stage(inputs, batch, self.cache)
                result = sample(out, sampling) if self.stage.is_last else out
        except Exception as e:
            cause = f"{type(e).__name__}: {e}"
            raise StageError(f"{self.name} (layers {self.stage.layers_range}) failed: {cause}", stage=self.index,
                             cause=cause) from e
        reason = self._not_finite(inputs, batch, result, micro_batch)
        if reason is not None:
            self.unhealthy = reason
            log.error("%s (layers %s) is unhealthy: %s", self.name, self.stage.layers_range, reason)
            raise StageError(f"{self.name} is unhealthy: {reason}", stage=self.index, cause=f"unhealthy: {reason}")
        if batch.valid.shape[1] > IN_PLACE_MAX_TOKENS:
            # A prefill's temporaries (weights dequantized for its GEMMs, gathered attention) are freed into the
            # heap, which glibc keeps: ~145 MB of a MoE worker's RSS after a 64-token prompt (its budget overrun).
            # Handing it back costs ~30 ms of a prefill that takes seconds; decode steps never get here.
            release_freed_memory()
        end = time.perf_counter()
        self.busy_seconds += end - start
        self.num_micro_batches += 1
        if len(self.timings) < self.max_timings:
            offset = time.time() - time.perf_counter()
            self.timings.append(StageTiming(micro_batch, start + offset, end + offset))
        return result

    @property
    def health_error(self) -> str | None:
        """What reports this stage down (``StageReport.error``: "unhealthy: why"); None while its outputs are finite."""
        return None if self.unhealthy is None else f"unhealthy: {self.unhealthy}"

    def _not_finite(self, inputs: torch.Tensor, batch: StepBatch, result, micro_batch: int) -> str | None:
        """Why this stage is unhealthy, if every sequence of the micro-batch that reached it finite leaves it with
        NaN or infinite hidden states (or logits the sampler refused as such); None otherwise.

        One sequence's trouble is that sequence's (the sampler ends it alone); a whole micro-batch's, from finite
        inputs, is the stage's own: damaged weights, in memory or on disk.
        """
        real = batch.valid  # [B, T]: padding is never looked at
        if inputs.is_floating_point():
            finite_in = (_finite_rows(inputs) | ~real).all(1)  # [B]
        else:
            finite_in = torch.ones(real.shape[0], dtype=torch.bool)
        if isinstance(result, torch.Tensor):
            what = "hidden states"
            finite_out = (_finite_rows(result) | ~real).all(1)
        else:
            what = "logits"
            finite_out = torch.tensor([not (isinstance(t, str) and NOT_FINITE in t) for t in result], dtype=torch.bool)
        num_sequences = int(finite_in.sum())
        if num_sequences == 0 or bool((finite_in & finite_out).any()):
            return None
        sequences = "its one sequence" if num_sequences == 1 else f"all {num_sequences} sequences"
        return (f"its {what} hold NaN or infinity for {sequences} of micro-batch {micro_batch} (from finite inputs): "
                "its weights may be damaged; a worker that replaces it checks its partition's hash as it loads")

    def take_timings(self) -> list[StageTiming]:
        """The recorded timings, then forget them."""
        out, self.timings = self.timings, []
        return out

    def describe(self) -> StageReport:
        """This stage and the process it runs in."""
        return StageReport(
            name=self.name,
            index=self.index,
            layers=str(self.stage.layers_range),
            host=socket.gethostname(),
            pid=os.getpid(),
            partition=self.partition,
            partition_bytes=self.partition_bytes,
            num_blocks=self.num_blocks,
            num_window_blocks=self.num_window_blocks or None,
            kv_cache_bytes=self.cache.num_bytes,
            rss_bytes=psutil.Process().memory_info().rss,
            uptime_s=time.time() - self.started,
            busy_s=self.busy_seconds,
            num_micro_batches=self.num_micro_batches,
            **self._compute_settings,
        )
