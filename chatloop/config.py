"""Typed configuration: one dataclass per concern, registered with Hydra's ConfigStore.

YAML under ``conf/`` only chooses values; every field is documented here and checked in
``__post_init__`` (a ``ValueError`` that says what to change). The reference deployment's
settings (``shared/seed/WORKER_CONFIGURATION.md``) are the defaults: worker_threads 8,
enable_cpu_pinning true, max_batch_size 16, batching_window_ms 5, max_queue_size 256,
kv_cache_mb 512, enable_simd true.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "API_KEY_ENV", "CONF_DIR", "ModelConfig", "WorkerSpec", "ClusterConfig", "BatchingConfig", "CacheConfig",
    "WorkerConfig", "ServerConfig", "SamplingConfig", "SpeculativeConfig",
    "ChatLoopConfig", "load_config", "register_configs", "to_config",
]

DTYPES = ("float32", "bfloat16", "float16")
API_KEY_ENV = "CHATLOOP_API_KEY"
"""The environment variable that holds the HTTP API key (see ServerConfig.api_key_file)."""
def _conf_dir() -> str:
    # A source checkout (editable install) has conf/ beside the package; a wheel ships it as chatloop/conf.
    for candidate in (Path(__file__).resolve().parent.parent / "conf", Path(__file__).resolve().parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError("ChatLoop's conf/ folder is missing from this installation: reinstall chatloop")


CONF_DIR = os.environ.get("CHATLOOP_CONF_DIR") or _conf_dir()
"""The ``conf/`` folder Hydra composes from: the source checkout's, the installed package's (``chatloop/conf``),
or ``$CHATLOOP_CONF_DIR``."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(kw_only=True)
class ModelConfig:
    """Which model, where its partitions are, and the dtype the stages compute in."""

    name: str = "smollm2"
    """A Hugging Face checkpoint folder, or an embedded model's name ('smollm2')."""
    partitions_dir: str | None = None
    """Folder with manifest.json and partition_N.safetensors; None: a cache folder per model and worker count."""
    auto_split: bool = True
    """Split the model into partitions_dir at start-up when it holds no manifest yet."""
    dtype: str = "float32"
    """Weights and activations on every stage: float32, bfloat16 or float16."""
    verify_sha256: bool = True
    """Hash each partition's bytes at every load, against the manifest's BLAKE3 (sha256 for splits made before it
    was recorded), while its weights load; a stage serves only once they match."""
    quantization: str | None = None
    """Weights the automatic split quantizes: int8 (q8_0), int4 (q4_1 layers, q8_0 embedding), gguf (an embedded
    model's own GGUF weights, or model.name a .gguf file); None: floating. Activations stay float32."""

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"model.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        _require(self.quantization in (None, "int8", "int4", "gguf"),
                 f"model.quantization={self.quantization!r}: choose null, int8, int4 or gguf")
        _require(self.quantization is None or self.dtype == "float32",
                 f"model.quantization={self.quantization} computes in float32: leave model.dtype={self.dtype} out")


@dataclass(kw_only=True)
class WorkerSpec:
    """One row of the cluster's worker table (the reference deployment's worker configs)."""

    start_layer: int = 0
    """First layer of this worker (inclusive); the manifest's partition must start here."""
    end_layer: int = 0
    """Last layer of this worker (inclusive); the manifest's partition must end here."""
    partition: str = ""
    """The partition file this worker loads, e.g. partition_0.safetensors; it must be the manifest's file for
    this worker. Empty: the manifest's."""
    host: str = ""
    """The host this worker must run on (a name or address of one of its interfaces); a worker rank that
    torchrun placed elsewhere refuses to start. Empty: any host."""

    def __post_init__(self) -> None:
        _require(0 <= self.start_layer <= self.end_layer,
                 f"a worker's layers {self.start_layer}-{self.end_layer} are empty or negative: need 0 <= start <= end")


RPC_TRANSPORTS = ("uv", "shm", "ibv")
"""TensorPipe's transports (torch.distributed.rpc)."""
RPC_CHANNELS = ("basic", "cma", "mpt_uv", "xth")
"""TensorPipe's CPU channels."""


@dataclass(kw_only=True)
class ClusterConfig:
    """The ranks: rank 0 is the coordinator, rank k is worker k-1 owning partition k-1."""

    num_workers: int = 4
    """Pipeline stages, one worker process each."""
    in_process: bool = False
    """Run every stage inside the coordinator's process, without RPC (the one-process baseline)."""
    launch: str = "spawn"
    """Who starts the workers: spawn (this process, on this host) or external (each started elsewhere with
    chatloop-worker --config FILE --coordinator HOST:PORT, in a container or on another host, and joining here).
    Under torchrun the ranks are torchrun's."""
    master_addr: str = "127.0.0.1"
    """Where the coordinator's store listens and the workers find it (torchrun's --master-addr). Loopback by default;
    for workers on other hosts or containers, this host's private address or name. Keep RPC on a private network: it
    executes pickled data."""
    master_port: int = 50050
    """Rendezvous port: the reference deployment's coordinator port."""
    workers: list[WorkerSpec] = field(default_factory=list)
    """Explicit layer ranges per worker; empty: an even split. Must match the manifest."""
    plan: str = "even"
    """Which layers each worker computes: even (an even split, or cluster.workers' ranges where given) or auto
    (planned from each worker's probe of its speed and memory, as ranges of the split's files it holds; see
    docs/placement.md)."""
    figures: list[str] = field(default_factory=list)
    """With plan=auto: each worker's figures (written on its host by chatloop-plan probe --output), one file per worker
    in chain order, instead of the probe every worker runs when it joins. Empty: the workers probe themselves."""
    rpc_timeout_s: float = 20.0
    """A micro-batch that takes longer is located: if a stage has been computing it for longer, or it is lost, it
    fails with an error naming the stage that holds it up, and every stage drops it; if it is still waiting its turn
    behind other micro-batches (long prefills), it gets this long again."""
    progress_deadline_s: float = 30.0
    """A stage whose compute thread has been on one micro-batch for longer has stopped making progress: /health and
    /v1/status report it down, and self-healing replaces it. Keep it above the longest step of one stage (a prefill
    chunk of a big model on few cores)."""
    self_healing: bool = True
    """Replace a lost worker and replay the running sequences (see chatloop.runtime.healing); false: a lost worker
    fails the requests that need it until the cluster is restarted."""
    max_restarts: int = 3
    """Failed starts in a row after which a worker is given up (the service stays degraded and says why)."""
    recovery_timeout_s: float = 60.0
    """How long requests wait for a lost worker to be back before they fail (503); the coordinator keeps trying and
    takes the stage back when it returns."""
    heartbeat_interval_s: float = 1.0
    """How often the coordinator asks every worker for a sign of life."""
    heartbeat_timeout_s: float = 3.0
    """A worker that gives none within this is lost (a stopped process, a cut cable)."""
    startup_timeout_s: float = 300.0
    """Time for every worker to join and load its partition."""
    num_rpc_threads: int = 16
    """TensorPipe's RPC threads per rank."""
    rpc_transports: list[str] = field(default_factory=lambda: ["uv"])
    """TensorPipe transports: 'uv' (TCP). 'shm' (same-host shared memory) busy-polls: its reactor
    thread took ~40% of a core in every idle rank, which ranks sharing cores pay in compute."""
    rpc_channels: list[str] = field(default_factory=lambda: ["basic"])
    """TensorPipe channels for tensor payloads: 'basic' sends them through the transport ('cma' reads the
    sender's memory directly, same host only)."""
    max_in_flight: int | None = None
    """Micro-batches in flight through the pipeline; None: as many as stages can compute at once
    (one per stage when each worker has cores of its own, fewer when workers share a host's cores)."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, f"cluster.num_workers={self.num_workers}: need at least 1 worker")
        _require(0 < self.master_port < 65536, f"cluster.master_port={self.master_port} is not a TCP port")
        _require(self.rpc_timeout_s > 0, "cluster.rpc_timeout_s must be > 0")
        _require(self.progress_deadline_s > 0, "cluster.progress_deadline_s must be > 0")
        _require(self.max_restarts >= 0, f"cluster.max_restarts={self.max_restarts}: need >= 0")
        _require(self.launch in ("spawn", "external"), f"cluster.launch={self.launch!r}: choose spawn or external")
        for name in ("recovery_timeout_s", "heartbeat_interval_s", "heartbeat_timeout_s"):
            _require(getattr(self, name) > 0, f"cluster.{name}={getattr(self, name)}: need > 0")
        _require(self.max_in_flight is None or self.max_in_flight >= 1, "cluster.max_in_flight must be >= 1 or null")
        for name, given, known in (
            ("rpc_transports", self.rpc_transports, RPC_TRANSPORTS),
            ("rpc_channels", self.rpc_channels, RPC_CHANNELS),
        ):
            unknown = [x for x in given if x not in known]
            _require(
                bool(given) and not unknown,
                f"cluster.{name}={list(given)}: give one or more of {', '.join(known)}"
                + (f" ({', '.join(unknown)} is not one)" if unknown else ""),
            )
        _require(self.plan in ("even", "auto"), f"cluster.plan={self.plan!r}: choose even or auto")
        _require(not self.figures or (self.plan == "auto" and len(self.figures) == self.num_workers),
                 f"cluster.figures lists {len(self.figures)} files: give one per worker "
                 f"(cluster.num_workers={self.num_workers}), with cluster.plan=auto")
        _require(self.plan != "auto" or not self.workers,
                 "cluster.plan=auto plans the layers itself: leave cluster.workers empty, or set cluster.plan=even to "
                 "use its ranges")
        _require(
            not self.workers or len(self.workers) == self.num_workers,
            f"cluster.workers lists {len(self.workers)} workers but cluster.num_workers={self.num_workers}: "
            "make them agree",
        )


@dataclass(kw_only=True)
class BatchingConfig:
    """Admission and batching on the coordinator."""

    max_batch_size: int = 16
    """Most sequences generating at once (split across the micro-batches in flight)."""
    batching_window_ms: float = 5.0
    """How long a new request waits for others to share its first step."""
    max_queue_size: int = 256
    """Most requests waiting; more are refused (HTTP 429)."""
    max_tokens_per_micro_batch: int = 4096
    """Bounds a prefill micro-batch's padded tokens (a longer single chunk still runs alone)."""
    prefill_chunk_tokens: int | None = 256
    """A prompt enters the cache in chunks of at most this many tokens, taking turns with other sequences' decode
    steps: a long prompt never makes one step outlast cluster.rpc_timeout_s, and running requests keep streaming.
    A running request waits for at most one chunk per token it generates (SmolLM2, 4 workers, 2 cores: ~1 s a
    chunk at 8k context). Keep a chunk well under the RPC timeout (a big model on few cores: lower it). null: whole."""

    def __post_init__(self) -> None:
        _require(self.max_batch_size >= 1, f"batching.max_batch_size={self.max_batch_size}: need >= 1")
        _require(self.batching_window_ms >= 0, "batching.batching_window_ms must be >= 0")
        _require(self.max_queue_size >= 1, f"batching.max_queue_size={self.max_queue_size}: need >= 1")
        _require(self.prefill_chunk_tokens is None or self.prefill_chunk_tokens >= 1,
                 f"batching.prefill_chunk_tokens={self.prefill_chunk_tokens}: need >= 1 or null")


@dataclass(kw_only=True)
class CacheConfig:
    """Each worker's KV block pool."""

    kv_cache_mb: float = 512
    """Memory for keys and values on each worker, in MiB."""
    block_size: int = 16
    """Tokens per block."""
    min_capacity_tokens: int = 256
    """Start-up fails when the cache holds fewer tokens than this (one ordinary request)."""
    prefix_caching: bool = True
    """Keep the keys and values of full blocks after their request ends (least recently used evicted first, inside
    kv_cache_mb) and start a request that shares a prefix with an earlier one after the shared blocks, on every
    stage. Results do not change."""
    window_pool: bool = True
    """Models that mix windowed and full-attention layers (Gemma 2/3, Qwen2/Qwen3 below max_window_layers) keep the
    windowed layers' keys and values in a pool of their own, whose blocks go back as the window slides (needs
    batching.prefill_chunk_tokens); the prefix cache keeps them too, so a hit reaches as far as that pool still holds
    the window before its end. False: one pool that keeps every block of every layer for the whole length."""

    def __post_init__(self) -> None:
        _require(self.kv_cache_mb > 0, f"cache.kv_cache_mb={self.kv_cache_mb}: need > 0")
        _require(self.block_size >= 1, f"cache.block_size={self.block_size}: need >= 1")


@dataclass(kw_only=True)
class WorkerConfig:
    """CPU settings of each worker process."""

    worker_threads: int = 8
    """torch intra-op threads per worker (capped at the cores the worker is pinned to)."""
    enable_cpu_pinning: bool = True
    """Pin each worker to its own cores; with fewer cores than workers x threads, workers share round-robin."""
    enable_simd: bool = True
    """False makes torch use its plain kernels (ATEN_CPU_CAPABILITY=default)."""
    pack_weights: bool = True
    """Prepare float32 linear layers at load for decode's small matmuls: ChatLoop's native kernel, or
    oneDNN's packed weights without it (1.5-2.8x faster than torch's plain matmuls on CPU); other dtypes
    keep plain weights."""
    native_kernels: bool = True
    """ChatLoop's C kernels, built at first use with the system C compiler (x86-64 with AVX2 and FMA; off
    with enable_simd=false): float32 decode attention read in place from the paged KV cache and, with
    pack_weights, float32 matmuls of up to 16 rows. false: torch's SDPA and oneDNN's packed matmuls."""
    omp_spin_count: int | None = 20000
    """GOMP_SPINCOUNT of worker processes: how long an idle OpenMP thread spins before it sleeps (~0.5 ms
    here). libgomp's default (300000, ~7 ms) kept the stage that had just finished spinning on the cores the
    next stage needed. null: the environment's or libgomp's default."""
    metrics_port: int = 9091
    """Worker k serves Prometheus metrics on metrics_port + k."""

    def __post_init__(self) -> None:
        _require(self.worker_threads >= 1, f"worker.worker_threads={self.worker_threads}: need >= 1")
        _require(
            self.omp_spin_count is None or self.omp_spin_count >= 0,
            f"worker.omp_spin_count={self.omp_spin_count}: need >= 0 or null",
        )


@dataclass(kw_only=True)
class ServerConfig:
    """The OpenAI-compatible HTTP API on the coordinator."""

    host: str = "127.0.0.1"
    """Bind address; loopback by default."""
    port: int = 8000
    """HTTP port."""
    api_key_file: str | None = None
    """A file whose first line is the API key requests must send as 'Authorization: Bearer <key>'. Without it the
    key is $CHATLOOP_API_KEY, and without that there is none. (No option takes the key itself: a command line
    shows in ps and in Hydra's run folder.)"""
    max_request_mb: float = 32
    """Larger request bodies are refused with 413 before they are read."""
    request_timeout_s: float | None = None
    """A request not finished this many seconds after it arrived ends with 504 (waiting in the queue, or for a lost
    worker to be replaced, included). null: no limit of its own (cluster.recovery_timeout_s still applies)."""
    model_name: str | None = None
    """The model id the API reports; None: the model's name."""
    default_max_tokens: int = 256
    """max_tokens of a chat completion that sets none (OpenAI's /v1/completions default, 16, stays)."""
    health_timeout_s: float = 3.0
    """How long a health check waits for each stage's answer."""
    health_interval_s: float = 10.0
    """Seconds between background health checks (2 s while a stage is down); new requests fail fast while one is."""

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, f"server.port={self.port} is not a TCP port")
        _require(self.default_max_tokens >= 1, f"server.default_max_tokens={self.default_max_tokens}: need >= 1")
        _require(self.max_request_mb > 0, f"server.max_request_mb={self.max_request_mb}: need > 0")
        _require(self.request_timeout_s is None or self.request_timeout_s > 0,
                 f"server.request_timeout_s={self.request_timeout_s}: need > 0 or null")
        _require(self.health_timeout_s > 0, f"server.health_timeout_s={self.health_timeout_s}: need > 0")
        _require(self.health_interval_s > 0, f"server.health_interval_s={self.health_interval_s}: need > 0")


MAX_SPECULATIVE_TOKENS = 16  # (the engine's chatloop.engine.requests.MAX_SPECULATIVE_TOKENS)


@dataclass(kw_only=True)
class SpeculativeConfig:
    """Speculative decoding: a cheap guess of each sequence's next tokens, verified in one step through every stage
    (greedy output unchanged; sampled output keeps the model's distribution). Requests may override method and k."""

    method: str | None = None
    """null (off), ngram (look the next tokens up in the prompt and output so far; no model) or draft (a small
    model of the same tokenizer, speculative.draft_model, run in the coordinator's process)."""
    num_tokens: int = 4
    """k: the most tokens drafted for one sequence at one step, 1 to 16 (fewer each as more sequences draft in one
    micro-batch)."""
    draft_model: str | None = None
    """With method=draft: anything model.name accepts ('smollm2', a checkpoint folder, a .gguf file)."""
    draft_quantization: str | None = None
    """The draft's weights: null (model.dtype), int8, int4 or gguf (as model.quantization)."""
    draft_kv_cache_mb: float = 64
    """The draft's own KV cache on the coordinator, in MiB."""
    max_draft_mb: float | None = None
    """The most memory the draft (weights and KV cache) may take on the coordinator; null: what the machine has
    available at start. A draft that needs more is refused at start."""
    draft_threads: int | None = 1
    """OpenMP threads of the draft's steps: 1 by default (a step's barriers stall whenever one of its threads loses
    its core to the stages or other work sharing the coordinator's host); more where the draft has cores of its own;
    null: torch's default."""

    def __post_init__(self) -> None:
        _require(self.method in (None, "ngram", "draft"),
                 f"speculative.method={self.method!r}: choose null, ngram or draft")
        _require(isinstance(self.num_tokens, int) and 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS,
                 f"speculative.num_tokens={self.num_tokens}: choose 1 to {MAX_SPECULATIVE_TOKENS} drafted tokens")
        _require(self.method != "draft" or bool(self.draft_model),
                 "speculative.method=draft needs speculative.draft_model (e.g. smollm2, a folder or a .gguf file), "
                 "or choose speculative.method=ngram")
        _require(self.draft_quantization in (None, "int8", "int4", "gguf"),
                 f"speculative.draft_quantization={self.draft_quantization!r}: choose null, int8, int4 or gguf")
        _require(self.draft_kv_cache_mb > 0, f"speculative.draft_kv_cache_mb={self.draft_kv_cache_mb}: need > 0")
        _require(self.max_draft_mb is None or self.max_draft_mb > 0,
                 f"speculative.max_draft_mb={self.max_draft_mb}: need > 0 or null")
        _require(self.draft_threads is None or (isinstance(self.draft_threads, int) and self.draft_threads >= 1),
                 f"speculative.draft_threads={self.draft_threads}: need at least 1 thread, or null (torch's default)")


@dataclass(kw_only=True)
class SamplingConfig:
    """Default sampling for the command-line tools."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ChatLoopConfig:
    """Everything, as composed by Hydra from ``conf/config.yaml`` and overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    prompt: str = "What is the capital of France?"
    """chatloop-generate's prompt."""
    chat: bool = True
    """Wrap the prompt in the tokenizer's chat template."""
    max_new_tokens: int = 64
    """chatloop-generate's and chatloop-chat's token limit per answer."""
    log_level: str = "INFO"


def register_configs() -> None:
    """Make the schema known to Hydra as ``chatloop_schema`` (``conf/config.yaml`` builds on it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="chatloop_schema", node=ChatLoopConfig)


def to_config(cfg: Any) -> ChatLoopConfig:
    """Turn a Hydra DictConfig into the typed dataclasses, running every ``__post_init__`` check."""
    from omegaconf import OmegaConf

    if isinstance(cfg, ChatLoopConfig):
        return cfg
    result = OmegaConf.to_object(cfg)
    if not isinstance(result, ChatLoopConfig):
        raise TypeError(
            "the composed config is not a ChatLoopConfig: does conf/config.yaml start from chatloop_schema?")
    return result


def load_config(overrides: Sequence[str] = ()) -> ChatLoopConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides (``["cluster.num_workers=2"]``) into typed config."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        try:
            composed = compose(config_name="config", overrides=list(overrides))
        except HydraException as e:  # Hydra keeps the useful part (say, an unknown key) in the cause
            cause = f"\n{str(e.__cause__).splitlines()[0]}" if e.__cause__ is not None else ""
            raise ValueError(f"{e}{cause}") from None
        return to_config(composed)
