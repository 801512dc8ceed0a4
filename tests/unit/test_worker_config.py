"""configs/worker-config-N.yaml: written by the splitter, read by chatloop-worker, checked against the coordinator."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from chatloop.config import ChatLoopConfig
from chatloop.models.layer_range import LayerRange
from chatloop.partition.splitter import split_model
from chatloop.runtime import worker_host
from chatloop.runtime.worker import cli_main
from chatloop.stage import StageSpec
from chatloop.worker_config import WorkerFile, load_worker_file


@pytest.fixture
def split(tiny_checkpoint, tmp_path) -> Path:
    split_model(tiny_checkpoint("llama").path, tmp_path, 3, progress=False)
    return tmp_path


def test_the_splitter_writes_one_file_per_partition_in_the_reference_layout(split):
    files = sorted((split / "configs").glob("worker-config-*.yaml"))
    assert [f.name for f in files] == ["worker-config-0.yaml", "worker-config-1.yaml", "worker-config-2.yaml"]
    loaded = [load_worker_file(f) for f in files]
    assert [(w.start_layer, w.end_layer, w.partition) for w in loaded] == [
        (0, 1, "partition_0.safetensors"), (2, 3, "partition_1.safetensors"), (4, 4, "partition_2.safetensors")]
    assert [(w.port, w.metrics_port) for w in loaded] == [(50051, 9091), (50052, 9092), (50053, 9093)]
    assert loaded[0].previous_worker is None and loaded[0].next_worker.name == "worker-1"
    assert loaded[1].previous_worker.port == 50051 and loaded[1].next_worker.port == 50053
    assert loaded[2].next_worker is None
    assert all(Path(w.partitions_dir) == split for w in loaded)  # "..": relative to the file
    assert "chatloop-worker --config configs/worker-config-1.yaml" in files[1].read_text()


def test_the_file_says_what_the_worker_runs_with(split):
    own = load_worker_file(split / "configs" / "worker-config-2.yaml")
    cfg = ChatLoopConfig()
    WorkerFile(**{**own.__dict__, "worker_threads": 3, "kv_cache_mb": 64, "enable_simd": False}).apply(cfg)
    assert (cfg.cluster.num_workers, cfg.worker.worker_threads, cfg.cache.kv_cache_mb) == (3, 3, 64)
    assert cfg.worker.enable_simd is False
    assert cfg.worker.metrics_port + own.worker == own.metrics_port


def _edited(split: Path, tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((split / "configs" / "worker-config-1.yaml").read_text())
    raw.update(changes)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"worker": 5}, "worker: 5 is not in 0..2"),
    ({"port": 70000}, "port: 70000 is not a TCP port"),
    ({"start_layer": 4, "end_layer": 2}, "layers 4-2 are empty"),
    ({"kv_cache_mb": 0}, "kv_cache_mb > 0"),
    ({"layers": "2-3"}, "unknown field(s) layers"),
])
def test_a_bad_file_names_itself_and_the_field(split, tmp_path, changes, message):
    path = _edited(split, tmp_path, **changes)
    with pytest.raises(ValueError) as caught:
        load_worker_file(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read the worker config"):
        load_worker_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("worker: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_worker_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping of fields"):
        load_worker_file(tmp_path / "list.yaml")


def test_chatloop_worker_refuses_bad_arguments_at_once(split, capsys):
    config = str(split / "configs" / "worker-config-0.yaml")
    assert cli_main(["--config", config, "--coordinator", "no-port"]) == 2
    assert "give HOST:PORT" in capsys.readouterr().err
    assert cli_main(["--config", str(split / "nothing.yaml"), "--coordinator", "127.0.0.1:1"]) == 2
    assert "cannot read the worker config" in capsys.readouterr().err


def _spec(index: int, start: int, end: int, file: str) -> StageSpec:
    return StageSpec(name=f"worker{index}", index=index, directory="/elsewhere", kv_cache_mb=512,
                     expected_layers=LayerRange(start, end), expected_file=file)


def test_what_the_coordinator_asks_is_checked_against_the_file(split):
    own = load_worker_file(split / "configs" / "worker-config-1.yaml")
    spec = worker_host._as_configured(_spec(1, 2, 3, "partition_1.safetensors"), own)
    assert spec.directory == own.partitions_dir and spec.kv_cache_mb == own.kv_cache_mb  # this host's
    with pytest.raises(ValueError, match="is worker 1, the coordinator took it for worker 2"):
        worker_host._as_configured(_spec(2, 4, 4, "partition_2.safetensors"), own)
    with pytest.raises(ValueError, match="layers 2-3, the coordinator asks for 2-4"):
        worker_host._as_configured(_spec(1, 2, 4, "partition_1.safetensors"), own)
    with pytest.raises(ValueError, match="names partition partition_1.safetensors, the coordinator other"):
        worker_host._as_configured(_spec(1, 2, 3, "other.safetensors"), own)


def test_a_file_that_disagrees_with_its_partitions_is_refused_before_loading(split, tmp_path):
    own = load_worker_file(_edited(split, tmp_path, start_layer=3, partitions_dir=str(split)))
    with pytest.raises(ValueError, match=r"gives worker 1 layers 3-3, but partition_1.safetensors in .* holds "
                                         r"layers 2-3"):
        worker_host._as_configured(replace(_spec(1, 2, 3, "partition_1.safetensors"), expected_layers=None), own)
