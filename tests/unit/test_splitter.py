"""The splitter: a key filter plus a plan, streamed tensor by tensor, with a manifest to check against."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from safetensors import safe_open
from safetensors.torch import load_file

from chatloop.models import build_stage
from chatloop.partition import Manifest, load_stage, parse_ranges, plan_layers
from chatloop.partition.splitter import main, split_model

FAMILIES = ["llama", "qwen2", "gpt2"]
EMBEDDING_KEY = {
    "llama": "model.embed_tokens.weight",
    "qwen2": "model.embed_tokens.weight",
    "gpt2": "transformer.wte.weight",
}
LAYER_KEY = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.")
FIRST_ONLY = ("model.embed_tokens.", "transformer.wte.", "transformer.wpe.")
LAST_ONLY = ("model.norm.", "transformer.ln_f.", "lm_head.")


def load_source(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (one file or shards)."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        shard = load_file(path)
        assert not state.keys() & shard.keys()
        state.update(shard)
    assert state, f"no safetensors in {folder}"
    return state


def load_partitions(directory: Path, manifest: Manifest) -> list[dict[str, torch.Tensor]]:
    return [load_file(directory / p.file) for p in manifest.partitions]


def assert_union_equals_source(parts: list[dict[str, torch.Tensor]], source: dict[str, torch.Tensor]) -> None:
    union: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, tensor in part.items():
            if key in union:  # a tied embedding: the same values in both partitions
                assert torch.equal(union[key], tensor), key
            union[key] = tensor
    assert sorted(union) == sorted(source)
    for key, tensor in source.items():
        assert union[key].dtype == tensor.dtype, key
        assert union[key].shape == tensor.shape, key
        assert torch.equal(union[key], tensor), key


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_union_of_partitions_equals_source(family, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint(family)
    source = load_source(checkpoint.path)
    manifest = split_model(checkpoint.path, tmp_path, 4, progress=False)
    parts = load_partitions(tmp_path, manifest)
    assert len(parts) == 4
    assert_union_equals_source(parts, source)

    counts = Counter(key for part in parts for key in part)
    embedding = EMBEDDING_KEY[family]
    if checkpoint.tied:
        assert "lm_head.weight" not in source
        assert embedding in parts[0] and embedding in parts[-1], "a tied head needs the embedding on the last stage"
        assert not any(embedding in part for part in parts[1:-1])
        assert torch.equal(parts[0][embedding], parts[-1][embedding])
        assert counts[embedding] == 2
        del counts[embedding]
    else:
        assert embedding in parts[0] and embedding not in parts[-1]
        assert "lm_head.weight" in parts[-1]
    assert set(counts.values()) == {1}, "every other tensor is in exactly one partition"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_partition_holds_only_its_stage_keys(family, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint(family)
    manifest = split_model(checkpoint.path, tmp_path, 4, progress=False)
    plan = plan_layers(checkpoint.num_layers, 4)
    assert manifest.plan == plan
    for i, (_info, part) in enumerate(zip(manifest.partitions, load_partitions(tmp_path, manifest))):
        is_first, is_last = i == 0, i == len(plan) - 1
        layers_seen = set()
        for key in part:
            match = LAYER_KEY.match(key)
            if match:
                layer = int(match.group(1))
                assert layer in plan[i].indices, f"partition {i} ({plan[i]}) holds {key}"
                layers_seen.add(layer)
            elif key == EMBEDDING_KEY[family] and checkpoint.tied:
                assert is_first or is_last, key
            elif key.startswith(FIRST_ONLY):
                assert is_first, f"partition {i} holds {key}"
            elif key.startswith(LAST_ONLY):
                assert is_last, f"partition {i} holds {key}"
            else:
                pytest.fail(f"partition {i} holds {key}, which belongs to no stage")
        assert layers_seen == set(plan[i].indices), f"partition {i} misses layers"
        # Exactly the parameters of the stage that loads it.
        stage = build_stage(manifest.model_config, plan[i], is_first, is_last)
        assert set(part) == set(stage.state_dict()), f"partition {i}"


def test_manifest_fields(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llama")
    manifest = split_model(checkpoint.path, tmp_path, 4, progress=False)
    assert manifest.dtype == "float32"
    assert manifest.num_partitions == 4
    assert manifest.model_config == json.loads((checkpoint.path / "config.json").read_text())
    assert manifest.source == str(checkpoint.path)
    assert [str(r) for r in manifest.plan] == ["0-1", "2-2", "3-3", "4-4"]  # 5 layers: remainder first
    for i, info in enumerate(manifest.partitions):
        path = tmp_path / info.file
        assert info.index == i
        assert info.file == f"partition_{i}.safetensors"
        assert info.num_bytes == path.stat().st_size
        assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert info.blake3 == blake3(path.read_bytes()).hexdigest()
        assert info.hashes == {"blake3": info.blake3, "sha256": info.sha256}
        assert info.has_embeddings == (i == 0)
        assert info.has_head == (i == 3)
        with safe_open(path, framework="pt") as f:
            assert info.num_tensors == len(list(f.keys()))
            assert f.metadata()["layers"] == str(info.layers)
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"
    # What is saved is what is loaded.
    assert Manifest.load(tmp_path) == manifest
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["partitions"][1]["start_layer"] == 2 and raw["partitions"][1]["end_layer"] == 2


def test_explicit_ranges(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("qwen2")
    manifest = split_model(checkpoint.path, tmp_path, 2, ranges=parse_ranges("0-2,3-3"), progress=False)
    assert [str(r) for r in manifest.plan] == ["0-2", "3-3"]
    parts = load_partitions(tmp_path, manifest)
    assert any(k.startswith("model.layers.2.") for k in parts[0])
    assert all(not k.startswith("model.layers.") or k.startswith("model.layers.3.") for k in parts[1])
    assert_union_equals_source(parts, load_source(checkpoint.path))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_converts_floating_tensors(dtype, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llama")
    target = getattr(torch, dtype)
    manifest = split_model(checkpoint.path, tmp_path, 4, dtype=dtype, progress=False)
    assert manifest.dtype == dtype
    source = load_source(checkpoint.path)
    parts = load_partitions(tmp_path, manifest)
    for part in parts:
        for key, tensor in part.items():
            assert tensor.dtype == target, key
            assert torch.equal(tensor, source[key].to(target)), key
    # The fp32 source is about twice the size of what was written.
    assert sum(p.num_bytes for p in manifest.partitions) < 0.6 * (checkpoint.path / "model.safetensors").stat().st_size
    stage = load_stage(tmp_path, 3, verify_sha256=True)
    assert {p.dtype for p in stage.parameters()} == {target}


def test_unknown_dtype_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="'int4' is not one of auto"):
        split_model(tiny_checkpoint("llama").path, tmp_path, 4, dtype="int4")


def test_sharded_source_checkpoint(tiny_checkpoint, tmp_path):
    sharded = tiny_checkpoint("llama", max_shard_size="40KB")
    assert (sharded.path / "model.safetensors.index.json").is_file()
    assert len(list(sharded.path.glob("*.safetensors"))) > 4, "the fixture should have sharded the checkpoint"
    manifest = split_model(sharded.path, tmp_path / "sharded", 4, progress=False)
    parts = load_partitions(tmp_path / "sharded", manifest)
    assert_union_equals_source(parts, load_source(sharded.path))
    # The same model, unsharded, splits into the same tensors.
    single = split_model(tiny_checkpoint("llama").path, tmp_path / "single", 4, progress=False)
    for sharded_part, single_part in zip(parts, load_partitions(tmp_path / "single", single)):
        assert sharded_part.keys() == single_part.keys()
        assert all(torch.equal(sharded_part[k], single_part[k]) for k in sharded_part)


def _config_only_copy(checkpoint, folder):
    """A folder with the checkpoint's config.json only (the test writes the weights its own way), and the weights."""
    folder.mkdir()
    (folder / "config.json").write_text((checkpoint.path / "config.json").read_text())
    return folder, load_source(checkpoint.path)


def test_pytorch_model_bin_source(tiny_checkpoint, tmp_path):
    folder, source = _config_only_copy(tiny_checkpoint("llama"), tmp_path / "bin")
    torch.save(source, folder / "pytorch_model.bin")
    manifest = split_model(folder, tmp_path / "out", 4, progress=False)
    assert_union_equals_source(load_partitions(tmp_path / "out", manifest), source)


def test_gpt2_checkpoint_without_the_transformer_prefix(tiny_checkpoint, tmp_path):
    """GPT-2 hub files name tensors ``h.0.attn...``; partitions use save_pretrained's ``transformer.h.0.attn...``."""
    from safetensors.torch import save_file

    folder, source = _config_only_copy(tiny_checkpoint("gpt2"), tmp_path / "hub-style")
    save_file({k.removeprefix("transformer."): v for k, v in source.items()}, folder / "model.safetensors")
    manifest = split_model(folder, tmp_path / "out", 2, progress=False)
    assert_union_equals_source(load_partitions(tmp_path / "out", manifest), source)
    assert load_stage(tmp_path / "out", 1).is_last


def test_splitting_again_into_fewer_partitions_removes_stale_files(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("gpt2")
    split_model(checkpoint.path, tmp_path, 4, progress=False)
    (tmp_path / "partition_0.safetensors.verified").write_text("{}")  # an earlier ChatLoop's stamp
    split_model(checkpoint.path, tmp_path, 2, progress=False)
    names = sorted(p.name for p in tmp_path.glob("partition_*"))
    assert names == ["partition_0.safetensors", "partition_1.safetensors"]  # the earlier split's files and stamps
    assert Manifest.load(tmp_path).num_partitions == 2
    load_stage(tmp_path, 1, verify_sha256=True)


def test_cli_writes_partitions_and_manifest(tiny_checkpoint, tmp_path, capsys):
    checkpoint = tiny_checkpoint("qwen2")
    out = tmp_path / "parts"
    code = main(["--model", str(checkpoint.path), "--output", str(out), "--num-partitions", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    for i in range(4):
        assert (out / f"partition_{i}.safetensors").is_file()
        assert f"partition_{i}.safetensors" in printed
    assert "manifest.json" in printed
    manifest = Manifest.load(out)
    assert manifest.num_partitions == 4
    assert "config.json" in manifest.tokenizer_files and (out / "config.json").is_file()
    for i in range(4):
        load_stage(out, i, verify_sha256=True)


def test_cli_ranges_and_dtype(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llama")
    argv = ["--model", str(checkpoint.path), "--output", str(tmp_path), "--num-partitions", "2"]
    assert main([*argv, "--ranges", "0-3,4-4", "--dtype", "bfloat16"]) == 0
    manifest = Manifest.load(tmp_path)
    assert [str(r) for r in manifest.plan] == ["0-3", "4-4"]
    assert manifest.dtype == "bfloat16"
    assert load_file(tmp_path / "partition_1.safetensors")["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.slow
def test_smollm2_split(smollm2_split, smollm2_checkpoint):
    manifest = Manifest.load(smollm2_split)
    assert [str(r) for r in manifest.plan] == ["0-7", "8-15", "16-22", "23-29"]  # 30 layers
    assert manifest.model_config["tie_word_embeddings"] is True
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert name in manifest.tokenizer_files and (smollm2_split / name).is_file()
    with safe_open(smollm2_split / "partition_0.safetensors", framework="pt") as first, safe_open(
        smollm2_split / "partition_3.safetensors", framework="pt"
    ) as last, safe_open(smollm2_checkpoint / "model.safetensors", framework="pt") as source:
        embedding = source.get_tensor("model.embed_tokens.weight")
        for f in (first, last):
            assert torch.equal(f.get_tensor("model.embed_tokens.weight"), embedding)
        assert "model.norm.weight" in last.keys() and "model.norm.weight" not in first.keys()  # noqa: SIM118 - safe_open has no __contains__
    total = sum(p.num_bytes for p in manifest.partitions)
    embedding = 49152 * 576 * 4
    source_size = (smollm2_checkpoint / "model.safetensors").stat().st_size
    assert abs(total - (source_size + embedding)) < 1_000_000  # everything once, the tied embedding twice


# --- peak memory ----------------------------------------------------------------------------

BIG = dict(hidden=2048, intermediate=5632, vocab=32000, layers=8)


def write_big_llama_checkpoint(
    folder: Path, hidden: int, intermediate: int, vocab: int, layers: int
) -> tuple[int, int]:
    """A random-weight fp32 Llama checkpoint written without holding it in memory.

    The header is written by hand, the data region is left sparse (zeros on disk cost
    nothing) and the first 4 KiB of every tensor are random. Returns (file size, largest tensor bytes).
    """
    folder.mkdir(parents=True)
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)

    header, offset, largest = {"__metadata__": {"format": "pt"}}, 0, 0
    for name, shape in shapes.items():
        size = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset, largest = offset + size, max(largest, size)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    data_start = 8 + len(encoded)
    generator = torch.Generator().manual_seed(0)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(data_start + offset)
        for name in shapes:
            begin, end = header[name]["data_offsets"]
            chunk = torch.randn(min(1024, (end - begin) // 4), generator=generator)
            f.seek(data_start + begin)
            f.write(chunk.numpy().tobytes())
    return data_start + offset, largest


PEAK_RSS_REPORT = """
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("PEAK_RSS_KB", line.split()[1])
"""


def run_measuring_peak_rss(code: str, *args: str) -> int:
    """Run ``python -c code args`` and return its peak resident set size in bytes (Linux).

    The child reads its own ``VmHWM`` (the high-water mark of the memory it has after
    exec). ``ru_maxrss`` from ``wait4``/``RUSAGE_CHILDREN`` is no good here: Linux folds the
    forking parent's peak (this test process, with torch and models loaded) into it.
    """
    import chatloop

    # The child imports the same chatloop as this process, wherever it is run from.
    package_root = str(Path(chatloop.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", code + PEAK_RSS_REPORT, *args], capture_output=True, text=True, env=env, cwd=package_root
    )
    assert result.returncode == 0, f"{code!r} exited with {result.returncode}: {result.stderr[-2000:]}"
    match = re.search(r"^PEAK_RSS_KB (\d+)$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return int(match.group(1)) * 1024


@pytest.fixture
def big_tmp_path(tmp_path):
    """``tmp_path``, emptied after the test: pytest keeps the last runs' folders, and this one holds 4 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units and sparse files: Linux")
def test_splitter_peak_memory_is_far_below_the_checkpoint_size(big_tmp_path):
    tmp_path = big_tmp_path
    source = tmp_path / "big-llama"
    checkpoint_bytes, largest_tensor = write_big_llama_checkpoint(source, **BIG)
    assert checkpoint_bytes > 2 * 10**9

    baseline = run_measuring_peak_rss("import chatloop.partition.splitter\n")
    start = time.perf_counter()
    peak = run_measuring_peak_rss(
        "import sys\n"
        "from chatloop.partition.splitter import split_model\n"
        "split_model(sys.argv[1], sys.argv[2], 4, progress=False)\n",
        str(source),
        str(tmp_path / "parts"),
    )
    seconds = time.perf_counter() - start
    mb = 2**20
    print(
        f"\nsplitter peak RSS {peak / mb:.0f} MiB for a {checkpoint_bytes / mb:.0f} MiB checkpoint "
        f"(import baseline {baseline / mb:.0f} MiB, largest tensor {largest_tensor / mb:.0f} MiB, {seconds:.1f} s)"
    )
    assert peak < checkpoint_bytes / 2, f"peak RSS {peak / mb:.0f} MiB: the splitter holds too much of the model"
    # Streaming: beyond the interpreter and its imports, about one tensor at a time.
    assert peak - baseline < 2 * largest_tensor, f"peak RSS {peak / mb:.0f} MiB: over two tensors above the imports"

    manifest = Manifest.load(tmp_path / "parts")
    assert sum(p.num_tensors for p in manifest.partitions) == 3 + 9 * BIG["layers"]
    with safe_open(tmp_path / "parts" / "partition_3.safetensors", framework="pt") as out, safe_open(
        source / "model.safetensors", framework="pt"
    ) as src:
        for key in ("lm_head.weight", "model.layers.7.mlp.down_proj.weight", "model.norm.weight"):
            assert torch.equal(out.get_tensor(key), src.get_tensor(key)), key


# --- the streaming safetensors reader and writer ---------------------------------------------


def test_streaming_reader_reads_what_safetensors_writes(tmp_path):
    from safetensors.torch import save_file

    from chatloop.partition.safetensors_stream import read_header, read_tensor

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    infos = read_header(tmp_path / "t.safetensors")
    assert sorted(infos) == sorted(tensors)
    for name, tensor in tensors.items():
        got = read_tensor(infos[name])
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got, tensor), name


def test_streaming_writer_output_is_a_safetensors_file(tmp_path):
    from chatloop.partition.safetensors_stream import StreamingWriter

    tensors = {"b": torch.randn(4, 3), "a": torch.arange(5, dtype=torch.int32), "c": torch.randn(2).to(torch.bfloat16)}
    path = tmp_path / "w.safetensors"
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = StreamingWriter(path, layout, metadata={"layers": "0-3"})
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    digest = writer.close()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert writer.digests == {"sha256": digest, "blake3": blake3(path.read_bytes()).hexdigest()}
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"layers": "0-3"}
        for key, tensor in tensors.items():
            assert torch.equal(f.get_tensor(key), tensor), key
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len % 8 == 0, "tensor data starts 8-byte aligned"


def test_streaming_writer_refuses_tensors_out_of_order(tmp_path):
    from chatloop.partition.safetensors_stream import StreamingWriter

    writer = StreamingWriter(tmp_path / "w.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (3,))])
    with pytest.raises(AssertionError, match="out of the declared order"):
        writer.add("b", torch.zeros(3))
    with pytest.raises(AssertionError, match="out of the declared order"):
        writer.add("a", torch.zeros(3))  # wrong shape
    writer.add("a", torch.zeros(2))
    with pytest.raises(AssertionError, match="closed before every tensor was written"):
        writer.close()
