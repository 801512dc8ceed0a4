"""``cluster.plan=auto`` on the coordinator: the stages' specs from the workers' probes (:mod:`.probe`) and the
placement (:mod:`chatloop.partition.placement`). No transport here: the caller gathers the figures."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..config import ChatLoopConfig
from ..partition import Manifest, PlanError
from ..partition.costs import model_costs
from ..partition.placement import HostFigures, Placement, place_layers
from .runner import StageSpec

__all__ = ["plan_from_files", "plan_specs"]

log = logging.getLogger(__name__)


def plan_specs(cfg: ChatLoopConfig, specs: Sequence[StageSpec], figures: Sequence[HostFigures],
               manifest: Manifest) -> tuple[list[StageSpec], Placement]:
    """``specs`` (one per worker, in chain order) given the ranges the placement chooses from ``figures`` (each
    worker's probe, same order), at ``batching.max_batch_size``. Every worker keeps at least one layer (it has
    joined); its KV pool grows with its layers, so the pipeline holds as many tokens as the even split's.

    Raises :class:`~chatloop.partition.PlanError` when no plan fits the workers' memory and files.
    """
    if len(figures) != len(specs):
        raise ValueError(f"{len(figures)} probes for {len(specs)} stages: every worker must report")
    figures = [replace(f, name=s.name) for f, s in zip(figures, specs)]
    costs = model_costs(manifest, kv_cache_mb=cfg.cache.kv_cache_mb, num_hosts=len(specs))
    placement = place_layers(figures, costs, cfg.batching.max_batch_size, keep_all=True,
                             in_flight=cfg.cluster.max_in_flight)
    even_share = math.ceil(costs.num_layers / len(specs))
    planned = [replace(spec, expected_layers=stage.layers, expected_file=None, planned=True,
                       kv_cache_mb=spec.kv_cache_mb * len(stage.layers) / even_share)
               for spec, stage in zip(specs, placement.stages)]
    for stage, f in zip(placement.stages, figures):
        log.info("plan auto: %s layers %s (a layer %.3f ms at batch 1, %d threads, CPU limit %s, %.0f MiB free)",
                 stage.host, stage.layers, f.decode_s[1] * 1e3, f.threads or 0, f.cpu_limit, f.memory_bytes / 2**20)
    log.info("plan auto: predicted %.1f tokens/s at batch 1, %.1f at batch %d", placement.tokens_per_s_1,
             placement.tokens_per_s, placement.batch)
    return planned, placement


def plan_from_files(cfg: ChatLoopConfig, specs: Sequence[StageSpec], directory: str | Path) -> list[StageSpec]:
    """:func:`plan_specs` from the figures files ``cluster.figures`` names (``chatloop-plan probe --output``)."""
    figures = []
    for path in cfg.cluster.figures:
        try:
            figures.append(HostFigures.from_dict(json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cluster.figures: cannot read {path} ({e}): write it with chatloop-plan probe --output "
                            f"{path} on its worker's host") from None
    planned, _ = plan_specs(cfg, specs, figures, Manifest.load(Path(directory)))
    return planned
