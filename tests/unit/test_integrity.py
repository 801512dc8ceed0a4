"""Weights checked for real: a partition's bytes are hashed at every load, whatever its size, mtime and inode say,
and a stage whose outputs turn NaN or infinite for a whole micro-batch reports itself unhealthy, with the reason."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from blake3 import blake3

from chatloop.engine import SamplerInput, StageError, StageLostError
from chatloop.engine.pipeline import LocalPipeline
from chatloop.models import StepBatch
from chatloop.partition import Manifest, PartitionError, integrity, load_stage
from chatloop.partition.safetensors_stream import read_header
from chatloop.partition.splitter import split_model
from chatloop.stage import StageRunner
from chatloop.stage.fault_injection import NON_FINITE, fail_next

NAN_BYTES = struct.pack("<f", float("nan"))
GREEDY = SamplerInput(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0, step=0)


@pytest.fixture
def llama_parts(tiny_checkpoint, tmp_path) -> Path:
    """The tiny Llama (5 layers, float32) split into 4 partitions: 0-1, 2-2, 3-3, 4-4."""
    out = tmp_path / "parts"
    split_model(tiny_checkpoint("llama").path, out, 4, progress=False)
    return out


def overwrite_keeping_metadata(path: Path, tensor: str, data: bytes) -> None:
    """Write ``data`` over the start of ``tensor``'s bytes in ``path`` (its header untouched), then restore the
    file's times, as ``touch -r`` would: size, mtime, inode and device are all what they were."""
    before = path.stat()
    info = read_header(path)[tensor]
    assert len(data) <= info.num_bytes
    with open(path, "r+b") as f:
        f.seek(info.begin)
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    fingerprint = ("st_size", "st_mtime_ns", "st_ino", "st_dev")  # what the stamp of earlier ChatLoops recorded
    assert [getattr(after, k) for k in fingerprint] == [getattr(before, k) for k in fingerprint]


def poison(path: Path, tensor: str = "model.layers.2.mlp.down_proj.weight") -> None:
    """NaN over the first quarter of ``tensor``: a damaged layer whose every output is NaN."""
    size = read_header(path)[tensor].num_bytes // 4
    overwrite_keeping_metadata(path, tensor, NAN_BYTES * (size // 4))


# ---- the bytes, hashed at every load ---------------------------------------------------------------------
def test_bytes_changed_under_a_restored_mtime_are_refused(llama_parts):
    load_stage(llama_parts, 1)  # loaded, and found whole, once: nothing of that is remembered
    path = llama_parts / "partition_1.safetensors"
    poison(path)
    expected = Manifest.load(llama_parts).partitions[1].blake3
    with pytest.raises(PartitionError) as e:
        load_stage(llama_parts, 1)
    message = str(e.value)
    assert message.startswith(f"{path}: blake3 differs from the manifest's")
    assert f"expected {expected}, found {blake3(path.read_bytes()).hexdigest()}" in message
    assert "copy it again from the splitter's output (with manifest.json), or split the model again" in message
    assert not list(llama_parts.glob("*.verified")), "no stamp is written, none is trusted"


def test_every_load_hashes_the_bytes(llama_parts, monkeypatch):
    hashed = []
    real = integrity.hash_file
    monkeypatch.setattr(integrity, "hash_file", lambda path, algorithm: hashed.append((path.name, algorithm))
                        or real(path, algorithm))
    for _ in range(3):
        load_stage(llama_parts, 2)
    assert hashed == [("partition_2.safetensors", "blake3")] * 3
    load_stage(llama_parts, 2, verify_sha256=False)
    assert len(hashed) == 3


def test_a_split_made_before_blake3_is_checked_by_sha256(llama_parts):
    raw = json.loads((llama_parts / "manifest.json").read_text())
    for partition in raw["partitions"]:
        del partition["blake3"]  # a manifest written by an earlier ChatLoop
    (llama_parts / "manifest.json").write_text(json.dumps(raw))
    manifest = Manifest.load(llama_parts)
    assert manifest.partitions[3].blake3 is None and manifest.partitions[3].hashes == {
        "sha256": manifest.partitions[3].sha256}
    load_stage(llama_parts, 3)
    poison(llama_parts / "partition_3.safetensors", "model.layers.4.mlp.up_proj.weight")
    with pytest.raises(PartitionError, match=rf"partition_3\.safetensors: sha256 differs from the manifest's "
                                             rf"\(expected {manifest.partitions[3].sha256}, found [0-9a-f]{{64}}\)"):
        load_stage(llama_parts, 3)


def test_without_the_blake3_package_sha256_is_written_and_checked(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "_blake3", None)
    assert integrity.available() == ("sha256",)
    manifest = split_model(tiny_checkpoint("llama").path, tmp_path, 2, progress=False)
    assert all(p.blake3 is None and p.sha256 for p in manifest.partitions)
    load_stage(tmp_path, 1)
    poison(tmp_path / "partition_1.safetensors", "model.layers.3.mlp.down_proj.weight")
    with pytest.raises(PartitionError, match=r"partition_1\.safetensors: sha256 differs"):
        load_stage(tmp_path, 1)


def test_a_partition_that_cannot_be_read_for_its_hash(llama_parts, monkeypatch):
    def unreadable(path, algorithm):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(integrity, "hash_file", unreadable)
    with pytest.raises(PartitionError, match=r"partition_1\.safetensors cannot be read to check its hash "
                                             r"\(\[Errno 13\] Permission denied.*copy it again"):
        load_stage(llama_parts, 1)


def test_check_is_a_value_and_runs_on_its_own_thread(llama_parts):
    path = llama_parts / "partition_0.safetensors"
    hashes = Manifest.load(llama_parts).partitions[0].hashes
    future = integrity.start_check(path, hashes)
    assert future.result(timeout=30) is None
    mismatch = integrity.check(path, {"sha256": "0" * 64})
    assert mismatch == integrity.HashMismatch(path, "sha256", "0" * 64, hashes["sha256"])


# ---- a stage whose outputs turn non-finite ----------------------------------------------------------------
def runner_of(parts: Path, index: int, name: str, **load) -> StageRunner:
    stage = load_stage(parts, index, native_kernels=False, **load)
    return StageRunner(stage, num_blocks=8, block_size=16, name=name, index=index)


def prefill(num_sequences: int, length: int = 5) -> StepBatch:
    tables = [[2 * b, 2 * b + 1] for b in range(num_sequences)]
    return StepBatch.build([0] * num_sequences, [length - b for b in range(num_sequences)], tables, 16)


def test_damaged_weights_make_the_stage_unhealthy_and_it_says_why(llama_parts):
    poison(llama_parts / "partition_1.safetensors")
    with pytest.raises(PartitionError, match="blake3 differs"):
        load_stage(llama_parts, 1)
    runner = runner_of(llama_parts, 1, "stage1", verify_sha256=False)  # the damage, loaded unchecked
    batch = prefill(3)
    hidden = torch.randn(3, 5, 64)
    with pytest.raises(StageError) as e:
        runner.run(hidden, batch, [GREEDY] * 3, micro_batch=7)
    assert not isinstance(e.value, StageLostError)  # this step fails: its sequences would fail again on a replay
    assert str(e.value).startswith("stage1 is unhealthy: its hidden states hold NaN or infinity for all 3 sequences "
                                   "of micro-batch 7 (from finite inputs): its weights may be damaged")
    assert runner.health_error == f"unhealthy: {runner.unhealthy}"
    with pytest.raises(StageLostError, match="stage1 is unhealthy: its hidden states hold NaN"):
        runner.run(hidden, batch, [GREEDY] * 3, micro_batch=8)  # refused at once, replayed once it is replaced
    assert runner.num_micro_batches == 0

    healthy = runner_of(llama_parts, 0, "stage0")
    pipeline = LocalPipeline([healthy, runner])
    try:
        reports = pipeline.describe(1.0)
    finally:
        pipeline.close()
    assert [r.up for r in reports] == [True, False]
    assert reports[1].error == runner.health_error and reports[1].layers == "2-2"


def test_one_sequence_gone_non_finite_is_not_the_stage(llama_parts):
    runner = runner_of(llama_parts, 1, "stage1")
    batch = prefill(2)
    hidden = torch.randn(2, 5, 64)
    hidden[0, 1, 3] = float("inf")  # one sequence reached it damaged: the stage before it is at fault, not this one
    out = runner.run(hidden, batch, [GREEDY] * 2)
    assert not torch.isfinite(out[0]).all() and torch.isfinite(out[1, :4]).all()
    assert runner.unhealthy is None
    hidden[1, 0, 0] = float("nan")  # every sequence reached it damaged: still not this stage's doing
    runner.run(hidden, batch, [GREEDY] * 2)
    assert runner.unhealthy is None


def test_padding_is_not_looked_at(llama_parts):
    runner = runner_of(llama_parts, 1, "stage1")
    batch = prefill(2)  # the second sequence has 4 tokens: its fifth column is padding
    out = torch.randn(2, 5, 64)
    out[1, 4] = float("nan")
    assert runner._not_finite(torch.randn(2, 5, 64), batch, out, 0) is None
    out[0, 0, 0] = out[1, 3, 0] = float("nan")
    assert "all 2 sequences" in runner._not_finite(torch.randn(2, 5, 64), batch, out, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_rows_is_exact(dtype):
    from chatloop.stage.runner import _finite_rows

    x = torch.zeros(1, 5, 8, dtype=dtype)
    x[0, 0, 1] = torch.finfo(dtype).max  # the largest finite values are finite
    x[0, 0, 2] = torch.finfo(dtype).min
    x[0, 1, 3], x[0, 2, 4], x[0, 3, 5] = float("nan"), float("inf"), float("-inf")
    assert _finite_rows(x).tolist() == [[True, False, False, False, True]]


def test_the_last_stage_judges_by_the_logits_the_sampler_refused(llama_parts):
    runner = runner_of(llama_parts, 3, "stage3")
    batch = prefill(2)
    hidden = torch.randn(2, 5, 64)
    assert all(isinstance(t, int) for t in runner.run(hidden, batch, [GREEDY] * 2))
    fail_next(runner, NON_FINITE)  # the test hook: the next outputs are NaN, as damaged weights would make them
    with pytest.raises(StageError, match=r"stage3 is unhealthy: its logits hold NaN or infinity for all 2 sequences"):
        runner.run(hidden, batch, [GREEDY] * 2, micro_batch=3)
    assert runner.unhealthy.startswith("its logits hold NaN")


def test_the_first_stage_takes_token_ids(llama_parts):
    runner = runner_of(llama_parts, 0, "stage0")
    batch = prefill(1)
    fail_next(runner, NON_FINITE)
    with pytest.raises(StageError, match=r"its hidden states hold NaN or infinity for its one sequence of micro-batch"):
        runner.run(torch.tensor([[1, 2, 3, 4, 5]]), batch, [GREEDY])


def test_a_worker_unhealthy_across_generations_loads_and_verifies_its_stage_again(llama_parts):
    """A worker nobody restarts (started by hand, evicted) rejoins the next generation: its unhealthy stage is not
    kept, it is loaded again, and the partition's bytes are hashed."""
    from chatloop.runtime.worker_host import WorkerHost
    from chatloop.stage import StageSpec

    host = WorkerHost()
    spec = StageSpec(name="worker1", index=1, directory=str(llama_parts), min_capacity_tokens=16)
    host.create_stage(spec, 5)
    stage = host.stage
    assert host.create_stage(spec, 5).up and host.stage is stage  # kept while healthy
    assert host.alive()[2] is None
    stage.fail_next(NON_FINITE)
    with pytest.raises(StageError, match="worker1 is unhealthy"):
        stage.runner.run(torch.randn(1, 5, 64), prefill(1), [GREEDY])
    assert host.alive()[2] == stage.runner.unhealthy  # what the coordinator's heartbeat reads
    assert stage.describe().error == stage.runner.health_error  # what health and status read
    assert host.create_stage(spec, 5).up and host.stage is not stage  # loaded again, healthy
    host.stage.runner.unhealthy = "damaged"
    poison(llama_parts / "partition_1.safetensors")
    with pytest.raises(PartitionError, match=r"partition_1\.safetensors: blake3 differs"):
        host.create_stage(spec, 5)
    assert host.stage is None
