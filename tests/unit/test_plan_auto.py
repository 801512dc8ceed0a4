"""``cluster.plan=auto`` (issue 24, point 4): the configuration, and the in-process cluster planned from a probe."""

from __future__ import annotations

import json

import pytest

from chatloop import ChatLoop, load_config
from chatloop.models import LayerRange


def test_plan_is_checked():
    assert load_config(["cluster=single", "cluster.plan=auto"]).cluster.plan == "auto"
    with pytest.raises(ValueError, match="choose even or auto"):
        load_config(["cluster.plan=fast"])
    with pytest.raises(ValueError, match="plan=auto plans the layers itself"):
        load_config(["cluster=reference", "cluster.plan=auto", "cluster.figures=[a,b,c,d]"])
    assert load_config(["cluster=local4", "cluster.plan=auto"]).cluster.figures == []  # the workers probe at join
    with pytest.raises(ValueError, match="cluster.figures lists 1 files: give one per worker"):
        load_config(["cluster=local4", "cluster.plan=auto", "cluster.figures=[a]"])


@pytest.fixture(scope="module")
def split16(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chatloop.partition.splitter import split_model

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=16,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    source = tmp_path_factory.mktemp("auto-16")
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    out = tmp_path_factory.mktemp("auto-16-split")
    split_model(str(source), out, 4, progress=False)
    return out


def _figures_files(folder, layer_ms) -> list[str]:
    """A figures file per host whose layer takes ``layer_ms[k]`` at batch 1 (twice that at 16), 1 GiB free."""
    from chatloop.partition.placement import HostFigures

    files = []
    for k, ms in enumerate(layer_ms):
        path = folder / f"w{k}.json"
        path.write_text(json.dumps(HostFigures(name=f"host{k}", decode_s={1: ms / 1e3, 16: 2 * ms / 1e3},
                                               memory_bytes=2**30).as_dict()))
        files.append(str(path))
    return files


def test_workers_figures_plan_the_stages_specs(split16, tmp_path):
    from chatloop.partition import PlanError
    from chatloop.stage import stage_specs

    files = _figures_files(tmp_path, (1.0, 1.0, 3.0, 1.0))  # worker 2 three times slower
    cfg = load_config(["cluster=local4", "cluster.plan=auto", f"cluster.figures=[{','.join(files)}]",
                       f"model.partitions_dir={split16}", "cache.kv_cache_mb=4"])
    specs = stage_specs(cfg, split16)
    sizes = [len(s.expected_layers) for s in specs]
    assert sum(sizes) == 16 and sizes[2] < min(sizes[0], sizes[1], sizes[3])
    assert all(s.expected_file is None for s in specs)
    assert specs[2].kv_cache_mb < specs[0].kv_cache_mb  # its pool shrinks with its layers
    even = stage_specs(load_config(["cluster=local4", f"model.partitions_dir={split16}"]), split16)
    assert [s.expected_layers for s in even] == [None] * 4
    cfg.cluster.figures[1] = str(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="cannot read .*missing.json.*chatloop-plan probe --output"):
        stage_specs(cfg, split16)


def test_a_worker_that_only_slows_the_pipeline_keeps_a_layer_with_a_warning_saying_why(split16, tmp_path, caplog):
    from chatloop.stage import stage_specs

    files = _figures_files(tmp_path, (1.0, 1.0, 1.0, 100.0))  # worker 3: one layer takes it longer than 16 elsewhere
    cfg = load_config(["cluster=local4", "cluster.plan=auto", f"cluster.figures=[{','.join(files)}]",
                       f"model.partitions_dir={split16}", "cache.kv_cache_mb=4"])
    with caplog.at_level("WARNING", logger="chatloop.stage.planning"):
        specs = stage_specs(cfg, split16)
    assert len(specs[3].expected_layers) == 1  # it joined: it keeps one
    warned = [r.getMessage() for r in caplog.records if "would be left out" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("plan auto: worker3 would be left out (one layer takes it")
    assert "Start the cluster without it" in warned[0]


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


def test_auto_needs_no_split_per_worker_count(split16):
    from chatloop.api import prepare_partitions
    from chatloop.partition import ManifestError

    overrides = ["cluster=local4", "cluster.num_workers=3", f"model.partitions_dir={split16}", "cache.kv_cache_mb=4",
                 "cache.min_capacity_tokens=16"]
    with pytest.raises(ManifestError, match="holds 4 partitions but cluster.num_workers=3"):
        prepare_partitions(load_config(overrides))
    assert prepare_partitions(load_config([*overrides, "cluster.plan=auto"])).num_partitions == 4


def test_a_new_generation_keeps_ranges_nearly_as_fast(split16):
    from chatloop.partition import Manifest
    from chatloop.partition.placement import HostFigures
    from chatloop.stage import stage_specs
    from chatloop.stage.planning import plan_specs

    cfg = load_config(["cluster=local4", "cluster.num_workers=2", "cluster.plan=auto",
                       f"model.partitions_dir={split16}", "cache.kv_cache_mb=4"])
    specs, manifest = stage_specs(cfg, split16), Manifest.load(split16)

    def plan(slow_ms, current=()):
        found = [HostFigures(name=f"h{k}", decode_s={1: t / 1e3, 16: 16 * t / 1e3}, memory_bytes=2**30)
                 for k, t in enumerate((1.0, slow_ms))]
        return [s.expected_layers for s in plan_specs(cfg, specs, found, manifest, current)[0]]

    first = plan(1.5)
    assert first == [LayerRange(0, 9), LayerRange(10, 15)]
    again = plan(1.32)  # probed again: the second host seems faster
    assert again == [LayerRange(0, 8), LayerRange(9, 15)]  # alone, a layer would move (and both stages reload)
    assert plan(1.32, first) == first  # the first plan is predicted within 10%: kept
    assert plan(1.32, [LayerRange(0, 3), LayerRange(4, 15)]) == again  # too slow: replaced
    assert plan(1.32, [first[0], None]) == first  # a replacement holds nothing: the gap is its own
    assert plan(1.32, [None, None]) == again
