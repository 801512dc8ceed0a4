"""Placement: contiguous layer ranges for hosts of unequal speed and memory, from their measured figures (a pure
function, :func:`place_layers`).

The plan minimises, first, the bottleneck stage's time for a decode step at the configured batch (what sets the
pipeline's throughput) and then, among the plans that reach that bottleneck, the sum of every stage's time at batch
1 and of the hops between them (one sequence's latency). Each host takes at most the layers its memory holds
(weights, KV pool, headroom) and only a range its partition files cover; a host that cannot hold a layer, or whose
stage would only slow the pipeline (or add a hop without making it faster), is left out with the reason. Hosts keep
their order: the chain is the order given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise

from ..models import LayerRange
from .plan import PlanError

__all__ = ["HostFigures", "ModelCosts", "Placement", "PlacedStage", "layer_seconds", "place_layers", "predict"]

_EPS = 1e-9  # relative: times computed two ways (sums in another order) still compare equal


@dataclass(frozen=True, kw_only=True)
class HostFigures:
    """What a host's probe measured (:mod:`chatloop.stage.probe`), as the planner reads it."""

    name: str
    decode_s: Mapping[int, float]
    """Seconds one decoder layer of this model takes for one decode step of a batch of ``b`` sequences, by ``b``
    (at least batch 1); between and beyond the measured sizes, linear."""
    memory_bytes: int
    """Memory this host can give its stage."""
    hop_s: float = 0.0
    """One hop from this host's stage to the next (half the measured round trip)."""
    prefill_s_per_token: float | None = None
    """Seconds per prompt token of one layer in a prefill chunk (reported, not planned on)."""
    held: tuple[LayerRange, ...] | None = None
    """The ranges its partition files cover (any range within one can be loaded); None: any range."""
    threads: int | None = None
    cores: int | None = None
    cpu_limit: float | None = None
    bandwidth_gb_s: float | None = None

    def __post_init__(self) -> None:
        if 1 not in self.decode_s:
            raise PlanError(f"host {self.name}: its figures need the decode time at batch 1, got batches "
                            f"{sorted(self.decode_s)}: probe it again")
        if any(b < 1 or t <= 0 or not math.isfinite(t) for b, t in self.decode_s.items()):
            raise PlanError(f"host {self.name}: decode times must be positive, by batch >= 1: {dict(self.decode_s)}")
        if self.memory_bytes < 0 or self.hop_s < 0:
            raise PlanError(f"host {self.name}: memory_bytes and hop_s must be >= 0")

    def as_dict(self) -> dict:
        """JSON-ready (``chatloop-plan probe --output``)."""
        data = asdict(self)
        data["decode_s"] = {str(b): t for b, t in self.decode_s.items()}
        data["held"] = None if self.held is None else [[r.start, r.end] for r in self.held]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> HostFigures:
        """The figures :meth:`as_dict` wrote; :class:`PlanError` naming what is wrong."""
        try:
            held = data.get("held")
            return cls(**{**data, "decode_s": {int(b): float(t) for b, t in data["decode_s"].items()},
                          "held": None if held is None else tuple(LayerRange(a, b) for a, b in held)})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"not a host's figures ({type(e).__name__}: {e}): write them with chatloop-plan probe") \
                from None


@dataclass(frozen=True, kw_only=True)
class ModelCosts:
    """What each layer asks of a host: its weights' bytes, its KV pool's, and the stage's fixed costs."""

    layer_bytes: Sequence[int]
    """Each decoder layer's weights in bytes (mixture-of-experts layers differ); their ratio is also their time's."""
    kv_bytes_per_layer: int = 0
    """One layer's share of the KV pool the plan must leave room for."""
    embed_bytes: int = 0
    """The first stage's embedding table."""
    head_bytes: int = 0
    """The last stage's norm and head (a tied head: the embedding again, unless quantized apart)."""
    head_layers: float = 0.0
    """The head's decode time in layers (its bytes over a layer's: a decode step reads every weight)."""
    headroom_bytes: int = 0
    """What a worker needs beyond weights and KV pool (the runtime, activations)."""

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    def memory(self, start: int, end: int) -> int:
        """Bytes a stage of layers ``start`` to ``end - 1`` needs."""
        return (sum(self.layer_bytes[start:end]) + self.kv_bytes_per_layer * (end - start) + self.headroom_bytes
                + (self.embed_bytes if start == 0 else 0) + (self.head_bytes if end == self.num_layers else 0))


@dataclass(frozen=True)
class PlacedStage:
    """One stage of a placement: its host, its layers and their predicted times."""

    host: str
    layers: LayerRange
    step_s: float
    """A decode step at the configured batch."""
    step_1_s: float
    """A decode step at batch 1."""
    memory_bytes: int


@dataclass(frozen=True)
class Placement:
    """The plan: stages in chain order, the hosts left out and why, and its predictions."""

    stages: list[PlacedStage]
    left_out: dict[str, str]
    batch: int
    bottleneck_s: float
    latency_s: float
    """One decode step of one sequence through every stage and hop."""
    hops_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ranges(self) -> list[LayerRange]:
        return [s.layers for s in self.stages]

    @property
    def hosts(self) -> list[str]:
        return [s.host for s in self.stages]

    @property
    def tokens_per_s_1(self) -> float:
        """Predicted decode tokens/s of one sequence alone."""
        return 1.0 / self.latency_s

    @property
    def tokens_per_s(self) -> float:
        """Predicted decode tokens/s at the configured batch, the stages working on micro-batches at once: each
        token step of the batch waits for its slowest stage, or for one trip around the chain if that is longer."""
        return self.batch / max(self.bottleneck_s, self.latency_s)


def layer_seconds(decode_s: Mapping[int, float], batch: float) -> float:
    """One layer's decode step at ``batch``, linear between the measured batch sizes and beyond the last two."""
    points = sorted(decode_s.items())
    if len(points) == 1 or batch <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in pairwise(points):
        if batch <= b1:
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    (b0, t0), (b1, t1) = points[-2], points[-1]
    return max(t1, t1 + (t1 - t0) * (batch - b1) / (b1 - b0))


def place_layers(hosts: Sequence[HostFigures], costs: ModelCosts, batch: int = 1, *,
                 keep_all: bool = False) -> Placement:
    """Contiguous ranges over (some of) ``hosts``, in their order, for the model ``costs`` describes, at ``batch``
    sequences a decode step (see the module's docstring). ``keep_all``: every host gets at least one layer (a
    running cluster whose workers all joined). Raises :class:`PlanError` saying why when no plan fits."""
    n = costs.num_layers
    if n < 1 or any(b < 0 for b in costs.layer_bytes):
        raise PlanError(f"the model needs at least one layer of non-negative bytes, got {list(costs.layer_bytes)}")
    if not hosts:
        raise PlanError("no hosts to place layers on: start at least one worker")
    if batch < 1:
        raise PlanError(f"batch is {batch}: need at least 1")
    if keep_all and len(hosts) > n:
        raise PlanError(f"{len(hosts)} hosts for {n} layers: every stage needs at least one layer, use at most {n}")
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise PlanError(f"host names must differ: {names}")
    units = [0.0]  # prefix sums of layer time units (a layer of mean bytes: 1)
    for u in _layer_units(costs):
        units.append(units[-1] + u)
    per_layer_b = [layer_seconds(h.decode_s, batch) for h in hosts]
    per_layer_1 = [layer_seconds(h.decode_s, 1) for h in hosts]

    def work(i: int, j: int) -> float:
        return units[j] - units[i] + (costs.head_layers if j == n else 0.0)

    def fits(h: int, i: int, j: int) -> bool:
        host = hosts[h]
        if costs.memory(i, j) > host.memory_bytes:
            return False
        return host.held is None or any(r.start <= i and j - 1 <= r.end for r in host.held)

    def stage_b(h: int, i: int, j: int) -> float:
        return per_layer_b[h] * work(i, j)

    def stage_1(h: int, i: int, j: int) -> float:
        return per_layer_1[h] * work(i, j) + hosts[h].hop_s

    inf = math.inf
    # Pass 1: the least possible bottleneck. best[h][j]: over the first h hosts covering layers 0..j-1.
    best = [[inf] * (n + 1) for _ in range(len(hosts) + 1)]
    best[0][0] = 0.0
    for h in range(len(hosts)):
        for j in range(n + 1):
            best[h + 1][j] = inf if keep_all else best[h][j]  # host h left out
            for i in range(j):
                if best[h][i] < inf and fits(h, i, j):
                    best[h + 1][j] = min(best[h + 1][j], max(best[h][i], stage_b(h, i, j)))
    bottleneck = best[len(hosts)][n]
    if bottleneck == inf:
        raise PlanError(_why_nothing_fits(hosts, costs))
    limit = bottleneck * (1 + _EPS)
    # Pass 2: among plans within that bottleneck, the least batch-1 step (stage times and hops).
    total = [[inf] * (n + 1) for _ in range(len(hosts) + 1)]
    cut: list[list[int | None]] = [[None] * (n + 1) for _ in range(len(hosts) + 1)]
    total[0][0] = 0.0
    for h in range(len(hosts)):
        for j in range(n + 1):
            total[h + 1][j] = inf if keep_all else total[h][j]
            for i in range(j):
                if total[h][i] < inf and fits(h, i, j) and stage_b(h, i, j) <= limit:
                    value = total[h][i] + stage_1(h, i, j)
                    if value < total[h + 1][j] * (1 - _EPS):
                        total[h + 1][j], cut[h + 1][j] = value, i
    stages, left_out, j = [], {}, n
    for h in range(len(hosts), 0, -1):
        i = cut[h][j]
        host = hosts[h - 1]
        if i is None:
            left_out[host.name] = _why_left_out(host, h - 1, hosts, costs, per_layer_b[h - 1], bottleneck, fits)
            continue
        stages.append(PlacedStage(host.name, LayerRange(i, j - 1), stage_b(h - 1, i, j),
                                  per_layer_1[h - 1] * work(i, j), costs.memory(i, j)))
        j = i
    stages.reverse()
    hops = sum(h.hop_s for h in hosts if h.name not in left_out)
    return Placement(stages, dict(reversed(list(left_out.items()))), batch, bottleneck, total[len(hosts)][n],
                     hops_s=hops)


def _layer_units(costs: ModelCosts) -> list[float]:
    """Each layer's decode time in units of an average layer's: in proportion to its bytes (all 1 without bytes)."""
    total = sum(costs.layer_bytes)
    if total == 0:
        return [1.0] * costs.num_layers
    return [b * costs.num_layers / total for b in costs.layer_bytes]


def _why_left_out(host: HostFigures, h: int, hosts, costs: ModelCosts, per_layer: float, bottleneck: float,
                  fits) -> str:
    n = costs.num_layers
    if not any(fits(h, i, i + 1) for i in range(n)):
        if host.held is not None and not host.held:
            return "it holds none of the partition files"
        smallest = min(costs.memory(i, i + 1) for i in range(n))
        return (f"its memory ({host.memory_bytes / 2**20:.0f} MiB) holds no layer with its KV pool and headroom "
                f"(one takes at least {smallest / 2**20:.0f} MiB)")
    one = per_layer * min(_layer_units(costs))
    if one > bottleneck * (1 + _EPS):
        return (f"one layer takes it {one * 1e3:.3g} ms a step, slower than the plan's slowest stage "
                f"({bottleneck * 1e3:.3g} ms) without it")
    return (f"the others reach the same bottleneck ({bottleneck * 1e3:.3g} ms a step) without it, and its stage "
            f"would add {host.hop_s * 1e3:.3g} ms of hop and its compute to every token")


def _why_nothing_fits(hosts: Sequence[HostFigures], costs: ModelCosts) -> str:
    need = costs.memory(0, costs.num_layers)
    room = ", ".join(f"{h.name} {h.memory_bytes / 2**20:.0f} MiB" for h in hosts)
    return (f"no placement of the model's {costs.num_layers} layers fits these hosts (their memory: {room}; the "
            f"whole model with its KV pool and headroom needs {need / 2**20:.0f} MiB, more with each extra stage), "
            "or their partition files leave layers uncovered: add a host, lower cache.kv_cache_mb, quantize, or copy "
            "the missing partition files")


def predict(hosts: Sequence[HostFigures], costs: ModelCosts, ranges: Sequence[LayerRange], batch: int = 1) -> Placement:
    """The predictions of a given plan (``even``, explicit ranges): ``ranges[k]`` on ``hosts[k]``. Raises
    :class:`PlanError` when a host lacks the memory or the files for its range."""
    if len(ranges) != len(hosts):
        raise PlanError(f"{len(ranges)} ranges for {len(hosts)} hosts: give one range per host")
    units = _layer_units(costs)
    stages, latency = [], 0.0
    for figures, r in zip(hosts, ranges):
        i, j = r.start, r.end + 1
        need = costs.memory(i, j)
        if need > figures.memory_bytes:
            raise PlanError(f"host {figures.name}: layers {r} need {need / 2**20:.0f} MiB, it has "
                            f"{figures.memory_bytes / 2**20:.0f} MiB")
        if figures.held is not None and not any(h.start <= i and j - 1 <= h.end for h in figures.held):
            raise PlanError(f"host {figures.name} does not hold the partition files of layers {r}")
        work = sum(units[i:j]) + (costs.head_layers if j == costs.num_layers else 0.0)
        one = layer_seconds(figures.decode_s, 1) * work
        stages.append(PlacedStage(figures.name, r, layer_seconds(figures.decode_s, batch) * work, one, need))
        latency += one + figures.hop_s
    return Placement(stages, {}, batch, max(s.step_s for s in stages), latency,
                     hops_s=sum(h.hop_s for h in hosts))
