"""Bad input: every mistake a user can make with the splitter or a partition folder fails clearly.

Errors say what is wrong and name the file or layers concerned; the CLI turns them into
exit code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest

from chatloop.models import LayerRange
from chatloop.partition import (
    Manifest,
    ManifestError,
    PartitionError,
    PlanError,
    SafetensorsError,
    load_stage,
)
from chatloop.partition.safetensors_stream import read_header
from chatloop.partition.splitter import main, split_model


def copy_checkpoint(checkpoint, tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoint.path, folder)
    return folder


@pytest.fixture
def llama_parts(tiny_checkpoint, tmp_path) -> Path:
    """The tiny Llama (5 layers) split into 4 partitions: 0-1, 2-2, 3-3, 4-4."""
    out = tmp_path / "parts"
    split_model(tiny_checkpoint("llama").path, out, 4, progress=False)
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)``: its exit code, stdout and stderr (and nothing printed before it)."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def split_cli(capsys, model, output, num_partitions: int, *extra: str) -> tuple[int, str, str]:
    """``chatloop-split --model MODEL --output OUTPUT --num-partitions N EXTRA...``."""
    argv = ["--model", str(model), "--output", str(output), "--num-partitions", str(num_partitions)]
    return run_cli(capsys, *argv, *extra)


# --- the source checkpoint ------------------------------------------------------------------


def test_missing_model(tmp_path):
    message = r"model '/nonexistent/model' not found: give a Hugging Face checkpoint folder"
    with pytest.raises(FileNotFoundError, match=message):
        split_model("/nonexistent/model", tmp_path, 4)
    assert not list(tmp_path.iterdir()), "nothing written for a model that does not exist"


def test_missing_model_cli(tmp_path, capsys):
    code, out, err = split_cli(capsys, "/nonexistent/model", tmp_path / "o", 4)
    assert code == 2
    assert err.startswith("chatloop-split: error: model '/nonexistent/model' not found")
    assert "Traceback" not in err and out == ""


def test_folder_without_config(tiny_checkpoint, tmp_path, capsys):
    folder = copy_checkpoint(tiny_checkpoint("llama"), tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json: it is not a Hugging Face checkpoint folder"):
        split_model(folder, tmp_path / "out", 4)
    code, _, err = split_cli(capsys, folder, tmp_path / "out", 4)
    assert code == 2 and "no config.json" in err


def test_folder_without_weights(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("llama"), tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no \*\.safetensors or pytorch_model\.bin weights"):
        split_model(folder, tmp_path / "out", 4)


def test_unsupported_model_type(tmp_path, capsys):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 12}))
    message = r"model_type 'bert' is not supported: ChatLoop runs llama, mistral, qwen2, gpt2"
    with pytest.raises(ValueError, match=message):
        split_model(folder, tmp_path / "out", 4)
    code, _, err = split_cli(capsys, folder, tmp_path / "out", 4)
    assert code == 2 and "'bert' is not supported" in err


def test_unsupported_rope_and_sliding_window(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        split_model(folder, tmp_path / "out", 4)
    config.pop("rope_scaling")
    config.update(model_type="mistral", sliding_window=0)  # (windows are supported: tests/unit/test_sliding_window.py)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sliding_window 0 must be at least 1"):
        split_model(folder, tmp_path / "out", 4)


@pytest.mark.parametrize(
    "garbage, message",
    [
        (b"\xff" * 8 + b"not a safetensors file at all" * 10, "is corrupt or truncated: its header claims"),
        (struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64, "is corrupt: its header is not JSON"),
        (b"abc", "is not a safetensors file: it is only 3 bytes long"),
    ],
)
def test_corrupt_source_safetensors(garbage, message, tiny_checkpoint, tmp_path, capsys):
    folder = copy_checkpoint(tiny_checkpoint("llama"), tmp_path)
    (folder / "model.safetensors").write_bytes(garbage)
    with pytest.raises(SafetensorsError, match=message) as e:
        split_model(folder, tmp_path / "out", 4)
    assert "model.safetensors" in str(e.value)
    code, _, err = split_cli(capsys, folder, tmp_path / "out", 4)
    assert code == 2 and message in err


def test_truncated_source_safetensors(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("llama"), tmp_path)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(SafetensorsError, match=r"model\.safetensors is truncated: tensor .* ends at byte"):
        split_model(folder, tmp_path / "out", 4)


def test_missing_shard(tiny_checkpoint, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint("llama", max_shard_size="40KB").path, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} is listed in model.safetensors.index.json but missing"):
        split_model(folder, tmp_path / "out", 4)


def test_missing_tied_embedding(tiny_checkpoint, tmp_path):
    """A tied checkpoint whose embedding is missing cannot give the last stage its head."""
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(tiny_checkpoint("qwen2"), tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["model.embed_tokens.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match="tie_word_embeddings is set but model.embed_tokens.weight is missing"):
        split_model(folder, tmp_path / "out", 4)


def test_tensor_of_no_stage(tiny_checkpoint, tmp_path):
    """A checkpoint with more layers than its config says is not silently cut."""
    folder = copy_checkpoint(tiny_checkpoint("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 4  # the weights have 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.4\..* belongs to layer 4, which no stage owns"):
        split_model(folder, tmp_path / "out", 4)


# --- impossible plans -----------------------------------------------------------------------


def test_more_partitions_than_layers(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("llama").path  # 5 layers
    with pytest.raises(PlanError, match="6 stages for 5 layers"):
        split_model(path, tmp_path / "out", 6)
    code, _out, err = split_cli(capsys, path, tmp_path / "out", 6)
    assert code == 2
    assert "chatloop-split: error: 6 stages for 5 layers" in err and "use at most 5 stages" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "ranges, message",
    [
        ("0-1,3-4", "gap: layers 2-2 belong to no stage"),
        ("0-2,2-4", "overlap: stage 1 starts at layer 2"),
        ("0-1,2-5", "past the end"),
        ("0-1,2-3", "the last range must end at 4"),
        ("0-4", "1 layer ranges given for 2 stages"),
        ("0-1;2-4", "write ranges like '0-7,8-15'"),
    ],
)
def test_bad_ranges_cli(ranges, message, tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("llama").path
    code, _, err = split_cli(capsys, path, tmp_path / "out", 2, "--ranges", ranges)
    assert code == 2
    assert message in err


def test_output_is_a_file_cli(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    code, _, err = split_cli(capsys, tiny_checkpoint("llama").path, target, 2)
    assert code == 2
    assert err.startswith("chatloop-split: error:") and str(target) in err and "Traceback" not in err


def test_zero_partitions_cli(tiny_checkpoint, tmp_path, capsys):
    code, _, err = split_cli(capsys, tiny_checkpoint("llama").path, tmp_path, 0)
    assert code == 2 and "need at least 1 stage" in err


def test_cli_bad_dtype_and_missing_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "x", "--output", "y", "--num-partitions", "2", "--dtype", "int4"])
    assert e.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", "x"])
    assert e.value.code == 2
    assert "required" in capsys.readouterr().err


# --- the partition folder -------------------------------------------------------------------


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match=f"no manifest.json in {tmp_path}: split the model there first"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_stage(tmp_path, 0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: "{not json", "is not a ChatLoop manifest"),
        (lambda raw: json.dumps({**raw, "format_version": 99}), "has format_version 99, this ChatLoop reads 1"),
        (lambda raw: json.dumps({k: v for k, v in raw.items() if k != "dtype"}), "is not a ChatLoop manifest"),
        (lambda raw: json.dumps({**raw, "partitions": raw["partitions"][::-1]}), "must be numbered 0..3 in order"),
    ],
)
def test_damaged_manifest(edit, message, llama_parts):
    path = llama_parts / "manifest.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(ManifestError, match=message):
        load_stage(llama_parts, 0)


def test_partition_index_beyond_count(llama_parts):
    with pytest.raises(ManifestError, match="holds 4 partitions, partition 4 was asked for"):
        load_stage(llama_parts, 4)
    with pytest.raises(ManifestError, match="partition -1 was asked for"):
        load_stage(llama_parts, -1)


def test_missing_partition_file(llama_parts):
    (llama_parts / "partition_2.safetensors").unlink()
    message = r"partition_2\.safetensors is missing: copy it from the splitter's output"
    with pytest.raises(PartitionError, match=message):
        load_stage(llama_parts, 2)
    load_stage(llama_parts, 1)  # the others still load


def test_truncated_partition(llama_parts):
    path = llama_parts / "partition_1.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    message = rf"partition_1\.safetensors has {size - 10} bytes, the manifest says {size}: the file is truncated"
    with pytest.raises(PartitionError, match=message):
        load_stage(llama_parts, 1)


def test_truncated_partition_is_caught_by_its_header_too(llama_parts):
    """Past the manifest's size check, the header's offsets still catch a short file."""
    path = llama_parts / "partition_1.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(SafetensorsError, match=r"partition_1\.safetensors is truncated: tensor .* ends at byte"):
        read_header(path)
    manifest = Manifest.load(llama_parts)
    partitions = list(manifest.partitions)
    partitions[1] = dataclasses.replace(partitions[1], num_bytes=path.stat().st_size)
    patched = dataclasses.replace(manifest, partitions=partitions)
    with pytest.raises(PartitionError, match=r"partition_1\.safetensors is truncated"):
        load_stage(llama_parts, 1, manifest=patched, verify_sha256=False)


def test_garbage_partition_of_the_right_size(llama_parts):
    path = llama_parts / "partition_1.safetensors"
    path.write_bytes(b"\xff" * path.stat().st_size)
    with pytest.raises(PartitionError, match=r"partition_1\.safetensors: blake3 differs"):
        load_stage(llama_parts, 1)
    with pytest.raises(PartitionError, match=r"partition_1\.safetensors is corrupt or truncated"):
        load_stage(llama_parts, 1, verify_sha256=False)


def test_layers_differ_from_the_configuration(llama_parts):
    with pytest.raises(PartitionError, match=r"the configuration gives worker 1 layers 2-3, but "
                                             r"partition_1.safetensors in .* holds layers 2-2") as e:
        load_stage(llama_parts, 1, expected_layers=LayerRange(2, 3))
    assert "partition_1.safetensors" in str(e.value)
    assert "(the split's plan: 0-1, 2-2, 3-3, 4-4)" in str(e.value), "the message lists the manifest's ranges"
    load_stage(llama_parts, 1, expected_layers=LayerRange(2, 2))


def test_hash_mismatch_after_a_flipped_byte(llama_parts):
    path = llama_parts / "partition_2.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor: the size and the header stay valid
    path.write_bytes(bytes(data))
    with pytest.raises(PartitionError, match=r"partition_2\.safetensors: blake3 differs from the manifest's"):
        load_stage(llama_parts, 2)  # by default
    load_stage(llama_parts, 2, verify_sha256=False)  # without the check the damage goes unseen


def test_partition_from_another_split(llama_parts):
    """Partitions 1 and 2 (one layer each) have the same size: swapped, the tensor names give them away."""
    one, two = llama_parts / "partition_1.safetensors", llama_parts / "partition_2.safetensors"
    assert one.stat().st_size == two.stat().st_size
    one_bytes = one.read_bytes()
    one.write_bytes(two.read_bytes())
    two.write_bytes(one_bytes)
    message = r"does not hold stage 1's tensors: missing \['model\.layers\.2\..*unexpected \['model\.layers\.3\."
    with pytest.raises(PartitionError, match=message):
        load_stage(llama_parts, 1, verify_sha256=False)


def test_partition_in_another_dtype(llama_parts, tiny_checkpoint, tmp_path):
    """A partition from a bfloat16 split in a float32 folder (sizes patched) is refused."""
    other = tmp_path / "bf16"
    split_model(tiny_checkpoint("llama").path, other, 4, dtype="bfloat16", progress=False)
    shutil.copy(other / "partition_3.safetensors", llama_parts / "partition_3.safetensors")
    raw = json.loads((llama_parts / "manifest.json").read_text())
    raw["partitions"][3]["num_bytes"] = (llama_parts / "partition_3.safetensors").stat().st_size
    (llama_parts / "manifest.json").write_text(json.dumps(raw))
    message = r"partition_3\.safetensors: tensor .* is torch\.bfloat16, the manifest says float32"
    with pytest.raises(PartitionError, match=message):
        load_stage(llama_parts, 3, verify_sha256=False)


def test_partition_file_differs_from_the_configuration(llama_parts):
    with pytest.raises(PartitionError,
                       match=r"gives worker 1 partition partition_7.safetensors, but partition 1 in .* is "
                             r"partition_1.safetensors: set cluster.workers\[1\].partition"):
        load_stage(llama_parts, 1, expected_file="partition_7.safetensors")
    load_stage(llama_parts, 1, expected_file="partition_1.safetensors")


def test_worker_host_must_be_this_machine(llama_parts):
    from chatloop.runtime.remote_stage import RemoteStage
    from chatloop.stage import StageSpec

    spec = StageSpec(name="worker1", index=1, directory=str(llama_parts), host="192.0.2.77", min_capacity_tokens=16)
    with pytest.raises(ValueError, match=r"worker1 is configured to run on '192.0.2.77' \(cluster.workers\[1\].host\), "
                                         r"but this rank runs on .*: start rank 2 on 192.0.2.77"):
        RemoteStage(spec, rpc_timeout_s=5)
    here = RemoteStage(StageSpec(name="worker1", index=1, directory=str(llama_parts), host="localhost",
                                 min_capacity_tokens=16), rpc_timeout_s=5)
    assert here.describe().layers == "2-2"


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.workers=[{start_layer: 3, end_layer: 1}]", "a worker's layers 3-1 are empty or negative"),
        ("cluster.workers=[{start_layer: 0, end_layer: 1, port: 50051}]", "Key 'port' not in 'WorkerSpec'"),
        ("cluster.num_workers=two", "Value 'two' of type 'str' could not be converted to Integer"),
    ],
)
def test_bad_worker_rows(override, message):
    from chatloop import load_config

    with pytest.raises(ValueError, match=message):
        load_config(["cluster.num_workers=1", override])
