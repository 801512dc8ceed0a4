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
from ..models import LayerRange
from ..partition import Manifest, PlanError
from ..partition.costs import model_costs
from ..partition.placement import HostFigures, Placement, place_layers, predict
from .runner import StageSpec

__all__ = ["figures_from_files", "plan_from_files", "plan_specs"]

log = logging.getLogger(__name__)


KEEP_WITHIN = 0.10
"""A new generation keeps the ranges its workers hold while they are predicted this close to the new plan's speed:
probes on a busy machine vary by more than that, and a changed range reloads its stage."""


def plan_specs(cfg: ChatLoopConfig, specs: Sequence[StageSpec], figures: Sequence[HostFigures],
               manifest: Manifest, current: Sequence[LayerRange | None] = ()) -> tuple[list[StageSpec], Placement]:
    """``specs`` (one per worker, in chain order) given the ranges the placement chooses from ``figures`` (each
    worker's probe, same order), at ``batching.max_batch_size``. Every worker keeps at least one layer (it has
    joined); its KV pool grows with its layers, so the pipeline holds as many tokens as the even split's.
    ``current``: the range each worker holds now (None: a worker that holds none, such as a replacement); while they
    still cover the model and are predicted within :data:`KEEP_WITHIN` of the new plan, they are kept.

    Raises :class:`~chatloop.partition.PlanError` when no plan fits the workers' memory and files.
    """
    if len(figures) != len(specs):
        raise ValueError(f"{len(figures)} probes for {len(specs)} stages: every worker must report")
    figures = [replace(f, name=s.name) for f, s in zip(figures, specs)]
    costs = model_costs(manifest, kv_cache_mb=cfg.cache.kv_cache_mb, num_hosts=len(specs))
    placement = place_layers(figures, costs, cfg.batching.max_batch_size, keep_all=True,
                             in_flight=cfg.cluster.max_in_flight)
    _log_left_out(place_layers(figures, costs, cfg.batching.max_batch_size, in_flight=cfg.cluster.max_in_flight),
                  placement)
    kept = _keepable(list(current), costs.num_layers)
    if kept is not None and kept != placement.ranges:
        try:
            now = predict(figures, costs, kept, cfg.batching.max_batch_size, in_flight=cfg.cluster.max_in_flight)
        except PlanError:  # a worker now lacks the memory or the files for its range
            now = None
        if now is not None and now.tokens_per_s >= placement.tokens_per_s * (1 - KEEP_WITHIN):
            log.info("plan auto: keeping the ranges %s (predicted %.1f tokens/s; the new plan %s, %.1f)",
                     ", ".join(map(str, kept)), now.tokens_per_s, ", ".join(map(str, placement.ranges)),
                     placement.tokens_per_s)
            placement = now
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


def _log_left_out(free: Placement, kept: Placement) -> None:
    """A warning for each worker the plan free to leave hosts out (``chatloop-plan show``'s) does without: a running
    cluster keeps every worker that joined, at least a layer each, so say why and what it costs."""
    for host, why in free.left_out.items():
        log.warning("plan auto: %s would be left out (%s), but it joined and keeps a layer: %.1f tokens/s at "
                    "batch %d with it, %.1f without. Start the cluster without it to leave it out", host, why,
                    kept.tokens_per_s, kept.batch, free.tokens_per_s)


def _keepable(current: list[LayerRange | None], num_layers: int) -> list[LayerRange] | None:
    """``current`` as a plan: the ranges, one missing one (a replaced worker's) filled from its neighbours, if they
    cover every layer once in order; else None."""
    if not current or current.count(None) > 1:
        return None
    if None in current:
        k = current.index(None)
        start = current[k - 1].end + 1 if k > 0 else 0
        end = current[k + 1].start - 1 if k + 1 < len(current) else num_layers - 1
        if end < start:
            return None
        current[k] = LayerRange(start, end)
    if [i for r in current for i in r.indices] != list(range(num_layers)):
        return None
    return current


def plan_from_files(cfg: ChatLoopConfig, specs: Sequence[StageSpec], directory: str | Path) -> list[StageSpec]:
    """:func:`plan_specs` from the figures files ``cluster.figures`` names (``chatloop-plan probe --output``)."""
    planned, _ = plan_specs(cfg, specs, figures_from_files(cfg), Manifest.load(Path(directory)))
    return planned


def figures_from_files(cfg: ChatLoopConfig) -> list[HostFigures]:
    """The figures each file ``cluster.figures`` names holds, in chain order; :class:`PlanError` naming one that
    cannot be read."""
    figures = []
    for path in cfg.cluster.figures:
        try:
            figures.append(HostFigures.from_dict(json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cluster.figures: cannot read {path} ({e}): write it with chatloop-plan probe --output "
                            f"{path} on its worker's host") from None
    return figures
