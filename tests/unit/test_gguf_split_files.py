"""Split GGUF files (``NAME-00001-of-0000N.gguf``, as llama.cpp's gguf-split and convert_hf_to_gguf's
``--split-max-tensors`` write them): any shard names the model, all shards are read, and the partitions are the
unsplit file's, byte for byte; a missing or foreign shard is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from gguf_files import split_gguf, write_tiny_llama
from safetensors import safe_open

from chatloop.partition.manifest import QUANTIZED_KEY
from chatloop.partition.splitter import split_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama GGUF of every type, its 3 shards, and the whole file split in 2 partitions."""
    folder = tmp_path_factory.mktemp("split-files")
    write_tiny_llama(folder / "tiny.gguf")
    shards = split_gguf(folder / "tiny.gguf", max_tensors=8)
    split_model(folder / "tiny.gguf", folder / "whole", 2, progress=False)
    return folder, shards


def _partitions(folder):
    parts = []
    for index in range(2):
        with safe_open(folder / f"partition_{index}.safetensors", framework="pt") as f:
            names = f.keys()  # safe_open is not iterable itself
            parts.append((json.loads(f.metadata()[QUANTIZED_KEY]), {k: f.get_tensor(k) for k in names}))
    return parts


@pytest.mark.parametrize("shard", [0, 2])
def test_any_shard_splits_to_the_whole_files_partitions(files, shard, tmp_path):
    import gguf

    folder, shards = files
    assert [s.name for s in shards] == [f"tiny-split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    first, last = gguf.GGUFReader(shards[0]), gguf.GGUFReader(shards[-1])
    assert "output.weight" not in {t.name for t in first.tensors}  # the head in a later shard: not tied all the same
    assert "general.architecture" not in last.fields
    split_model(shards[shard], tmp_path, 2, progress=False)
    for (formats, tensors), (whole_formats, whole) in zip(_partitions(tmp_path), _partitions(folder / "whole")):
        assert formats == whole_formats and tensors.keys() == whole.keys()
        assert all(torch.equal(tensors[k], whole[k]) for k in whole)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == json.loads((folder / "whole" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False


def test_a_missing_shard_is_refused_by_name(files, tmp_path):
    _, shards = files
    for s in shards[:2]:
        shutil.copy(s, tmp_path / s.name)
    with pytest.raises(FileNotFoundError, match="one of 3 shards of a split GGUF; tiny-split-00003-of-00003.gguf "
                                                "is missing"):
        split_model(tmp_path / shards[0].name, tmp_path / "parts", 2, progress=False)


def test_mixed_up_or_renamed_shards_are_refused(files, tmp_path):
    _, shards = files
    for s in shards:
        shutil.copy(s, tmp_path / s.name)
    shutil.copy(shards[1], tmp_path / shards[2].name)  # shard 2 under shard 3's name
    with pytest.raises(ValueError, match="its metadata says it is shard 1, its name shard 2 .*mixed up"):
        split_model(tmp_path / shards[0].name, tmp_path / "parts", 2, progress=False)
    shutil.copy(shards[0], tmp_path / "tiny.gguf")  # a first shard renamed as a whole file
    with pytest.raises(ValueError, match="its metadata says 3 shard\\(s\\), its name 1"):
        split_model(tmp_path / "tiny.gguf", tmp_path / "parts", 2, progress=False)
