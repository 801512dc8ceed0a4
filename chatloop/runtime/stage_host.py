"""A worker's stage as an RPC object: it computes and forwards to the next stage; the last one answers the coordinator.

``forward`` is an ``async_execution`` function: it returns a future at once, the compute runs
on the stage's own thread, and the call to the next stage is asynchronous too, so no RPC
thread ever blocks and any number of micro-batches can be in flight. The last stage sends
the sampled token ids straight to the coordinator (``results.deliver``); each ``forward``
future then completes with None, or with the error of the stage that failed, named.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

import psutil
import torch
import torch.distributed.rpc as rpc

from ..engine.pipeline import StageError, StageRunner, compute_thread
from ..models import StepBatch
from ..models.kv_cache import blocks_for_stage
from ..partition.loader import load_stage
from ..partition.plan import LayerRange
from .results import COORDINATOR, deliver, raise_failure

__all__ = ["StageHost"]

CURRENT_HOST: StageHost | None = None
"""The stage this worker process hosts, once created (chatloop.serving.worker_metrics reads it)."""
OBSERVERS: list[Callable[[dict], None]] = []
"""Called with {"queue_s", "compute_s", "bytes_in", "bytes_out"} after each micro-batch (stage thread), and with
{"downstream_s"} when the next stage answers (RPC thread); chatloop.serving.worker_metrics registers one."""


def _observe(record: dict) -> None:
    for observer in OBSERVERS:
        try:
            observer(record)
        except Exception:  # metrics never break a micro-batch
            pass


class StageHost:
    """Lives on a worker (created there with ``rpc.remote``); holds the stage, its KV pool and its thread."""

    def __init__(
        self,
        name: str,
        directory: str,
        index: int,
        expected_layers: tuple[int, int] | None,
        dtype: str,
        kv_cache_mb: float,
        block_size: int,
        verify_sha256: bool,
        pack_weights: bool,
        native_kernels: bool,
        rpc_timeout_s: float,
        settings: dict,
    ) -> None:
        self.name = name
        self.started = time.time()
        self._executor = compute_thread(name)  # builds the stage and its KV pool too: see compute_thread
        layers = LayerRange(*expected_layers) if expected_layers else None

        def build() -> StageRunner:
            torch_dtype = getattr(torch, dtype)
            stage = load_stage(
                directory, index, expected_layers=layers, dtype=torch_dtype, verify_sha256=verify_sha256,
                pack_weights=pack_weights, native_kernels=native_kernels,
            )
            num_blocks = blocks_for_stage(kv_cache_mb, block_size, stage.args, len(stage.layers_range), torch_dtype)
            if num_blocks < 1:
                raise ValueError(f"{name}: kv_cache_mb={kv_cache_mb} holds not even one block of {block_size} tokens: raise cache.kv_cache_mb")
            return StageRunner(stage, num_blocks, block_size, name)

        self.runner = self._executor.submit(build).result()
        self.partition_bytes = os.path.getsize(os.path.join(directory, f"partition_{index}.safetensors"))
        self.settings = settings
        self.rpc_timeout_s = rpc_timeout_s
        self.next: rpc.RRef | None = None
        self.next_name = ""
        global CURRENT_HOST
        CURRENT_HOST = self

    def connect(self, next_stage: rpc.RRef | None, next_name: str) -> None:
        """Point this stage at the one after it (None for the last)."""
        self.next, self.next_name = next_stage, next_name

    def describe(self) -> dict:
        """What status, health and the coordinator's start-up report show."""
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "layers": str(self.runner.stage.layers_range),
            "num_blocks": self.runner.num_blocks,
            "kv_cache_bytes": self.runner.cache.num_bytes,
            "partition_bytes": self.partition_bytes,
            "rss_bytes": psutil.Process().memory_info().rss,
            "uptime_s": time.time() - self.started,
            "busy_s": self.runner.busy_seconds,
            "num_micro_batches": self.runner.num_micro_batches,
            **self.settings,
        }

    def timings(self) -> list[tuple[int, float, float]]:
        """(micro-batch, start, end) wall-clock seconds of the recorded micro-batches, then forget them."""
        offset = time.time() - time.perf_counter()
        out = [(t.micro_batch, t.start + offset, t.end + offset) for t in self.runner.timings]
        self.runner.timings.clear()
        return out

    def fail_next(self, message: str) -> None:
        """Test hook: the next micro-batch raises inside this stage."""
        self._inject = message

    @staticmethod
    @rpc.functions.async_execution
    def forward(host_rref: rpc.RRef, mb_id: int, inputs: torch.Tensor, batch: tuple, sampling: list) -> torch.futures.Future:
        host: StageHost = host_rref.local_value()
        result: torch.futures.Future = torch.futures.Future()
        host._executor.submit(host._work, result, mb_id, inputs, batch, sampling, time.perf_counter())
        return result

    def _work(self, result: torch.futures.Future, mb_id: int, inputs: torch.Tensor, batch: tuple, sampling: list, arrived: float = 0.0) -> None:
        started = time.perf_counter()
        try:
            inject = getattr(self, "_inject", None)
            if inject:
                self._inject = None
                inputs = inputs[..., :-1] if inputs.dim() == 3 else inputs[:, :0]  # a wrong shape, as a bug would make
            out = self.runner.run(inputs, StepBatch.from_payload(batch), sampling, mb_id)
        except Exception as e:
            result.set_exception(e)
            return
        if OBSERVERS:
            nbytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 8 * len(out)
            _observe({"queue_s": started - arrived, "compute_s": time.perf_counter() - started,
                      "bytes_in": inputs.numel() * inputs.element_size(), "bytes_out": nbytes})
        if self.next is None:
            self._deliver(result, mb_id, out)
            return
        sent = time.perf_counter()
        try:
            downstream = rpc.rpc_async(
                self.next.owner(), StageHost.forward, args=(self.next, mb_id, out, batch, sampling), timeout=self.rpc_timeout_s
            )
        except Exception as e:
            result.set_exception(RuntimeError(f"{self.next_name} is unreachable: {e}"))
            return

        def relay(f: torch.futures.Future) -> None:
            if OBSERVERS:
                _observe({"downstream_s": time.perf_counter() - sent})
            try:
                raise_failure(f, self.next_name)
                result.set_result(None)
            except StageError as e:
                result.set_exception(e)

        downstream.add_done_callback(relay)

    def _deliver(self, result: torch.futures.Future, mb_id: int, token_ids: list[int]) -> None:
        """Hand the last stage's tokens to the coordinator; ``result`` completes once it has them."""
        try:
            delivered = rpc.rpc_async(COORDINATOR, deliver, args=(mb_id, token_ids), timeout=self.rpc_timeout_s)
        except Exception as e:
            result.set_exception(RuntimeError(f"{self.name} cannot reach the coordinator: {e}"))
            return

        def acknowledge(f: torch.futures.Future) -> None:
            try:
                f.wait()
                result.set_result(None)
            except Exception as e:
                result.set_exception(RuntimeError(f"{self.name} could not hand micro-batch {mb_id}'s tokens to the coordinator: {e}"))

        delivered.add_done_callback(acknowledge)
