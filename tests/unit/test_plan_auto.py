"""``cluster.plan=auto`` (issue 24, point 4): the configuration, and the in-process cluster planned from a probe."""

from __future__ import annotations

import pytest

from chatloop import ChatLoop, load_config
from chatloop.models import LayerRange


def test_plan_is_checked():
    assert load_config(["cluster.plan=auto"]).cluster.plan == "auto"
    with pytest.raises(ValueError, match="choose even or auto"):
        load_config(["cluster.plan=fast"])
    with pytest.raises(ValueError, match="plan=auto plans the layers itself"):
        load_config(["cluster=reference", "cluster.plan=auto"])


@pytest.mark.slow
def test_auto_plans_smollm2_in_process_and_generates_the_same_text(local_smollm2_config):
    prompt = "The capital of France is"
    with ChatLoop.start(local_smollm2_config()) as even:
        expected = even.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
        even_ranges = [r.stage.layers_range for r in even.pipeline.runners]
    with ChatLoop.start(local_smollm2_config("cluster.plan=auto")) as auto:
        ranges = [r.stage.layers_range for r in auto.pipeline.runners]
        got = auto.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
        capacity = auto.capacity_tokens
    assert even_ranges == [LayerRange(0, 7), LayerRange(8, 15), LayerRange(16, 22), LayerRange(23, 29)]
    # SmolLM2's head (its tied 49152 x 576 embedding) weighs as much as 8 of its layers: the last stage, which
    # computes it at every step, gets fewer layers
    assert [i for r in ranges for i in r.indices] == list(range(30))
    assert len(ranges[-1]) < len(even_ranges[-1])
    assert got == expected
    assert capacity >= 256
