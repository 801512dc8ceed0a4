"""Any contiguous layer range loads from the partitions a host holds, without a new split (issue 24, point 3)."""

from __future__ import annotations

import shutil

import pytest
import torch

from chatloop.models import LayerRange
from chatloop.partition import Manifest, PartitionError, load_stage
from chatloop.partition.ranges import files_for_range, load_layer_range, loadable_spans
from chatloop.partition.splitter import split_model
from chatloop.stage.runner import StageSpec, build_stage_runner
from tests.conftest import Pipeline, randomize_weights


@pytest.fixture(scope="module")
def sixteen_layers(tmp_path_factory):
    """A tiny 16-layer Llama (untied head) and a Qwen2 (tied embeddings), each split in 2 (0-7, 8-15) and in 3
    (0-4, 5-13, 14-15)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    made = {}
    for name, config_class, tied in (("llama", LlamaConfig, False), ("qwen2", Qwen2Config, True)):
        torch.manual_seed(1)
        config = config_class(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=16,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                              max_position_embeddings=128)
        model = randomize_weights(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()
        source = tmp_path_factory.mktemp(f"{name}-16")
        model.save_pretrained(source)
        two, three = tmp_path_factory.mktemp(f"{name}-2"), tmp_path_factory.mktemp(f"{name}-3")
        split_model(str(source), two, 2, progress=False)
        split_model(str(source), three, 3, ranges=[LayerRange(0, 4), LayerRange(5, 13), LayerRange(14, 15)],
                    progress=False)
        made[name] = (model, two, three)
    return made


def _logits(stages, prompt):
    pipeline = Pipeline(stages, block_size=4, num_blocks=32)
    prefill = pipeline.prefill([prompt])
    return prefill, pipeline.decode([int(prefill.argmax(-1)[0])])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ranges_across_partitions_give_the_logits_of_a_split_made_for_them(sixteen_layers, family):
    model, two, three = sixteen_layers[family]
    wanted = [LayerRange(0, 4), LayerRange(5, 13), LayerRange(14, 15)]
    assert [p.file for p in files_for_range(Manifest.load(two), wanted[1])] == [
        "partition_0.safetensors", "partition_1.safetensors"]
    from_two = [load_layer_range(two, r) for r in wanted]
    from_three = [load_stage(three, i, expected_layers=r) for i, r in enumerate(wanted)]
    prompt = [3, 17, 90, 5, 64, 2, 11]
    got, expected = _logits(from_two, prompt), _logits(from_three, prompt)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    with torch.no_grad():
        reference = model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(got[0][0], reference, atol=1e-4, rtol=1e-4)


def test_a_range_needing_a_file_the_host_lacks_is_refused_naming_it(sixteen_layers, tmp_path):
    _, two, _ = sixteen_layers["llama"]
    copied = tmp_path / "copied"
    shutil.copytree(two, copied)
    (copied / "partition_1.safetensors").unlink()
    manifest = Manifest.load(copied)
    assert loadable_spans(manifest, ["partition_0.safetensors"]) == [LayerRange(0, 7)]
    assert loadable_spans(manifest, ["partition_0.safetensors", "partition_1.safetensors"]) == [LayerRange(0, 15)]
    assert load_layer_range(copied, LayerRange(2, 6)).layers_range == LayerRange(2, 6)
    with pytest.raises(PartitionError, match=r"layers 5-13 .*needs partition_1\.safetensors.*cover: 0-7"):
        load_layer_range(copied, LayerRange(5, 13))
    with pytest.raises(PartitionError, match=r"needs partition_0\.safetensors"):  # the worker config's list rules
        load_layer_range(two, LayerRange(5, 13), held=["partition_1.safetensors"])
    with pytest.raises(PartitionError, match="past the model's last layer 15"):
        load_layer_range(two, LayerRange(10, 16))


def test_a_damaged_file_of_the_range_is_caught_by_its_hash(sixteen_layers, tmp_path):
    _, two, _ = sixteen_layers["llama"]
    copied = tmp_path / "damaged"
    shutil.copytree(two, copied)
    path = copied / "partition_1.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a weight byte, near the end: the header still reads
    path.write_bytes(bytes(data))
    with pytest.raises(PartitionError, match="partition_1"):
        load_layer_range(copied, LayerRange(5, 13))


def test_the_stage_runner_loads_a_planned_range(sixteen_layers):
    _, two, _ = sixteen_layers["llama"]
    spec = StageSpec(name="worker1", index=1, directory=str(two), expected_layers=LayerRange(5, 13),
                     kv_cache_mb=4, min_capacity_tokens=16, pack_weights=False, planned=True)
    with pytest.raises(PartitionError, match="make the cluster's layer ranges match the split"):  # not planned
        build_stage_runner(StageSpec(**{**spec.__dict__, "planned": False}))
    runner = build_stage_runner(spec)
    assert runner.stage.layers_range == LayerRange(5, 13)
    assert runner.partition == "partition_0.safetensors+partition_1.safetensors"
    held = StageSpec(**{**spec.__dict__, "held_files": ("partition_1.safetensors",)})
    with pytest.raises(PartitionError, match="needs partition_0"):
        build_stage_runner(held)


def test_a_worker_config_says_which_files_its_host_holds(tmp_path):
    from chatloop.worker_config import load_worker_file, worker_files

    own = worker_files(2, [(0, 7, "partition_0.safetensors"), (8, 15, "partition_1.safetensors")])[1]
    path = tmp_path / "worker-config-1.yaml"
    path.write_text(own.as_yaml())
    assert load_worker_file(path).held_files == ["partition_1.safetensors"]  # the reference layout: its own file
    path.write_text(own.as_yaml() + "holds: [partition_0.safetensors, partition_1.safetensors]\n")
    assert load_worker_file(path).held_files == ["partition_0.safetensors", "partition_1.safetensors"]
    path.write_text(own.as_yaml() + "holds: partition_0.safetensors\n")
    with pytest.raises(ValueError, match="holds: .* must be a list of partition file names"):
        load_worker_file(path)


def test_a_worker_started_from_its_file_takes_a_planned_range_its_files_cover(sixteen_layers, tmp_path):
    from chatloop.runtime import worker_host
    from chatloop.worker_config import load_worker_file

    _, two, _ = sixteen_layers["llama"]
    path = two / "configs" / "worker-config-1.yaml"  # worker 1: layers 8-15, partition_1 only
    own = load_worker_file(path)
    planned = StageSpec(name="worker1", index=1, directory="/elsewhere", expected_layers=LayerRange(10, 15),
                        kv_cache_mb=999, planned=True)
    with pytest.raises(ValueError, match="make the coordinator's cluster.workers match"):  # explicit ranges: as before
        worker_host._as_configured(StageSpec(**{**planned.__dict__, "planned": False}), own)
    spec = worker_host._as_configured(planned, own)
    assert spec.expected_layers == LayerRange(10, 15) and spec.directory == str(two)
    assert spec.held_files == ("partition_1.safetensors",)
    assert spec.kv_cache_mb == pytest.approx(own.kv_cache_mb * 6 / 8)  # its own budget, for 6 of its 8 layers
    wider = StageSpec(**{**planned.__dict__, "expected_layers": LayerRange(5, 13)})
    with pytest.raises(ValueError, match=r"layers 5-13, which need partition_0\.safetensors: copy them .*holds"):
        worker_host._as_configured(wider, own)
    copy = tmp_path / "worker-config-1.yaml"
    copy.write_text(path.read_text().replace("holds: []", "holds: [partition_0.safetensors, partition_1.safetensors]")
                    .replace("partitions_dir: ..", f"partitions_dir: {two}"))
    assert worker_host._as_configured(wider, load_worker_file(copy)).expected_layers == LayerRange(5, 13)
