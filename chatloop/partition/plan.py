"""The plan: which contiguous range of decoder layers each stage owns (a pure function)."""

from __future__ import annotations

from collections.abc import Sequence

from ..models import LayerRange

__all__ = ["PlanError", "plan_layers", "parse_ranges"]


class PlanError(ValueError):
    """A plan that cannot be built: the message says what to change."""


def parse_ranges(text: str) -> list[LayerRange]:
    """Parse ``"0-7,8-15"`` (inclusive ranges, as in the worker configs) into layer ranges."""
    ranges = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        if len(bounds) != 2 or not all(b.strip().isdigit() for b in bounds):
            raise PlanError(f"cannot read layer range {part.strip()!r}: write ranges like '0-7,8-15'")
        try:
            ranges.append(LayerRange(int(bounds[0]), int(bounds[1])))
        except ValueError as e:
            raise PlanError(f"{e}: write ranges like '0-7,8-15'") from None
    return ranges


def plan_layers(
    num_layers: int,
    num_stages: int,
    ranges: Sequence[LayerRange] | None = None,
    weights: Sequence[float] | None = None,
    layer_bytes: Sequence[int] | None = None,
) -> list[LayerRange]:
    """Split ``num_layers`` decoder layers into ``num_stages`` contiguous ranges.

    With ``ranges`` the explicit ranges are checked (they must cover every layer once, in
    order). With ``weights`` stage ``i`` gets layers in proportion to ``weights[i]`` (a faster
    host can take more). Otherwise the split is even, the first stages taking the remainder:
    32 layers over 4 stages give 0-7, 8-15, 16-23, 24-31.

    ``layer_bytes`` (each layer's weight in bytes), where the layers differ, splits by bytes instead of by
    count: the stage holding the most bytes (per unit of its ``weights``) holds as few as any contiguous split
    allows. A mixture-of-experts model whose dense layers sit among its sparse ones (Qwen3-MoE's
    ``mlp_only_layers``, ``decoder_sparse_step``) weighs many times more in its sparse layers. Equal layers
    give the split by count above.
    """
    if num_layers < 1:
        raise PlanError(f"the model has {num_layers} layers: need at least 1")
    if num_stages < 1:
        raise PlanError(f"num_stages is {num_stages}: need at least 1 stage")
    if num_stages > num_layers:
        raise PlanError(
            f"{num_stages} stages for {num_layers} layers: every stage needs at least one layer, "
            f"use at most {num_layers} stages"
        )
    if ranges is not None and weights is not None:
        raise PlanError("give either explicit ranges or per-stage weights, not both")
    if ranges is not None:
        return _check_ranges(list(ranges), num_layers, num_stages)
    if weights is None:
        weights = [1.0] * num_stages
    if len(weights) != num_stages or any(w <= 0 for w in weights):
        raise PlanError(f"need {num_stages} positive stage weights, got {list(weights)}")
    if layer_bytes is not None:
        if len(layer_bytes) != num_layers or any(b < 0 for b in layer_bytes):
            raise PlanError(f"need {num_layers} layer sizes in bytes, got {len(layer_bytes)}")
        if len(set(layer_bytes)) > 1:
            return _split_by_bytes(list(layer_bytes), list(weights))
    return _weighted_split(num_layers, list(weights))


def _check_ranges(ranges: list[LayerRange], num_layers: int, num_stages: int) -> list[LayerRange]:
    if len(ranges) != num_stages:
        raise PlanError(f"{len(ranges)} layer ranges given for {num_stages} stages: give one range per stage")
    expected_start = 0
    for i, r in enumerate(ranges):
        if r.start > expected_start:
            raise PlanError(
                f"gap: layers {expected_start}-{r.start - 1} belong to no stage (stage {i} starts at {r.start})")
        if r.start < expected_start:
            raise PlanError(f"overlap: stage {i} starts at layer {r.start}, "
                            f"but layer {r.start} is already owned by stage {i - 1}")
        expected_start = r.end + 1
    if expected_start > num_layers:
        raise PlanError(f"ranges run past the end: the last range ends at layer {expected_start - 1}, "
                        f"the model has layers 0-{num_layers - 1}")
    if expected_start < num_layers:
        raise PlanError(f"layers {expected_start}-{num_layers - 1} belong to no stage: "
                        f"the last range must end at {num_layers - 1}")
    return ranges


def _weighted_split(num_layers: int, weights: list[float]) -> list[LayerRange]:
    # Largest-remainder rounding of the ideal shares, each stage getting at least one layer;
    # ties go to the earlier stage so the even split puts the remainder first.
    total = sum(weights)
    ideal = [num_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) > num_layers:
        i = max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - ideal[i])
        counts[i] -= 1
    while sum(counts) < num_layers:
        i = max(range(len(counts)), key=lambda i: (ideal[i] - counts[i], -i))
        counts[i] += 1
    ranges, start = [], 0
    for count in counts:
        ranges.append(LayerRange(start, start + count - 1))
        start += count
    return ranges


def _split_by_bytes(layer_bytes: list[int], weights: list[float]) -> list[LayerRange]:
    # Dynamic programming over prefixes: best[s][j] is the least possible largest load (bytes / weight) of the
    # first j layers on the first s stages. Layers are tens to hundreds, stages a few: S * N^2 steps are nothing.
    n, num_stages = len(layer_bytes), len(weights)
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, n - (num_stages - s) + 1):
            for i in range(s - 1, j):
                load = max(best[s - 1][i], (prefix[j] - prefix[i]) / weights[s - 1])
                if load <= best[s][j]:  # ties: the later cut, so earlier stages take more layers
                    best[s][j], cut[s][j] = load, i
    ranges, end = [], n
    for s in range(num_stages, 0, -1):
        start = cut[s][end]
        ranges.append(LayerRange(start, end - 1))
        end = start
    return ranges[::-1]
