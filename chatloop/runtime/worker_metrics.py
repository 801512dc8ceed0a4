"""A worker's Prometheus endpoint: worker k serves ``chatloop_stage_*`` on ``worker.metrics_port + k``.

:func:`~chatloop.runtime.worker.serve_worker` calls :func:`start_worker_metrics` in each worker process
before it joins a generation, before the stage exists. Per-micro-batch numbers come from the observer
this module registers in the worker's ``WorkerHost.observers``; the rest is read from its
stage at scrape time. Every metric has the label ``stage`` (worker0...).

=============================================  =========  ==============================================
name                                           type       meaning
=============================================  =========  ==============================================
chatloop_stage_compute_seconds                 histogram  this stage's layers on one micro-batch
chatloop_stage_queue_seconds                   histogram  a micro-batch's wait between arriving and computing
chatloop_stage_downstream_seconds              histogram  handing a micro-batch on: encoding it and writing it
                                                          to the link to the next stage (or the coordinator)
chatloop_stage_received_bytes_total            counter    tensor bytes received (token ids or activations)
chatloop_stage_sent_bytes_total                counter    tensor bytes sent on (activations or token ids)
chatloop_stage_micro_batches_total             counter    micro-batches computed
chatloop_stage_busy_seconds_total              counter    time spent computing (rate() = busy fraction)
chatloop_stage_idle_ratio                      gauge      1 - busy / uptime since the stage loaded
chatloop_stage_uptime_seconds                  gauge      since the stage loaded
chatloop_stage_resident_memory_bytes           gauge      the worker process's RSS
chatloop_stage_kv_blocks                       gauge      KV cache blocks in this stage's pool
chatloop_stage_kv_cache_bytes                  gauge      bytes of this stage's KV pool
chatloop_stage_partition_bytes                 gauge      size of this stage's partition file
chatloop_stage_info{layers,host,pid}           gauge      1, with the stage's layers, host and pid
=============================================  =========  ==============================================

The endpoint binds ``$CHATLOOP_METRICS_HOST`` (default 127.0.0.1, loopback): set it to the
worker's private address to scrape it from another machine. It serves metrics only; the RPC
ports, which execute pickled data, must stay on a private network either way.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.pipeline import stage_name
from .worker_host import WorkerHost

__all__ = ["WorkerMetrics", "start_worker_metrics", "METRICS_HOST_ENV"]

log = logging.getLogger(__name__)

METRICS_HOST_ENV = "CHATLOOP_METRICS_HOST"
_COMPUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _HostCollector(Collector):
    """Reads the worker's live stage at scrape time (nothing until the stage has loaded)."""

    def __init__(self, name: str, worker: WorkerHost) -> None:
        self.name = name
        self.worker = worker
        self.process = psutil.Process()

    def collect(self) -> Iterator[Metric]:
        host = self.worker.stage
        labels, values = ["stage"], [self.name]

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, doc, labels=labels)
            family.add_metric(values, value)
            return family

        yield gauge("chatloop_stage_resident_memory_bytes", "Resident memory of the worker process.",
                    self.process.memory_info().rss)
        if host is None:
            return
        runner = host.runner
        uptime = max(time.time() - runner.started, 1e-9)
        busy = CounterMetricFamily("chatloop_stage_busy_seconds", "Seconds spent computing micro-batches.",
                                   labels=labels)
        busy.add_metric(values, runner.busy_seconds)
        yield busy
        yield gauge("chatloop_stage_idle_ratio", "1 - busy / uptime since the stage loaded.",
                    max(0.0, 1 - runner.busy_seconds / uptime))
        yield gauge("chatloop_stage_uptime_seconds", "Seconds since the stage loaded.", uptime)
        yield gauge("chatloop_stage_kv_blocks", "KV cache blocks in this stage's pool.", runner.num_blocks)
        yield gauge("chatloop_stage_kv_cache_bytes", "Bytes of this stage's KV pool.", runner.cache.num_bytes)
        yield gauge("chatloop_stage_partition_bytes", "Size of this stage's partition file.",
                    runner.partition_bytes or 0)
        info = GaugeMetricFamily("chatloop_stage_info", "The stage's layers, host and pid.",
                                 labels=["stage", "layers", "host", "pid"])
        info.add_metric([self.name, str(runner.stage.layers_range), socket.gethostname(), str(os.getpid())], 1)
        yield info


class WorkerMetrics:
    """The registry of one worker and the observer the stage host calls after each micro-batch."""

    def __init__(self, name: str, worker: WorkerHost) -> None:
        self.name = name
        self.registry = CollectorRegistry()
        r = self.registry
        self.compute = Histogram("chatloop_stage_compute_seconds", "This stage's layers on one micro-batch.", ["stage"],
                                 buckets=_COMPUTE_BUCKETS, registry=r).labels(name)
        self.queue = Histogram("chatloop_stage_queue_seconds", "Wait between a micro-batch's arrival and its compute.",
                               ["stage"], buckets=_COMPUTE_BUCKETS, registry=r).labels(name)
        self.downstream = Histogram("chatloop_stage_downstream_seconds",
                                    "Forwarding to the next stage until its answer.",
                                    ["stage"], buckets=_COMPUTE_BUCKETS, registry=r).labels(name)
        self.received = Counter("chatloop_stage_received_bytes", "Tensor bytes received.", ["stage"],
                                registry=r).labels(name)
        self.sent = Counter("chatloop_stage_sent_bytes", "Tensor bytes sent on.", ["stage"], registry=r).labels(name)
        self.micro_batches = Counter("chatloop_stage_micro_batches", "Micro-batches computed.", ["stage"],
                                     registry=r).labels(name)
        r.register(_HostCollector(name, worker))

    def observe(self, record: dict) -> None:
        """The stage's observer (see ``WorkerHost.observers``)."""
        if "compute_s" in record:
            self.compute.observe(record["compute_s"])
            self.queue.observe(max(0.0, record["queue_s"]))
            self.received.inc(record["bytes_in"])
            self.sent.inc(record["bytes_out"])
            self.micro_batches.inc()
        if "downstream_s" in record:
            self.downstream.observe(record["downstream_s"])


def start_worker_metrics(index: int, port: int, worker: WorkerHost, host: str | None = None) -> WorkerMetrics | None:
    """Serve worker ``index``'s metrics (``worker``'s stage) on ``host:port`` in a daemon thread; None (and a
    warning) if the port is taken.

    A metrics endpoint that cannot start never stops the worker from serving its stage.
    """
    metrics = WorkerMetrics(stage_name(index), worker)
    worker.observers.append(metrics.observe)
    address = host or os.environ.get(METRICS_HOST_ENV, "127.0.0.1")
    try:
        start_http_server(port, addr=address, registry=metrics.registry)
    except OSError as e:
        log.warning("worker%d: no metrics endpoint on %s:%d (%s): set worker.metrics_port to free ports",
                    index, address, port, e)
        return None
    log.info("worker%d: Prometheus metrics on http://%s:%d/metrics", index, address, port)
    return metrics
