"""The coordinator's Prometheus metrics (GET /metrics), all named ``chatloop_*``.

Request-side metrics are observed by the routes; the engine's state (queue, running
sequences, micro-batches in flight, KV blocks, tokens) is read at scrape time by a collector,
so the engine never calls into the serving layer. Each app has its own registry, so
several apps can live in one process (tests).

=============================================  =========  ==============================================
name                                           type       meaning
=============================================  =========  ==============================================
chatloop_requests_total{endpoint,outcome}      counter    HTTP generation requests by outcome: stop, length,
                                                          disconnected, invalid, unauthorized, queue_full,
                                                          unavailable, error
chatloop_request_duration_seconds{endpoint}    histogram  submit to last byte of an admitted request
chatloop_time_to_first_token_seconds           histogram  submit to the first generated token
chatloop_inter_token_latency_seconds           histogram  between consecutive tokens of one sequence
chatloop_prompt_tokens_total                   counter    prompt tokens of admitted requests
chatloop_completion_tokens_total               counter    tokens returned to clients
chatloop_generated_tokens_total                counter    tokens sampled by the pipeline (rate(): tokens/s)
chatloop_sequences_finished_total{reason}      counter    scheduler: stop, length, cancelled, error
chatloop_queue_depth                           gauge      requests waiting for admission
chatloop_queue_capacity                        gauge      batching.max_queue_size (more get HTTP 429)
chatloop_sequences_running                     gauge      sequences admitted and generating
chatloop_micro_batches_in_flight               gauge      micro-batches inside the pipeline now
chatloop_micro_batch_size                      gauge      sequences in the last micro-batch sent
chatloop_kv_blocks_used / _free / _capacity    gauge      the coordinator's KV block allocator
chatloop_kv_block_size_tokens                  gauge      tokens per block
chatloop_kv_blocks_cached                      gauge      blocks in the prefix cache (those no sequence holds are free)
chatloop_kv_window_blocks_used / _capacity     gauge      the windowed layers' own pool (mixed-window models; else 0)
chatloop_prefix_cache_queries_tokens_total     counter    tokens looked up in the prefix cache at admission
chatloop_prefix_cache_hits_tokens_total        counter    of those, tokens found (not computed again); hit rate:
                                                          hits / queries
chatloop_speculative_drafted_tokens_total      counter    tokens drafted by speculative decoding and verified
chatloop_speculative_accepted_tokens_total     counter    of those, tokens the model accepted; acceptance rate:
                                                          accepted / drafted
chatloop_stage_up{stage}                       gauge      1 if the stage answered the last health check
chatloop_cluster_state{state}                  gauge      1 for the current state: serving, recovering, degraded
chatloop_replays_total                         counter    sequences prefilled again after a lost worker was replaced
chatloop_recovery_seconds                      histogram  from noticing a lost worker to the rebuilt pipeline
chatloop_worker_restarts_total{stage}          counter    workers started again by the coordinator
=============================================  =========  ==============================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine import EngineStats
from .health import HealthMonitor

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RECOVERY_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Reads the engine's stats and the last health report at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], health: HealthMonitor) -> None:
        self.stats = stats
        self.health = health

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        yield _gauge("chatloop_queue_depth", "Requests waiting for admission.", stats.num_waiting)
        yield _gauge("chatloop_queue_capacity", "Most requests that may wait (batching.max_queue_size).",
                     stats.queue_capacity)
        yield _gauge("chatloop_sequences_running", "Sequences admitted and generating.", stats.num_running)
        yield _gauge("chatloop_micro_batches_in_flight", "Micro-batches inside the pipeline.", stats.num_in_flight)
        yield _gauge("chatloop_micro_batch_size", "Sequences in the last micro-batch sent.", stats.last_batch_size)
        generated = CounterMetricFamily("chatloop_generated_tokens", "Tokens sampled by the pipeline.")
        generated.add_metric([], stats.generated_tokens)
        yield generated
        finished = CounterMetricFamily("chatloop_sequences_finished", "Sequences that left the scheduler, by reason.",
                                       labels=["reason"])
        for reason, count in sorted(dict(stats.finished).items()):
            finished.add_metric([reason], count)
        yield finished
        yield _gauge("chatloop_kv_blocks_free", "KV cache blocks free on every stage.", stats.kv_blocks_free)
        yield _gauge("chatloop_kv_blocks_used", "KV cache blocks held by sequences.", stats.kv_blocks_used)
        yield _gauge("chatloop_kv_blocks_capacity", "KV cache blocks per stage (the smallest stage's pool).",
                     stats.kv_blocks_total)
        yield _gauge("chatloop_kv_block_size_tokens", "Tokens per KV cache block.", stats.kv_block_size)
        yield _gauge("chatloop_kv_blocks_cached", "KV cache blocks in the prefix cache (those no sequence holds are "
                     "free).", stats.kv_blocks_cached)
        yield _gauge("chatloop_kv_window_blocks_used", "Blocks of the windowed layers' own pool held by sequences "
                     "(models that mix windowed and full layers; 0 otherwise).", stats.kv_window_blocks_used)
        yield _gauge("chatloop_kv_window_blocks_capacity", "Blocks of the windowed layers' own pool (0: none).",
                     stats.kv_window_blocks_total)
        queries = CounterMetricFamily("chatloop_prefix_cache_queries_tokens",
                                      "Tokens looked up in the prefix cache when sequences were admitted.")
        queries.add_metric([], stats.prefix_cache_queries)
        yield queries
        hits = CounterMetricFamily("chatloop_prefix_cache_hits_tokens",
                                   "Tokens found in the prefix cache (their keys and values not computed again).")
        hits.add_metric([], stats.prefix_cache_hits)
        yield hits
        drafted = CounterMetricFamily("chatloop_speculative_drafted_tokens",
                                      "Tokens drafted by speculative decoding and verified by the pipeline.")
        drafted.add_metric([], stats.speculative_drafted_tokens)
        yield drafted
        accepted = CounterMetricFamily("chatloop_speculative_accepted_tokens",
                                       "Drafted tokens the model accepted (speculative decoding).")
        accepted.add_metric([], stats.speculative_accepted_tokens)
        yield accepted
        yield from _healing(stats)
        report = self.health.latest()
        if report is not None:
            up = GaugeMetricFamily("chatloop_stage_up", "1 if the stage answered the last health check.",
                                   labels=["stage"])
            for stage in report.stages:
                up.add_metric([stage.name], 1 if stage.up else 0)
            yield up


def _healing(stats: EngineStats) -> Iterator[Metric]:
    state = GaugeMetricFamily("chatloop_cluster_state", "1 for the cluster's current state.", labels=["state"])
    for name in ("serving", "recovering", "degraded"):
        state.add_metric([name], 1 if stats.cluster_state == name else 0)
    yield state
    replays = CounterMetricFamily("chatloop_replays", "Sequences prefilled again after a lost worker was replaced.")
    replays.add_metric([], stats.replays)
    yield replays
    durations = sorted(stats.recovery_seconds)
    buckets = [(f"{bound:g}", sum(1 for d in durations if d <= bound)) for bound in _RECOVERY_BUCKETS]
    recovery = HistogramMetricFamily("chatloop_recovery_seconds",
                                     "From noticing a lost worker to the rebuilt pipeline.")
    recovery.add_metric([], [*buckets, ("+Inf", len(durations))], sum_value=sum(durations))
    yield recovery
    restarts = CounterMetricFamily("chatloop_worker_restarts", "Workers started again by the coordinator.",
                                   labels=["stage"])
    for stage, count in sorted(stats.worker_restarts.items()):
        restarts.add_metric([stage], count)
    yield restarts


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class ServerMetrics:
    """The coordinator's registry and the request-side metrics the routes observe."""

    def __init__(self, stats: Callable[[], EngineStats], health: HealthMonitor) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chatloop_requests", "HTTP generation requests by endpoint and outcome.", ["endpoint", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "chatloop_request_duration_seconds", "Submit to the last byte of an admitted request.", ["endpoint"],
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "chatloop_time_to_first_token_seconds", "Submit to the first generated token.", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "chatloop_inter_token_latency_seconds", "Time between consecutive tokens of one sequence.",
            buckets=_ITL_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("chatloop_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.completion_tokens = Counter("chatloop_completion_tokens", "Generated tokens returned to clients.",
                                         registry=r)
        r.register(_EngineCollector(stats, health))

    def outcome(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()

    def exposition(self) -> bytes:
        """The text format for GET /metrics."""
        return generate_latest(self.registry)
