"""The plan: layers to stages, a pure function; impossible plans raise PlanError saying what to change."""

from __future__ import annotations

import pytest

from chatloop.models import LayerRange
from chatloop.partition.plan import PlanError, parse_ranges, plan_layers


def as_text(plan: list[LayerRange]) -> str:
    return ",".join(str(r) for r in plan)


def assert_covers(plan: list[LayerRange], num_layers: int) -> None:
    """Every layer owned by exactly one stage, in order, each stage non-empty."""
    owned = [i for r in plan for i in r.indices]
    assert owned == list(range(num_layers))
    assert all(len(r) >= 1 for r in plan)


def test_seed_table_even_split_32_over_4():
    plan = plan_layers(32, 4)
    assert plan == [LayerRange(0, 7), LayerRange(8, 15), LayerRange(16, 23), LayerRange(24, 31)]
    assert as_text(plan) == "0-7,8-15,16-23,24-31"


def test_uneven_split_gives_the_remainder_to_the_first_stages():
    plan = plan_layers(30, 4)
    assert as_text(plan) == "0-7,8-15,16-22,23-29"
    assert [len(r) for r in plan] == [8, 8, 7, 7]


@pytest.mark.parametrize(
    "num_layers, num_stages",
    [(n, s) for n in (1, 2, 5, 7, 22, 30, 32, 80) for s in (1, 2, 3, 4, 8) if s <= n],
)
def test_even_split_covers_every_layer_with_sizes_differing_by_at_most_one(num_layers, num_stages):
    plan = plan_layers(num_layers, num_stages)
    assert len(plan) == num_stages
    assert_covers(plan, num_layers)
    sizes = [len(r) for r in plan]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_one_stage_owns_everything():
    assert plan_layers(30, 1) == [LayerRange(0, 29)]


def test_as_many_stages_as_layers():
    assert plan_layers(4, 4) == [LayerRange(i, i) for i in range(4)]


def test_weights_give_layers_in_proportion():
    plan = plan_layers(32, 4, weights=[1, 1, 1, 5])
    assert as_text(plan) == "0-3,4-7,8-11,12-31"
    plan = plan_layers(32, 2, weights=[3, 1])
    assert as_text(plan) == "0-23,24-31"


def test_equal_weights_equal_the_even_split():
    assert plan_layers(30, 4, weights=[2.5] * 4) == plan_layers(30, 4)


def test_weights_never_leave_a_stage_empty():
    plan = plan_layers(4, 3, weights=[100, 1, 1])
    assert_covers(plan, 4)
    assert [len(r) for r in plan] == [2, 1, 1]


@pytest.mark.parametrize("weights", [[1, 2, 3], [1, 1, 1, 0], [1, -1, 1, 1]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(PlanError, match="positive stage weights"):
        plan_layers(32, 4, weights=weights)


def test_explicit_ranges_are_accepted_as_given():
    ranges = parse_ranges("0-9,10-15,16-30,31-31")
    assert plan_layers(32, 4, ranges=ranges) == ranges


def test_ranges_and_weights_together_are_refused():
    with pytest.raises(PlanError, match="not both"):
        plan_layers(32, 4, ranges=plan_layers(32, 4), weights=[1, 1, 1, 1])


def test_more_stages_than_layers():
    with pytest.raises(PlanError, match="5 stages for 4 layers") as e:
        plan_layers(4, 5)
    assert "at most 4 stages" in str(e.value)


@pytest.mark.parametrize("num_layers, num_stages, message", [(0, 1, "at least 1"), (4, 0, "at least 1 stage")])
def test_zero_layers_or_stages(num_layers, num_stages, message):
    with pytest.raises(PlanError, match=message):
        plan_layers(num_layers, num_stages)


def test_gap_between_ranges():
    with pytest.raises(PlanError, match=r"gap: layers 8-9 belong to no stage \(stage 1 starts at 10\)"):
        plan_layers(32, 4, ranges=parse_ranges("0-7,10-15,16-23,24-31"))


def test_first_range_not_starting_at_zero():
    with pytest.raises(PlanError, match="gap: layers 0-0"):
        plan_layers(32, 4, ranges=parse_ranges("1-7,8-15,16-23,24-31"))


def test_overlapping_ranges():
    with pytest.raises(PlanError, match="overlap: stage 2 starts at layer 14"):
        plan_layers(32, 4, ranges=parse_ranges("0-7,8-15,14-23,24-31"))


def test_ranges_past_the_end():
    with pytest.raises(PlanError, match=r"past the end.*ends at layer 35.*layers 0-31"):
        plan_layers(32, 4, ranges=parse_ranges("0-7,8-15,16-23,24-35"))


def test_ranges_not_ending_at_the_last_layer():
    with pytest.raises(PlanError, match="layers 30-31 belong to no stage: the last range must end at 31"):
        plan_layers(32, 4, ranges=parse_ranges("0-7,8-15,16-23,24-29"))


def test_wrong_number_of_ranges():
    with pytest.raises(PlanError, match="3 layer ranges given for 4 stages"):
        plan_layers(32, 4, ranges=parse_ranges("0-7,8-15,16-31"))


def test_plan_error_is_a_value_error():
    assert issubclass(PlanError, ValueError)


def test_parse_ranges():
    assert parse_ranges("0-7,8-15") == [LayerRange(0, 7), LayerRange(8, 15)]
    assert parse_ranges(" 0-7 , 8-8 ") == [LayerRange(0, 7), LayerRange(8, 8)]


@pytest.mark.parametrize("text", ["", "0-7,", "0-7;8-15", "a-b", "0-7-9", "7", "0..7", "-1-3", "0-x"])
def test_parse_ranges_bad_text(text):
    with pytest.raises(PlanError, match="write ranges like '0-7,8-15'"):
        parse_ranges(text)


def test_reversed_range_is_refused():
    with pytest.raises(PlanError, match="7-3 is empty"):
        parse_ranges("7-3")


def test_layer_range_is_inclusive():
    r = LayerRange(8, 15)
    assert len(r) == 8
    assert list(r.indices) == list(range(8, 16))
    assert str(r) == "8-15"
