"""Placement: contiguous layer ranges for hosts of unequal speed and memory, from their measured figures (a pure
function, :func:`place_layers`).

The plan minimises, first, the bottleneck stage's time for a decode step at the configured batch (what sets the
pipeline's throughput: the batch runs as micro-batches, one per stage, and the busiest stage computes each of them
once a token) and then, among the plans that reach that bottleneck, the sum of every stage's time at batch 1 and of
the hops between them (one sequence's latency). Each host takes at most the layers its memory holds
(weights, KV pool, headroom) and only a range its partition files cover; a host that cannot hold a layer, or whose
stage would only slow the pipeline (or add a hop without making it faster), is left out with the reason. Hosts keep
their order: the chain is the order given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
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
    step_fixed_s: Mapping[int, float] | None = None
    """What a stage's decode step costs whatever its layers (the call, its inputs' bookkeeping), by batch; ``decode_s``
    is then one more layer's time (the probe times one layer and two). None: nothing fixed (older figures)."""
    head_s: Mapping[int, float] | None = None
    """The last stage's final norm, head and sampling of one decode step, by batch, where the host holds the head;
    None: the head counts as its bytes over a layer's (:attr:`ModelCosts.head_layers`)."""

    def __post_init__(self) -> None:
        if 1 not in self.decode_s:
            raise PlanError(f"host {self.name}: its figures need the decode time at batch 1, got batches "
                            f"{sorted(self.decode_s)}: probe it again")
        if any(b < 1 or t <= 0 or not math.isfinite(t) for b, t in self.decode_s.items()):
            raise PlanError(f"host {self.name}: decode times must be positive, by batch >= 1: {dict(self.decode_s)}")
        for label, extra in (("step_fixed_s", self.step_fixed_s), ("head_s", self.head_s)):
            if extra is not None and (1 not in extra or any(b < 1 or not 0 <= t < math.inf for b, t in extra.items())):
                raise PlanError(f"host {self.name}: {label} must be times >= 0 by batch >= 1, batch 1 among them: "
                                f"{dict(extra)}")
        if self.memory_bytes < 0 or self.hop_s < 0:
            raise PlanError(f"host {self.name}: memory_bytes and hop_s must be >= 0")

    @property
    def cpu_share(self) -> float:
        """The share of its threads' time its CPU limit lets it run when busy all the time. The probe's figures
        are totals over CFS periods, so they are the busy pace, as the batch's pipeline keeps a stage; a lone
        sequence's stage computes a step, then idles while the others compute theirs: it runs its steps at full
        speed, held back only as its CPU time a token nears the limit's share of the token (:meth:`_Model.latency`)."""
        if not self.cpu_limit or not self.threads:
            return 1.0
        return min(1.0, self.cpu_limit / self.threads)

    def as_dict(self) -> dict:
        """JSON-ready (``chatloop-plan probe --output``)."""
        data = asdict(self)
        for key in _BY_BATCH:
            if data[key] is not None:
                data[key] = {str(b): t for b, t in data[key].items()}
        data["held"] = None if self.held is None else [[r.start, r.end] for r in self.held]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> HostFigures:
        """The figures :meth:`as_dict` wrote; :class:`PlanError` naming what is wrong."""
        try:
            held = data.get("held")
            by_batch = {key: {int(b): float(t) for b, t in data[key].items()}
                        for key in _BY_BATCH if data.get(key) is not None}
            return cls(**{**data, **by_batch,
                          "held": None if held is None else tuple(LayerRange(a, b) for a, b in held)})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"not a host's figures ({type(e).__name__}: {e}): write them with chatloop-plan probe") \
                from None


_BY_BATCH = ("decode_s", "step_fixed_s", "head_s")


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
    """One micro-batch's decode step (``Placement.micro_batch`` sequences)."""
    step_1_s: float
    """A decode step of a lone sequence, at full speed (under a CPU limit: :attr:`HostFigures.cpu_share` of its
    probed pace; the limit's waits are in :attr:`Placement.latency_s`)."""
    memory_bytes: int


@dataclass(frozen=True)
class Placement:
    """The plan: stages in chain order, the hosts left out and why, and its predictions.

    The batch runs as ``micro_batches`` micro-batches of ``micro_batch`` sequences in flight, one per stage unless
    fewer are asked: each stage computes every micro-batch once a token, so a token of the whole batch takes the
    busiest stage's ``micro_batches * step_s``, or one micro-batch's trip round the chain if that is longer.
    """

    stages: list[PlacedStage]
    left_out: dict[str, str]
    batch: int
    micro_batches: int
    bottleneck_s: float
    """The slowest stage's step of one micro-batch."""
    trip_s: float
    """One micro-batch through every stage and hop."""
    latency_s: float
    """One decode step of one sequence through every stage and hop, with the waits of CPU-limited stages
    (:meth:`_Model.latency`)."""
    hops_s: float = 0.0
    coordinator_s: float = 0.0
    """The coordinator's share of each micro-batch's step (from one step's answer to its next step's sending: the
    scheduler's work, the detokenizer), measured on a run (:class:`~chatloop.stage.plan_report.DecodeMeter`); it
    is one more stop on every micro-batch's trip round the chain. 0: not measured yet."""

    @property
    def micro_batch(self) -> int:
        return math.ceil(self.batch / self.micro_batches)

    @property
    def ranges(self) -> list[LayerRange]:
        return [s.layers for s in self.stages]

    @property
    def hosts(self) -> list[str]:
        return [s.host for s in self.stages]

    @property
    def round_s(self) -> float:
        """One token of every sequence of the batch."""
        return max(self.micro_batches * max(self.bottleneck_s, self.coordinator_s), self.trip_s + self.coordinator_s)

    @property
    def tokens_per_s_1(self) -> float:
        """Predicted decode tokens/s of one sequence alone."""
        return 1.0 / (self.latency_s + self.coordinator_s)

    @property
    def tokens_per_s(self) -> float:
        """Predicted decode tokens/s at the configured batch."""
        return self.batch / self.round_s


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


def _micro_batches(batch: int, num_stages: int, in_flight: int | None) -> int:
    return max(1, min(batch, in_flight or num_stages))


class _Model:
    """The figures as the dynamic programmes read them: a stage's fit and times, hosts by index."""

    def __init__(self, hosts: Sequence[HostFigures], costs: ModelCosts) -> None:
        self.hosts, self.costs, self.n = hosts, costs, costs.num_layers
        self.units = [0.0]  # prefix sums of layer time units (a layer of mean bytes: 1)
        for u in _layer_units(costs):
            self.units.append(self.units[-1] + u)

    def fits(self, h: int, i: int, j: int) -> bool:
        host = self.hosts[h]
        if self.costs.memory(i, j) > host.memory_bytes:
            return False
        return host.held is None or any(r.start <= i and j - 1 <= r.end for r in host.held)

    def step(self, h: int, i: int, j: int, batch: float) -> float:
        """Host ``h``'s decode step of layers ``i`` to ``j - 1`` at ``batch``: its fixed cost, its layers, and the
        head where the stage ends the model (measured, or as its bytes' share of a layer's time)."""
        host = self.hosts[h]
        layer = layer_seconds(host.decode_s, batch)
        fixed = layer_seconds(host.step_fixed_s, batch) if host.step_fixed_s else 0.0
        time = fixed + layer * (self.units[j] - self.units[i])
        if j == self.n:
            time += layer_seconds(host.head_s, batch) if host.head_s else layer * self.costs.head_layers
        return time

    def step_alone(self, h: int, i: int, j: int) -> float:
        """The batch-1 step of a lone sequence, which leaves the stage idle between its steps: at full speed."""
        return self.step(h, i, j, 1) * self.hosts[h].cpu_share

    def latency(self, stages: Sequence[tuple[int, int, int]]) -> float:
        """One sequence's decode step through ``stages`` (host, first layer, end) and their hops.

        Each stage at full speed, plus the waits a CPU limit adds: a limited stage waits for its quota (its busy
        step, the probed pace, less its full-speed step) in the share of steps its busy step bears to the token's
        time, all of them once that passes 1. So the token's time ``t`` solves ``t = trip + sum(wait * min(1,
        busy / t))``: a stage far within its limit's share of the token is rarely held back, one near it often (CFS
        grants the quota a period at a time, and a period with one step too many waits for the next). Against
        measured tokens: docs/placement.md."""
        steps = [(self.step_alone(h, i, j), self.step(h, i, j, 1)) for h, i, j in stages]
        trip = sum(alone for alone, _ in steps) + sum(self.hosts[h].hop_s for h, _, _ in stages)
        waits = [(busy - alone, busy) for alone, busy in steps if busy > alone]
        if not waits or trip <= 0:
            return trip
        low, high = trip, trip + sum(wait for wait, _ in waits)  # t - trip - waits(t) grows with t: bisect
        for _ in range(60):
            t = (low + high) / 2
            if t < trip + sum(wait * min(1.0, busy / t) for wait, busy in waits):
                low = t
            else:
                high = t
        return high


def _least_bottleneck(model: _Model, k: int, micro: int) -> float:
    """The least slowest stage (at ``micro`` sequences) of ``k`` of the hosts, in order, covering every layer."""
    n, inf = model.n, math.inf
    best = [[inf] * (n + 1) for _ in range(k + 1)]  # best[c][j]: c hosts so far cover layers 0..j-1
    best[0][0] = 0.0
    for h in range(len(model.hosts)):
        new = [row[:] for row in best]  # host h left out
        for c in range(1, k + 1):
            for j in range(1, n + 1):
                for i in range(j):
                    if best[c - 1][i] < inf and model.fits(h, i, j):
                        new[c][j] = min(new[c][j], max(best[c - 1][i], model.step(h, i, j, micro)))
        best = new
    return best[k][n]


def _least_latency(model: _Model, k: int, micro: int, limit: float) -> tuple[float, list[tuple[int, int, int]]]:
    """Among plans of ``k`` hosts whose stages all take at most ``limit`` at ``micro``: the least batch-1 step
    (stage times and hops, a CPU-limited stage's at its busy pace: the most :meth:`_Model.latency` gives), and its
    stages (host, first layer, end)."""
    n, inf, num_hosts = model.n, math.inf, len(model.hosts)
    total = [[[inf] * (n + 1) for _ in range(k + 1)] for _ in range(num_hosts + 1)]
    cut: dict[tuple[int, int, int], int] = {}
    total[0][0][0] = 0.0
    for h in range(num_hosts):
        for c in range(k + 1):
            for j in range(n + 1):
                total[h + 1][c][j] = total[h][c][j]  # host h left out
                if c == 0:
                    continue
                for i in range(j):
                    if total[h][c - 1][i] < inf and model.fits(h, i, j) and model.step(h, i, j, micro) <= limit:
                        value = total[h][c - 1][i] + model.step(h, i, j, 1) + model.hosts[h].hop_s
                        if value < total[h + 1][c][j] * (1 - _EPS):
                            total[h + 1][c][j], cut[h + 1, c, j] = value, i
    stages, c, j = [], k, n
    for h in range(num_hosts, 0, -1):
        i = cut.get((h, c, j))  # recorded only where host h - 1 did better than being left out
        if i is None:
            continue
        stages.append((h - 1, i, j))
        c, j = c - 1, i
    return total[num_hosts][k][n], stages[::-1]


def place_layers(hosts: Sequence[HostFigures], costs: ModelCosts, batch: int = 1, *,
                 keep_all: bool = False, in_flight: int | None = None, coordinator_s: float = 0.0) -> Placement:
    """Contiguous ranges over (some of) ``hosts``, in their order, for the model ``costs`` describes, at ``batch``
    sequences a decode step in ``in_flight`` micro-batches (None: one per stage); see the module's docstring.
    ``keep_all``: every host gets at least one layer (a running cluster whose workers all joined).
    ``coordinator_s``: the coordinator's share of a step (:attr:`Placement.coordinator_s`), in the predictions. Raises
    :class:`PlanError` saying why when no plan fits."""
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
    model = _Model(hosts, costs)
    # First objective: the busiest stage's time a token of the batch (micro-batches x its step), for each number of
    # stages; the micro-batches shrink as stages are added.
    rounds = {}
    for k in ([len(hosts)] if keep_all else range(1, min(len(hosts), n) + 1)):
        q = _micro_batches(batch, k, in_flight)
        bottleneck = _least_bottleneck(model, k, math.ceil(batch / q))
        if bottleneck < math.inf:
            rounds[k] = (q * bottleneck, bottleneck, q)
    if not rounds:
        raise PlanError(_why_nothing_fits(hosts, costs))
    best_round = min(r for r, _, _ in rounds.values())
    # Second: among the numbers of stages that reach it, the least batch-1 step.
    chosen = None
    for k, (round_s, bottleneck, q) in sorted(rounds.items()):
        if round_s <= best_round * (1 + _EPS):
            latency, stages = _least_latency(model, k, math.ceil(batch / q), bottleneck * (1 + _EPS))
            if chosen is None or latency < chosen[0] * (1 - _EPS):
                chosen = (latency, stages, q, bottleneck)
    latency, stages, q, bottleneck = chosen
    micro = math.ceil(batch / q)
    placed = [PlacedStage(hosts[h].name, LayerRange(i, j - 1), model.step(h, i, j, micro), model.step_alone(h, i, j),
                          costs.memory(i, j)) for h, i, j in stages]
    used = {h for h, _, _ in stages}
    hops = sum(hosts[h].hop_s for h in used)
    left_out = {hosts[h].name: _why_left_out(model, h, micro, bottleneck) for h in range(len(hosts)) if h not in used}
    return Placement(placed, left_out, batch, q, bottleneck, sum(s.step_s for s in placed) + hops,
                     model.latency(stages), hops_s=hops, coordinator_s=coordinator_s)


def _layer_units(costs: ModelCosts) -> list[float]:
    """Each layer's decode time in units of an average layer's: in proportion to its bytes (all 1 without bytes)."""
    total = sum(costs.layer_bytes)
    if total == 0:
        return [1.0] * costs.num_layers
    return [b * costs.num_layers / total for b in costs.layer_bytes]


def _why_left_out(model: _Model, h: int, micro: int, bottleneck: float) -> str:
    host, n = model.hosts[h], model.n
    if not any(model.fits(h, i, i + 1) for i in range(n)):
        if host.held is not None and not host.held:
            return "it holds none of the partition files"
        smallest = min(model.costs.memory(i, i + 1) for i in range(n))
        return (f"its memory ({host.memory_bytes / 2**20:.0f} MiB) holds no layer with its KV pool and headroom "
                f"(one takes at least {smallest / 2**20:.0f} MiB)")
    one = min(model.step(h, i, i + 1, micro) for i in range(n))
    if one > bottleneck * (1 + _EPS):
        return (f"one layer takes it {one * 1e3:.3g} ms a step, slower than the plan's slowest stage "
                f"({bottleneck * 1e3:.3g} ms) without it")
    return (f"the others reach as short a round ({bottleneck * 1e3:.3g} ms a stage step) without it, and its stage "
            f"would add {host.hop_s * 1e3:.3g} ms of hop and its compute to every token")


def _why_nothing_fits(hosts: Sequence[HostFigures], costs: ModelCosts) -> str:
    need = costs.memory(0, costs.num_layers)
    room = ", ".join(f"{h.name} {h.memory_bytes / 2**20:.0f} MiB" for h in hosts)
    return (f"no placement of the model's {costs.num_layers} layers fits these hosts (their memory: {room}; the "
            f"whole model with its KV pool and headroom needs {need / 2**20:.0f} MiB, more with each extra stage), "
            "or their partition files leave layers uncovered: add a host, lower cache.kv_cache_mb, quantize, or copy "
            "the missing partition files")


def predict(hosts: Sequence[HostFigures], costs: ModelCosts, ranges: Sequence[LayerRange], batch: int = 1, *,
            in_flight: int | None = None, coordinator_s: float = 0.0) -> Placement:
    """The predictions of a given plan (``even``, explicit ranges): ``ranges[k]`` on ``hosts[k]``. Raises
    :class:`PlanError` when a host lacks the memory or the files for its range."""
    if len(ranges) != len(hosts):
        raise PlanError(f"{len(ranges)} ranges for {len(hosts)} hosts: give one range per host")
    model = _Model(hosts, costs)
    q = _micro_batches(batch, len(hosts), in_flight)
    micro = math.ceil(batch / q)
    stages = []
    for h, (figures, r) in enumerate(zip(hosts, ranges)):
        i, j = r.start, r.end + 1
        need = costs.memory(i, j)
        if need > figures.memory_bytes:
            raise PlanError(f"host {figures.name}: layers {r} need {need / 2**20:.0f} MiB, it has "
                            f"{figures.memory_bytes / 2**20:.0f} MiB")
        if not model.fits(h, i, j):
            raise PlanError(f"host {figures.name} does not hold the partition files of layers {r}")
        stages.append(PlacedStage(figures.name, r, model.step(h, i, j, micro), model.step_alone(h, i, j), need))
    hops = sum(h.hop_s for h in hosts)
    spans = [(h, r.start, r.end + 1) for h, r in enumerate(ranges)]
    return Placement(stages, {}, batch, q, max(s.step_s for s in stages), sum(s.step_s for s in stages) + hops,
                     model.latency(spans), hops_s=hops, coordinator_s=coordinator_s)
