"""A stage's memory between steps: what a prefill freed goes back to the system, decode steps pay nothing for it."""

from __future__ import annotations

import pytest
import torch

from chatloop.models import StepBatch
from chatloop.models.kv_cache import IN_PLACE_MAX_TOKENS
from chatloop.partition import load_stage
from chatloop.partition.splitter import split_model
from chatloop.stage import runner as stage_runner
from chatloop.stage.runner import StageRunner


@pytest.fixture
def runner(tiny_checkpoint, tmp_path) -> StageRunner:
    split_model(tiny_checkpoint("llama").path, tmp_path, 2, progress=False)
    return StageRunner(load_stage(tmp_path, 0, pack_weights=True), num_blocks=16, block_size=16, name="stage0")


def test_a_prefill_hands_its_freed_memory_back_and_a_decode_step_does_not(runner, monkeypatch):
    """glibc keeps what a prefill's temporaries freed (a MoE worker stayed ~145 MB over its RSS budget after one
    64-token prompt): a step of more tokens than decode steps and verify steps take trims the heap after it."""
    trims: list[int] = []
    monkeypatch.setattr(stage_runner, "release_freed_memory", lambda: trims.append(1))
    greedy: list = []  # a first stage of two samples nothing
    long = IN_PLACE_MAX_TOKENS + 3
    tokens = torch.randint(0, runner.stage.args.vocab_size, (1, long))
    runner.run(tokens, StepBatch.build([0], [long], [[0, 1]], 16), greedy)
    assert len(trims) == 1
    for position in range(long, long + 3):  # decode steps
        runner.run(tokens[:, :1], StepBatch.build([position], [1], [[0, 1]], 16), greedy)
    runner.run(tokens[:, :IN_PLACE_MAX_TOKENS], StepBatch.build([long + 3], [IN_PLACE_MAX_TOKENS], [[0, 1, 2]], 16),
               greedy)  # as long as a verify step gets
    assert len(trims) == 1
