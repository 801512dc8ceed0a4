"""The placement: layers to hosts from their measured figures (issue 24, point 2), checked against brute force."""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import replace

import pytest

from chatloop.models import LayerRange
from chatloop.partition.placement import HostFigures, ModelCosts, layer_seconds, place_layers, predict
from chatloop.partition.plan import PlanError, plan_layers

MB = 2**20


def host(name, ms, memory=10_000 * MB, hop_ms=0.0, held=None, at16=None, fixed_ms=None, head_ms=None):
    """A host whose layer takes ``ms`` at batch 1 and ``at16`` (default 16x: compute-bound) at batch 16; a stage's
    step costs ``fixed_ms`` more (batch 1, twice that at 16), and the head ``head_ms`` (None: by its bytes)."""
    return HostFigures(name=name, decode_s={1: ms / 1e3, 16: (at16 if at16 is not None else 16 * ms) / 1e3},
                       memory_bytes=memory, hop_s=hop_ms / 1e3, held=held,
                       step_fixed_s=None if fixed_ms is None else {1: fixed_ms / 1e3, 16: 2 * fixed_ms / 1e3},
                       head_s=None if head_ms is None else {1: head_ms / 1e3, 16: 4 * head_ms / 1e3})


def stage_time(figures, costs, units, i, j, batch):
    """What a stage of layers ``i`` to ``j - 1`` takes on ``figures`` at ``batch``, written out apart from the
    planner's: its fixed cost, its layers, its head."""
    layer = layer_seconds(figures.decode_s, batch)
    time = sum(units[i:j]) * layer + (layer_seconds(figures.step_fixed_s, batch) if figures.step_fixed_s else 0)
    if j == costs.num_layers:
        time += layer_seconds(figures.head_s, batch) if figures.head_s else costs.head_layers * layer
    return time


def brute_force(hosts, costs, batch):
    """Every ordered subset of hosts and every contiguous split: the least (round, batch-1 step), where a token of
    the batch takes as many micro-batches as stages (at most the batch) times the slowest stage's step of one."""
    n = costs.num_layers
    units = [b * n / sum(costs.layer_bytes) for b in costs.layer_bytes]
    best = None
    for k in range(1, len(hosts) + 1):
        for chosen in itertools.combinations(range(len(hosts)), k):
            q = min(batch, k)
            micro = math.ceil(batch / q)
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                worst, total, ok = 0.0, 0.0, True
                for h, i, j in zip(chosen, bounds, bounds[1:]):
                    figures = hosts[h]
                    held_ok = figures.held is None or any(r.start <= i and j - 1 <= r.end for r in figures.held)
                    if costs.memory(i, j) > figures.memory_bytes or not held_ok:
                        ok = False
                        break
                    worst = max(worst, q * stage_time(figures, costs, units, i, j, micro))
                    total += stage_time(figures, costs, units, i, j, 1) + figures.hop_s
                if ok and (best is None or (worst, total) < best):
                    best = (worst, total)
    return best


def check_plan(placement, hosts, costs):
    owned = [i for r in placement.ranges for i in r.indices]
    assert owned == list(range(costs.num_layers))
    order = [h.name for h in hosts]
    assert [order.index(name) for name in placement.hosts] == sorted(order.index(name) for name in placement.hosts)
    assert set(placement.hosts) | set(placement.left_out) == set(order)
    for stage in placement.stages:
        figures = next(h for h in hosts if h.name == stage.host)
        assert stage.memory_bytes <= figures.memory_bytes


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_is_the_brute_force_optimum_on_small_cases(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    costs = ModelCosts(layer_bytes=[rng.choice([10, 10, 10, 25]) * MB for _ in range(n)],
                       kv_bytes_per_layer=rng.choice([0, 2 * MB]), embed_bytes=rng.choice([0, 15 * MB]),
                       head_bytes=rng.choice([0, 15 * MB]), head_layers=rng.choice([0.0, 1.5]),
                       headroom_bytes=rng.choice([0, 5 * MB]))
    hosts = []
    for k in range(rng.randint(1, 3)):
        held = None
        if rng.random() < 0.3:
            start = rng.randrange(n)
            held = (LayerRange(start, rng.randrange(start, n)),)
        hosts.append(host(f"h{k}", rng.choice([1.0, 2.0, 3.0, 7.0]), memory=rng.choice([30, 60, 200]) * MB,
                          hop_ms=rng.choice([0.0, 0.5, 5.0]), held=held, at16=rng.choice([3.0, 8.0, 20.0]),
                          fixed_ms=rng.choice([None, 0.0, 0.7, 4.0]), head_ms=rng.choice([None, 0.5, 6.0])))
    batch = rng.choice([1, 4, 16])
    expected = brute_force(hosts, costs, batch)
    if expected is None:
        with pytest.raises(PlanError, match="no placement"):
            place_layers(hosts, costs, batch)
        return
    placement = place_layers(hosts, costs, batch)
    check_plan(placement, hosts, costs)
    assert placement.micro_batches * placement.bottleneck_s == pytest.approx(expected[0], rel=1e-9)
    assert placement.latency_s == pytest.approx(expected[1], rel=1e-9)
    assert placement.micro_batches * max(s.step_s for s in placement.stages) == pytest.approx(expected[0], rel=1e-9)
    assert predict([h for name in placement.hosts for h in hosts if h.name == name], costs, placement.ranges,
                   batch).tokens_per_s == pytest.approx(placement.tokens_per_s)


def test_equal_hosts_split_evenly():
    costs = ModelCosts(layer_bytes=[10 * MB] * 32)
    placement = place_layers([host(f"w{k}", 1.0) for k in range(4)], costs, batch=16)
    assert [len(r) for r in placement.ranges] == [8, 8, 8, 8]
    assert placement.left_out == {}


def test_a_host_three_times_slower_gets_a_third_of_the_layers():
    costs = ModelCosts(layer_bytes=[10 * MB] * 28)
    hosts = [host("fast0", 1.0, at16=16.0), host("slow", 3.0, at16=48.0), host("fast1", 1.0, at16=16.0)]
    placement = place_layers(hosts, costs, batch=16)  # compute-bound: a step's time grows with the batch
    assert [len(r) for r in placement.ranges] == [12, 4, 12]
    assert placement.micro_batches == 3 and placement.micro_batch == 6
    assert placement.bottleneck_s == pytest.approx(12 * 6e-3)
    even = predict(hosts, costs, plan_layers(28, 3), 16)
    assert even.bottleneck_s == pytest.approx(9 * 18e-3)  # the slow host's 9 layers
    assert placement.tokens_per_s > 1.3 * even.tokens_per_s
    # Where a bigger micro-batch costs little (memory-bound: 16 sequences take 4x one), two fast stages with two
    # micro-batches of 8 beat three with the slow host
    bound = place_layers([host("fast0", 1.0, at16=4.0), host("slow", 3.0, at16=12.0), host("fast1", 1.0, at16=4.0)],
                         costs, batch=16)
    assert bound.hosts == ["fast0", "fast1"] and bound.micro_batch == 8


def test_a_host_too_small_for_an_even_share_gets_fewer_layers():
    costs = ModelCosts(layer_bytes=[10 * MB] * 12, kv_bytes_per_layer=2 * MB, headroom_bytes=6 * MB)
    hosts = [host("big", 1.0), host("small", 1.0, memory=6 * MB + 3 * 12 * MB), host("big2", 1.0)]
    placement = place_layers(hosts, costs, batch=16)
    assert [len(r) for r in placement.ranges] == [5, 3, 4] or [len(r) for r in placement.ranges] == [4, 3, 5]
    assert placement.stages[1].memory_bytes <= hosts[1].memory_bytes


def test_a_host_that_can_only_slow_the_pipeline_is_left_out_with_the_reason():
    costs = ModelCosts(layer_bytes=[10 * MB] * 4)
    placement = place_layers([host("fast0", 1.0), host("crawl", 50.0), host("fast1", 1.0)], costs, batch=16)
    assert placement.hosts == ["fast0", "fast1"]
    assert "slower than the plan's slowest stage" in placement.left_out["crawl"]


def test_a_host_without_room_for_one_layer_is_left_out_saying_so():
    costs = ModelCosts(layer_bytes=[10 * MB] * 4, headroom_bytes=5 * MB)
    placement = place_layers([host("tiny", 1.0, memory=12 * MB), host("big", 1.0)], costs, batch=1)
    assert placement.hosts == ["big"]
    assert "holds no layer" in placement.left_out["tiny"]


def test_the_plan_keeps_to_the_files_a_host_holds():
    costs = ModelCosts(layer_bytes=[10 * MB] * 16)
    hosts = [host("a", 1.0, held=(LayerRange(0, 7),)), host("b", 1.0, held=(LayerRange(8, 15),)), host("c", 0.1)]
    placement = place_layers(hosts[:2], costs, batch=16)
    assert placement.ranges == [LayerRange(0, 7), LayerRange(8, 15)]
    assert place_layers([hosts[0], host("c", 4.0, held=(LayerRange(8, 15),))], costs, 16).ranges == [
        LayerRange(0, 7), LayerRange(8, 15)]


def test_the_second_objective_drops_a_hop_that_buys_nothing():
    costs = ModelCosts(layer_bytes=[10 * MB] * 2)  # one layer a host: the third host adds only a hop
    hosts = [host("a", 1.0, hop_ms=1.0), host("b", 1.0, hop_ms=1.0), host("c", 1.0, hop_ms=1.0)]
    placement = place_layers(hosts, costs, batch=1)
    assert len(placement.stages) == 2
    assert placement.latency_s == pytest.approx(2 * 1e-3 + 2 * 1e-3)
    assert "as short a round" in next(iter(placement.left_out.values()))


def test_nothing_fits_says_what_to_change():
    costs = ModelCosts(layer_bytes=[100 * MB] * 4)
    with pytest.raises(PlanError, match="no placement .*lower cache.kv_cache_mb, quantize"):
        place_layers([host("a", 1.0, memory=150 * MB), host("b", 1.0, memory=150 * MB)], costs)


def test_a_measured_head_and_fixed_cost_shape_the_stages_and_the_coordinator_joins_every_trip():
    costs = ModelCosts(layer_bytes=[10 * MB] * 12, head_layers=1.0)
    by_bytes = place_layers([host("a", 1.0), host("b", 1.0)], costs, batch=1)
    assert [len(r) for r in by_bytes.ranges] == [7, 5] or [len(r) for r in by_bytes.ranges] == [6, 6]
    # b's head measured at 6 layers' time: it keeps fewer layers; a fixed cost adds to each stage's step once
    measured = place_layers([host("a", 1.0, fixed_ms=2.0), host("b", 1.0, fixed_ms=2.0, head_ms=6.0)], costs, 1)
    assert [len(r) for r in measured.ranges] == [9, 3]
    assert [s.step_1_s for s in measured.stages] == pytest.approx([11e-3, 11e-3])
    assert measured.latency_s == pytest.approx(22e-3)
    # the coordinator's share: one more stop on a micro-batch's trip, and a stage of its own at full load
    shared = place_layers([host("a", 1.0, fixed_ms=2.0), host("b", 1.0, fixed_ms=2.0, head_ms=6.0)], costs, 1,
                          coordinator_s=3e-3)
    assert shared.ranges == measured.ranges and shared.tokens_per_s_1 == pytest.approx(1 / 25e-3)
    wide = predict([host("a", 1.0), host("b", 1.0)], costs, plan_layers(12, 2), 16, coordinator_s=0.2)
    assert wide.round_s == pytest.approx(2 * 0.2)


def test_a_cpu_limited_host_computes_a_lone_sequence_at_full_speed_held_back_near_its_share():
    # Its probe's figures are its busy pace (a third of a core: 3 ms a layer where it could do 1); a lone sequence
    # leaves each stage idle while the others compute, so its steps run at full speed, and wait for the quota in
    # the share of steps its busy step bears to the token's time t: t = trip + wait * busy / t.
    costs = ModelCosts(layer_bytes=[10 * MB] * 12)
    limited, free = replace(host("a", 3.0), cpu_limit=1 / 3, threads=1), host("b", 1.0)
    assert limited.cpu_share == pytest.approx(1 / 3) and free.cpu_share == 1.0
    assert replace(limited, cpu_limit=1.0, threads=2).cpu_share == 0.5
    short = predict([limited, free], costs, [LayerRange(0, 1), LayerRange(2, 11)], 16)
    assert [s.step_1_s for s in short.stages] == pytest.approx([2e-3, 10e-3])
    t = short.latency_s
    assert t == pytest.approx(12e-3 + 4e-3 * 6e-3 / t) and 12e-3 < t < 16e-3  # a: busy 6 ms, full speed 2
    assert short.stages[0].step_s == pytest.approx(2 * layer_seconds(limited.decode_s, 8))  # busy: the probed pace
    even = predict([limited, free], costs, plan_layers(12, 2), 1)
    t = even.latency_s
    assert t == pytest.approx(12e-3 + 12e-3 * 18e-3 / t) and 18e-3 < t < 24e-3  # its quota: 6 ms of CPU in >= 18
    assert predict([free, free], costs, plan_layers(12, 2), 1).latency_s == pytest.approx(12e-3)  # no limit


def test_figures_with_fixed_and_head_times_survive_a_file():
    figures = host("a", 1.0, fixed_ms=0.5, head_ms=3.0)
    again = HostFigures.from_dict(json.loads(json.dumps(figures.as_dict())))
    assert again == figures and again.head_s[16] == pytest.approx(12e-3)
    assert HostFigures.from_dict({**host("b", 1.0).as_dict(), "step_fixed_s": None}).step_fixed_s is None


@pytest.mark.parametrize("bad, match", [
    (dict(decode_s={4: 1e-3}), "decode time at batch 1"),
    (dict(decode_s={1: -1.0}), "positive"),
    (dict(decode_s={1: 1e-3}, step_fixed_s={4: 1e-3}), "step_fixed_s must be"),
    (dict(decode_s={1: 1e-3}, head_s={1: -1e-3}), "head_s must be"),
])
def test_bad_figures_are_refused(bad, match):
    with pytest.raises(PlanError, match=match):
        HostFigures(name="x", memory_bytes=MB, **bad)


def test_keep_all_gives_every_host_a_layer():
    costs = ModelCosts(layer_bytes=[10 * MB] * 4)
    hosts = [host("fast0", 1.0), host("crawl", 50.0), host("fast1", 1.0)]
    placement = place_layers(hosts, costs, batch=16, keep_all=True)
    assert placement.hosts == ["fast0", "crawl", "fast1"] and len(placement.ranges[1]) == 1
    assert placement.left_out == {}
    with pytest.raises(PlanError, match="at least one layer"):
        place_layers(hosts * 2, ModelCosts(layer_bytes=[MB] * 2), keep_all=True)
    tiny = [host("tiny", 1.0, memory=MB), host("big", 1.0)]
    with pytest.raises(PlanError, match="no placement"):
        place_layers(tiny, costs, keep_all=True)
