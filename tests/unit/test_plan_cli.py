"""``chatloop-plan`` and the model's costs from a manifest (issue 24, point 4)."""

from __future__ import annotations

import json

import pytest

from chatloop.partition import Manifest
from chatloop.partition.costs import model_costs
from chatloop.partition.placement import HostFigures
from chatloop.partition.splitter import split_model
from chatloop.plan_cli import main


@pytest.fixture(scope="module")
def split(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan-split")
    split_model(str(tiny_checkpoint("llama").path), out, 2, progress=False)  # 5 layers, untied head
    return out


def test_the_costs_add_up_to_the_partitions(split):
    manifest = Manifest.load(split)
    costs = model_costs(manifest, kv_cache_mb=3, num_hosts=2, headroom_mb=1)
    total = sum(costs.layer_bytes) + costs.embed_bytes + costs.head_bytes
    files = sum(p.num_bytes for p in manifest.partitions)
    assert total == pytest.approx(files, rel=0.01)  # the files add their headers
    assert len(set(costs.layer_bytes)) == 1 and costs.embed_bytes > 0 and costs.head_bytes > 0
    assert costs.head_layers == pytest.approx(costs.head_bytes / costs.layer_bytes[0], rel=1e-3)
    assert costs.kv_bytes_per_layer == 3 * 2**20 // 3  # the even split's stage holds 3 of 5 layers
    assert costs.memory(0, 5) == total + 5 * costs.kv_bytes_per_layer + 2**20


def _figures(tmp_path, name, ms, memory=2**30, **more):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(HostFigures(name=name, decode_s={1: ms / 1e3, 16: 16 * ms / 1e3},
                                           memory_bytes=memory, **more).as_dict()))
    return str(path)


def test_show_prints_each_hosts_layers_and_the_predictions(split, tmp_path, capsys):
    files = [_figures(tmp_path, "fast", 1.0), _figures(tmp_path, "slow", 3.0)]
    assert main(["show", "--partitions", str(split), *files, "--batch", "16", "--kv-cache-mb", "1"]) == 0
    out = capsys.readouterr().out
    auto, even = out.split("\neven:")
    assert "fast" in auto and "0-3" in auto and "4-4" in auto  # the slow host gets the last layer alone
    assert "0-2" in even and "3-4" in even
    assert main(["show", "--partitions", str(split), *files, "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert plans["auto"]["ranges"] == ["0-3", "4-4"] and plans["even"]["ranges"] == ["0-2", "3-4"]
    assert plans["auto"]["tokens_per_s"] > plans["even"]["tokens_per_s"]
    # a probe's fixed step and head, at the micro-batch (8: 16 in 2), beside its layer
    measured = _figures(tmp_path, "measured", 1.0, step_fixed_s={1: 2e-4, 16: 5e-4}, head_s={1: 4e-3, 16: 1.9e-2})
    assert main(["show", "--partitions", str(split), files[0], measured, "--batch", "16", "--kv-cache-mb", "1"]) == 0
    row = next(line for line in capsys.readouterr().out.split("\neven:")[0].splitlines() if "measured" in line)
    assert " 0.340 " in row and " 11.000 " in row, row


def test_show_refuses_what_it_cannot_read(split, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    assert main(["show", "--partitions", str(split), str(bad)]) == 2
    assert "write them with chatloop-plan probe" in capsys.readouterr().err
    assert main(["show", "--partitions", str(tmp_path / "none"), _figures(tmp_path, "a", 1.0)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_probe_writes_figures_show_reads(split, tmp_path):
    out = tmp_path / "here.json"
    assert main(["probe", "--partitions", str(split), "--name", "here", "--hop-ms", "0.5", "--output", str(out)]) == 0
    figures = HostFigures.from_dict(json.loads(out.read_text()))
    assert figures.name == "here" and figures.hop_s == 0.0005 and sorted(figures.decode_s) == [1, 4, 16]
    assert figures.held is not None and figures.held[0].end == 4
