"""The Python API: start (or join) a cluster, generate, stream, chat, shut down.

    from chatloop import ChatLoop
    with ChatLoop.start() as llm:                          # the embedded SmolLM2 over 4 workers
        print(llm.chat([{"role": "user", "content": "Hi!"}]).text)
        for piece in llm.stream("The capital of France is", max_new_tokens=16):
            print(piece, end="", flush=True)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from .config import ChatLoopConfig, ClusterConfig, ModelConfig, load_config
from .engine import (
    ClusterUnavailableError,
    ContextLengthError,
    EngineStats,
    FinishReason,
    LocalPipeline,
    Pipeline,
    SamplingParams,
    Scheduler,
    SchedulerClosedError,
    ScoredToken,
    SequenceEvent,
    StageReport,
)
from .engine.pipeline import compute_thread
from .engine.speculation import DraftModelProposer
from .engine.token_bytes import token_byte_table
from .models import LayerRange, ModelArgs
from .partition import Manifest, ManifestError, split_model
from .partition.splitter import write_worker_configs
from .paths import cache_root
from .stage import StageRunner, build_stage_runner, kv_pools, stage_specs
from .stage.plan_report import DecodeMeter, plan_report
from .worker_config import CONFIG_DIR
from .worker_settings import stages_at_once

__all__ = ["ChatLoop", "Completion", "Score", "load_config"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """A finished request."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[ScoredToken] | None = None
    """With ``logprobs=N``: each generated token's score and its N most likely alternatives."""
    prompt_logprobs: list[ScoredToken] | None = None
    """With ``prompt_logprobs=True``: the score of each prompt token after the first."""
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache (``cache.prefix_caching``), not computed."""
    drafted_tokens: int | None = None
    """Tokens drafted for it by speculative decoding (None: it did not speculate)."""
    accepted_tokens: int | None = None
    """Of those, the tokens the model accepted."""

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Score:
    """How likely the model finds a text: each token's log-probability given the tokens before it."""

    token_ids: list[int]
    logprobs: list[float]
    """Of ``token_ids[1:]`` (the first token has no context to be predicted from)."""
    top: list[tuple[tuple[int, float], ...]]
    """The most likely alternatives at each scored position (with ``top_logprobs``)."""

    @property
    def total(self) -> float:
        """The log-probability of the whole text after its first token."""
        return math.fsum(self.logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total / len(self.logprobs)) if self.logprobs else math.nan


def partitions_dir_for(cfg: ChatLoopConfig) -> Path:
    """Where this configuration's partitions are: the configured folder, or one in the cache."""
    if cfg.model.partitions_dir:
        return Path(cfg.model.partitions_dir)
    name = Path(cfg.model.name).name.lower() if os.sep in cfg.model.name else cfg.model.name.lower()
    if cfg.model.quantization:
        name += f"-{cfg.model.quantization}"
    ranges = "-".join(f"{w.start_layer}_{w.end_layer}" for w in cfg.cluster.workers) or "even"
    return cache_root() / "partitions" / f"{name}-{cfg.cluster.num_workers}-{ranges}"


def prepare_partitions(cfg: ChatLoopConfig) -> Manifest:
    """The manifest of this configuration's partitions, splitting the model first if needed and allowed.

    Also checks, before any worker starts, that every stage's KV cache holds one ordinary request.
    """
    directory = partitions_dir_for(cfg)
    try:
        manifest = Manifest.load(directory)
    except ManifestError:
        if not cfg.model.auto_split:
            raise
        ranges = [LayerRange(w.start_layer, w.end_layer) for w in cfg.cluster.workers] or None
        log.info("splitting %s into %d partitions in %s", cfg.model.name, cfg.cluster.num_workers, directory)
        manifest = split_model(cfg.model.name, directory, cfg.cluster.num_workers, ranges=ranges,
                               quantize=cfg.model.quantization)
    if cfg.model.quantization and manifest.quantization != cfg.model.quantization:
        raise ManifestError(
            f"model.quantization={cfg.model.quantization}, but the partitions in {directory} are "
            f"{manifest.quantization or 'not quantized'}: split again with --quantize {cfg.model.quantization}, or "
            f"set model.quantization={manifest.quantization or 'null'}")
    if cfg.cluster.launch == "external" and not (directory / CONFIG_DIR).is_dir():
        try:  # a split made before ChatLoop wrote worker configs: the workers started by hand need them
            write_worker_configs(directory, manifest)
        except OSError as e:
            log.warning("no worker configs in %s and cannot write them (%s): split again", directory, e)
    # cluster.plan=auto loads any range from the split's files: as many workers as partitions is not needed
    if manifest.num_partitions != cfg.cluster.num_workers and cfg.cluster.plan != "auto":
        raise ManifestError(
            f"{directory} holds {manifest.num_partitions} partitions "
            f"but cluster.num_workers={cfg.cluster.num_workers}: "
            f"split the model into {cfg.cluster.num_workers} partitions (chatloop-split --num-partitions "
            f"{cfg.cluster.num_workers}) or set cluster.num_workers={manifest.num_partitions}"
        )
    for k, spec in enumerate(cfg.cluster.workers):
        why = manifest.mismatch(k, f"cluster.workers[{k}]", directory, file=spec.partition or None,
                                layers=LayerRange(spec.start_layer, spec.end_layer))
        if why is not None:
            raise ManifestError(f"{why}: make cluster.workers match the split (partition may be left empty), or "
                                "split again with --ranges")
    args = ModelArgs.from_hf_config(manifest.model_config)
    for spec, part in zip(stage_specs(cfg, directory), manifest.partitions):
        kv_pools(spec, args, spec.expected_layers or part.layers)
    return manifest


class ChatLoop:
    """A running model: the coordinator's scheduler in front of the pipeline of stages.

    It is the engine a front end talks to (:class:`~chatloop.engine.EngineClient`): ``encode``,
    ``submit``, ``stats``, ``describe_stages``, ``context_length``, ``vocab_size``, ``stage_names``.
    """

    def __init__(self, cfg: ChatLoopConfig, manifest: Manifest, pipeline: Pipeline, cluster=None,
                 local_plan: tuple | None = None) -> None:
        from transformers import AutoTokenizer

        self.config = cfg
        self.manifest = manifest
        self.pipeline = pipeline
        self.cluster = cluster
        self._local_plan = local_plan  # in process, under plan=auto: (placement, figures); a cluster keeps its own
        self.decode_meter = DecodeMeter()
        """The recent decode steps' tokens/s (the status page shows them beside the plan's predictions)."""
        pipeline.add_observer(self.decode_meter)  # a cluster's pipelines share one observer list: it carries over
        directory = partitions_dir_for(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.capacity_tokens = pipeline.num_blocks * pipeline.block_size
        log.info("KV cache capacity: %d tokens (%d blocks of %d) per stage", self.capacity_tokens, pipeline.num_blocks,
                 pipeline.block_size)
        if pipeline.num_window_blocks:
            log.info("windowed layers' own KV pool: %d blocks (reused as each sequence's window slides)",
                     pipeline.num_window_blocks)
        self._draft_executor = None
        draft = None
        if cfg.speculative.method == "draft":
            draft, self._draft_executor = load_draft(cfg, manifest, self.tokenizer)
        self.scheduler = Scheduler(
            pipeline,
            self.tokenizer,
            max_batch_size=cfg.batching.max_batch_size,
            batching_window_ms=cfg.batching.batching_window_ms,
            max_queue_size=cfg.batching.max_queue_size,
            max_in_flight=cfg.cluster.max_in_flight or self._stages_at_once(),
            max_context=(manifest.model_config.get("max_position_embeddings")
                         or manifest.model_config.get("n_positions")),
            max_tokens_per_micro_batch=cfg.batching.max_tokens_per_micro_batch,
            prefill_chunk_tokens=cfg.batching.prefill_chunk_tokens,
            eos_token_ids=_eos_ids(directory, self.tokenizer),
            kv_window=ModelArgs.from_hf_config(manifest.model_config).kv_window,  # blocks out of it go back
            mixed_window=ModelArgs.from_hf_config(manifest.model_config).mixed_window,  # (its own pool's blocks)
            rope_switch=ModelArgs.from_hf_config(manifest.model_config).rope_switch,  # computed again past it
            replay_lost_steps=cluster is not None and cluster.watchdog is not None,
            prefix_caching=cfg.cache.prefix_caching,
            speculative_method=cfg.speculative.method,
            num_speculative_tokens=cfg.speculative.num_tokens,
            draft_proposer=draft,
            draft_executor=self._draft_executor,
        )
        if cluster is not None:
            cluster.listener = self  # it tells us when it loses and rebuilds the pipeline

    # ---- the cluster's listener (chatloop.runtime.cluster.ClusterListener) ---------------------------
    def pipeline_lost(self, reason: str) -> int:
        return self.scheduler.suspend(reason)

    def pipeline_restored(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.scheduler.resume(pipeline)

    def pipeline_unavailable(self, error: BaseException) -> None:
        self.scheduler.fail_all(error)

    def _stages_at_once(self) -> int:
        """Micro-batches worth keeping in flight: more only split the batch, and each re-reads the weights."""
        if self.cluster is None:  # in one process the stages run one after another
            return 1
        reports = self.cluster.stage_reports
        at_once = stages_at_once(reports)
        machines = len({r.machine or r.host for r in reports})
        log.info("%d micro-batch(es) in flight: %d stage(s) on %d machine(s) can compute at once "
                 "(cluster.max_in_flight sets it)", at_once, len(reports), machines)
        return at_once

    @classmethod
    def start(cls, cfg: ChatLoopConfig | None = None, overrides: Sequence[str] = ()) -> ChatLoop:
        """Start from typed config, or from ``conf/`` plus Hydra ``overrides``.

        Under torchrun this is rank 0's call (the other ranks call :func:`chatloop.runtime.run_worker`);
        otherwise it spawns the workers itself. ``cluster.in_process=true`` runs every stage here.
        """
        cfg = cfg or load_config(overrides)
        if cfg.cluster.in_process:
            manifest = prepare_partitions(cfg)
            plan: list = []
            pipeline = _local_pipeline(cfg, manifest, plan)
            return cls(cfg, manifest, pipeline, local_plan=plan[0] if plan else None)
        from .runtime import RpcCluster

        holder: dict[str, Manifest] = {}

        def prepare() -> Manifest:
            holder["manifest"] = prepare_partitions(cfg)
            return holder["manifest"]

        cluster = RpcCluster.start(cfg, str(partitions_dir_for(cfg)), prepare=prepare)
        try:
            return cls(cfg, holder["manifest"], cluster.pipeline, cluster)
        except BaseException:
            cluster.shutdown()
            raise

    # ---- the engine interface (EngineClient) ---------------------------------------------------
    @property
    def context_length(self) -> int:
        """The most tokens one request may hold, prompt and completion: the model's context or the KV cache."""
        return self.scheduler.policy.context_length

    @property
    def vocab_size(self) -> int:
        return int(self.manifest.model_config["vocab_size"])

    @property
    def speculative_methods(self) -> tuple[str, ...]:
        """The speculative decoding methods a request may ask for (``draft`` only with a draft model loaded)."""
        return tuple(sorted(self.scheduler.policy.loaded_methods))

    @property
    def stage_names(self) -> list[str]:
        return list(self.pipeline.stage_names)

    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        """Each token id's own bytes (see :func:`~chatloop.engine.token_bytes.token_byte_table`)."""
        return token_byte_table(self.tokenizer)

    @property
    def cluster_state(self) -> str:
        """serving, recovering (a lost worker is being replaced: requests wait) or degraded (it did not come back)."""
        watchdog = self.cluster.watchdog if self.cluster is not None else None
        return watchdog.state.value if watchdog is not None else "serving"

    def stats(self) -> EngineStats:
        """The coordinator's counters now."""
        s, allocator, window = self.scheduler.stats, self.scheduler.allocator, self.scheduler.window_allocator
        watchdog = self.cluster.watchdog if self.cluster is not None else None
        return EngineStats(
            num_waiting=s.num_waiting, num_running=s.num_running, num_in_flight=s.num_in_flight,
            max_in_flight=self.scheduler.max_in_flight, last_batch_size=s.last_batch_size,
            generated_tokens=s.generated_tokens, finished=dict(s.finished),
            queue_capacity=self.scheduler.policy.max_queue_size, kv_blocks_total=allocator.num_blocks,
            kv_blocks_free=allocator.num_free, kv_block_size=allocator.block_size, replays=s.replays,
            cluster_state=self.cluster_state,
            recovery_seconds=list(watchdog.recovery_seconds) if watchdog is not None else [],
            worker_restarts=watchdog.restarts if watchdog is not None else {},
            prefix_cache_queries=s.prefix_queries, prefix_cache_hits=s.prefix_hits,
            kv_blocks_cached=allocator.num_cached,
            speculative_drafted_tokens=s.drafted_tokens, speculative_accepted_tokens=s.accepted_tokens,
            kv_window_blocks_total=window.num_blocks if window is not None else 0,
            kv_window_blocks_free=window.num_free if window is not None else 0,
        )

    def plan_report(self) -> dict:
        """The plan as GET /v1/status shows it: under cluster.plan=auto each host's figures, layers and predicted
        tokens/s (:func:`~chatloop.stage.plan_report.plan_report`); in every case the measured decode tokens/s."""
        cfg = self.config.cluster
        placement, figures = self.cluster.placement if self.cluster is not None else (self._local_plan or (None, []))
        kind = "auto" if cfg.plan == "auto" else "ranges" if cfg.workers else "even"
        return plan_report(kind, placement, figures, self.decode_meter)

    def describe_stages(self, timeout: float = 5.0) -> list[StageReport]:
        """Every stage's report; a stage that does not answer within ``timeout`` seconds is reported down, and
        while the cluster replaces a lost worker, that stage says so."""
        if self.cluster is not None:
            return self.cluster.describe(timeout)
        return self.pipeline.describe(timeout)

    def encode(self, prompt: str | Sequence[int] | list[dict], chat: bool = False) -> list[int]:
        """Token ids of a prompt: text, ids, or (with ``chat``) a list of chat messages.

        Text too long to fit the context whatever its tokens (more characters than the context
        times the longest token's) raises ``ContextLengthError`` before it is tokenized.
        """
        if isinstance(prompt, str) and not chat:
            self._refuse_overlong(len(prompt), "prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if chat or (prompt and isinstance(prompt[0], dict)):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if not self.tokenizer.chat_template:
                raise ValueError("this model's tokenizer has no chat template: send a plain prompt")
            self._refuse_overlong(sum(len(str(m.get("content") or "")) for m in messages), "messages")
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        return [int(t) for t in prompt]

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """The most characters one token of this tokenizer decodes to (its longest piece)."""
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return max(len(piece) for piece in pieces if piece is not None)

    @property
    def max_prompt_chars(self) -> int:
        """No prompt text longer than this can fit the context."""
        return self.context_length * self.max_chars_per_token

    def _refuse_overlong(self, num_chars: int, what: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise ContextLengthError(
                f"the {what} has {num_chars} characters: at {self.max_chars_per_token} characters per token at most, "
                f"that is more than the context's {self.context_length} tokens: shorten it", param=what,
            )

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[SequenceEvent], None]
    ) -> Callable[[], None]:
        """Low level: queue token ids; ``emit`` gets the events on the scheduler's thread. Returns ``cancel()``.

        While a lost worker is being replaced the request waits; while the cluster is degraded it is refused
        (``ClusterUnavailableError``)."""
        if self.cluster_state == "degraded":
            lost = self.cluster.watchdog.lost  # type: ignore[union-attr]
            raise ClusterUnavailableError(
                "; ".join(loss.reason for _, loss in sorted(lost.items()))
                + ": the request was not run (chatloop-status shows every rank)")
        return self.scheduler.submit(prompt_ids, params, emit)

    def stream_events(
        self, prompt, *, chat: bool = False, params: SamplingParams | None = None, **sampling
    ) -> Iterator[SequenceEvent]:
        """Every event of one request, ending with the one that has ``finish_reason``; cancels if abandoned."""
        params = _params(params, sampling)
        events: queue.Queue[SequenceEvent] = queue.Queue()
        cancel = self.submit(self.encode(prompt, chat), params, events.put)
        finished = False
        try:
            while not finished:
                event = events.get()
                finished = event.finish_reason is not None
                if event.error is not None:
                    raise event.error
                yield event
        finally:
            if not finished:
                cancel()

    def stream(self, prompt, *, chat: bool = False, **sampling) -> Iterator[str]:
        """Text pieces as they are generated."""
        for event in self.stream_events(prompt, chat=chat, **sampling):
            if event.text:
                yield event.text

    def generate(self, prompt, *, chat: bool = False, **sampling) -> Completion:
        """One completion of a prompt (text or token ids); sampling keywords as :class:`SamplingParams`."""
        prompt_ids = self.encode(prompt, chat)
        text, ids, reason, scores, prompt_scores, cached = [], [], FinishReason.ERROR, [], None, 0
        drafted = accepted = None
        for event in self.stream_events(prompt_ids, **sampling):
            text.append(event.text)
            ids.extend(event.token_ids)
            scores.extend(event.logprobs)
            prompt_scores = list(event.prompt_logprobs) if event.prompt_logprobs is not None else prompt_scores
            reason = event.finish_reason or reason
            cached = event.cached_tokens if event.cached_tokens is not None else cached
            if event.finish_reason is not None:
                drafted, accepted = event.drafted_tokens, event.accepted_tokens
        wanted = sampling.get("logprobs") is not None
        return Completion("".join(text), ids, reason, len(prompt_ids), scores if wanted else None, prompt_scores,
                          cached, drafted, accepted)

    def score(self, texts: str | Sequence[int] | Sequence[str | Sequence[int]], *, top_logprobs: int = 0,
              timeout_s: float | None = None) -> Score | list[Score]:
        """How likely the model finds each text (a string or token ids): one :class:`Score` per text (one for one).

        The texts are scored concurrently, as many at a time as the request queue takes; nothing is generated.
        Tokenized with the model's special tokens (as ``generate`` does), so a Llama text starts with BOS.
        """
        single = isinstance(texts, str) or (len(texts) > 0 and isinstance(texts[0], int))
        batch = [texts] if single else list(texts)
        params = SamplingParams(max_new_tokens=0, prompt_logprobs=True, logprobs=top_logprobs, timeout_s=timeout_s)
        encoded = [self.encode(t) for t in batch]
        results: list[Score | None] = [None] * len(batch)
        done: queue.Queue[tuple[int, SequenceEvent]] = queue.Queue()
        window = max(1, self.config.batching.max_queue_size // 2)  # leave room in the queue for other clients
        cancels: dict[int, Callable[[], None]] = {}
        next_text = 0
        try:
            while next_text < len(batch) or cancels:
                while next_text < len(batch) and len(cancels) < window:
                    k = next_text
                    cancels[k] = self.submit(encoded[k], params, lambda e, k=k: done.put((k, e)))
                    next_text += 1
                k, event = done.get()
                if event.error is not None:
                    raise event.error
                if event.finish_reason is FinishReason.CANCELLED:
                    raise SchedulerClosedError("the engine shut down while scoring")
                if event.finish_reason is None:
                    continue
                cancels.pop(k)
                scored = event.prompt_logprobs or ()
                results[k] = Score(encoded[k], [s.logprob for s in scored], [s.top for s in scored])
        finally:
            for cancel in cancels.values():
                cancel()
        return results[0] if single else results  # type: ignore[return-value]

    def chat(self, messages: list[dict] | str, **sampling) -> Completion:
        """The assistant's answer to a conversation (a list of ``{"role", "content"}`` messages)."""
        return self.generate(messages, chat=True, **sampling)

    # ---- lifecycle ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the scheduler and every rank (bounded in time)."""
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()
        if getattr(self, "_draft_executor", None) is not None:
            self._draft_executor.shutdown(wait=True, cancel_futures=True)
        if self.cluster is not None:
            self.cluster.shutdown()
        else:
            self.pipeline.close()

    def __enter__(self) -> ChatLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is None:
        return SamplingParams(**sampling)
    return replace(params, **sampling) if sampling else params


def _local_pipeline(cfg: ChatLoopConfig, manifest: Manifest, plan_out: list | None = None) -> LocalPipeline:
    executor = compute_thread("local")
    return LocalPipeline(executor.submit(_load_runners, cfg, manifest, plan_out).result(), executor)


def _load_runners(cfg: ChatLoopConfig, manifest: Manifest, plan_out: list | None = None) -> list[StageRunner]:
    """The stages' runners in this process; under cluster.plan=auto, ``plan_out`` gets (placement, figures)."""
    specs = stage_specs(cfg, partitions_dir_for(cfg))
    if cfg.cluster.plan == "auto" and not cfg.cluster.figures:  # one probe stands for all, sharing its memory
        from .stage.planning import plan_specs
        from .stage.probe import probe_spec

        here = probe_spec(specs[0])
        here = replace(here, memory_bytes=here.memory_bytes // len(specs))
        specs, placement = plan_specs(cfg, specs, [here] * len(specs), manifest)
        if plan_out is not None:
            plan_out.append((placement, [replace(here, name=spec.name) for spec in specs]))
    elif cfg.cluster.plan == "auto" and plan_out is not None:  # stage_specs planned from cluster.figures: again
        from .stage.planning import figures_from_files, plan_specs

        figures = figures_from_files(cfg)
        plan_out.append((plan_specs(cfg, specs, figures, manifest)[1], figures))
    return [build_stage_runner(spec, manifest) for spec in specs]


def load_draft(cfg: ChatLoopConfig, manifest: Manifest, tokenizer) -> tuple[DraftModelProposer, ThreadPoolExecutor]:
    """``speculative.draft_model`` as one in-process stage (split, quantized and loaded as ``cluster=single`` does),
    on a thread of its own, after checking that it shares the model's tokenizer and fits the coordinator's memory."""
    spec = cfg.speculative
    quantized = spec.draft_quantization is not None
    draft_cfg = replace(
        cfg, model=ModelConfig(name=spec.draft_model, quantization=spec.draft_quantization,
                               dtype="float32" if quantized else cfg.model.dtype,
                               verify_sha256=cfg.model.verify_sha256),
        cluster=ClusterConfig(num_workers=1, in_process=True),
        cache=replace(cfg.cache, kv_cache_mb=spec.draft_kv_cache_mb),
        # (one pool for every layer: the draft's own block tables index all of them, see stage_specs' window_blocks)
        batching=replace(cfg.batching, prefill_chunk_tokens=None),
    )
    draft_manifest = prepare_partitions(draft_cfg)
    _check_draft_vocabulary(cfg, manifest, tokenizer, draft_cfg, draft_manifest)
    needed = sum(p.num_bytes for p in draft_manifest.partitions) + spec.draft_kv_cache_mb * 2**20
    budget = spec.max_draft_mb * 2**20 if spec.max_draft_mb is not None else psutil.virtual_memory().available
    if needed > budget:
        where = (f"speculative.max_draft_mb={spec.max_draft_mb:g}" if spec.max_draft_mb is not None
                 else "the coordinator's available memory")
        raise ValueError(
            f"the draft model {spec.draft_model} needs {needed / 2**20:.1f} MiB (weights and its KV cache), more than "
            f"{where} ({budget / 2**20:.1f} MiB): set speculative.draft_quantization=int4, choose a smaller "
            "speculative.draft_model, lower speculative.draft_kv_cache_mb, or use speculative.method=ngram")
    executor = compute_thread("draft")
    try:
        runner = executor.submit(_load_runners, draft_cfg, draft_manifest).result()[0]
    except BaseException:
        executor.shutdown()
        raise
    log.info("speculative decoding: draft model %s (%s), k=%d, on the coordinator (%s OpenMP threads)",
             spec.draft_model, spec.draft_quantization or draft_cfg.model.dtype, spec.num_tokens,
             spec.draft_threads or "torch's")
    return DraftModelProposer(runner.stage, runner.cache, runner.num_blocks, runner.block_size,
                              spec.draft_threads), executor


def _check_draft_vocabulary(cfg: ChatLoopConfig, manifest: Manifest, tokenizer, draft_cfg: ChatLoopConfig,
                            draft_manifest: Manifest) -> None:
    """The draft must speak the model's tokens: the same vocabulary size and the same tokenizer."""
    from transformers import AutoTokenizer

    sizes = int(manifest.model_config["vocab_size"]), int(draft_manifest.model_config["vocab_size"])
    draft_tokenizer = AutoTokenizer.from_pretrained(partitions_dir_for(draft_cfg))
    if sizes[0] != sizes[1] or draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        what = (f"a vocabulary of {sizes[1]} tokens, the model's has {sizes[0]}" if sizes[0] != sizes[1]
                else "another tokenizer (its tokens have other ids)")
        raise ValueError(
            f"speculative.draft_model={cfg.speculative.draft_model} has {what}: choose a draft of the model's "
            f"family and tokenizer (model.name={cfg.model.name}), or use speculative.method=ngram")


def _eos_ids(directory: Path, tokenizer) -> set[int]:
    ids = set()
    generation = directory / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
