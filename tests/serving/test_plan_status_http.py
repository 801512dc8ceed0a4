"""GET /v1/status and chatloop-status show the plan (issue 24, point 4): under cluster.plan=auto each host's probe
figures, its layers, the predicted tokens/s, and after a run the measured ones; an even split says it predicts
nothing. A tiny Llama over two in-process stages, served over real HTTP."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from chatloop import ChatLoop, load_config
from chatloop.serving import create_app
from chatloop.serving.status import main as status_main
from tests.conftest import save_tiny_tokenizer
from tests.serving.serving_helpers import serve_in_thread

PROMPT = "the plan of the layers"
TOKENS = 32


@pytest.fixture(scope="module")
def root(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-status")
    shutil.copytree(tiny_checkpoint("llama").path, root / "model")
    save_tiny_tokenizer(root / "model")
    return root


def _config(root, *more: str):
    return load_config(["cluster=single", "cluster.num_workers=2", f"model.name={root / 'model'}",
                        f"model.partitions_dir={root / 'parts'}", "cache.kv_cache_mb=1",
                        "cache.min_capacity_tokens=64", "batching.max_batch_size=4", *more])


def test_status_shows_the_auto_plan_then_the_measured_speed_beside_it(root, capsys):
    with ChatLoop.start(_config(root, "cluster.plan=auto")) as llm, \
            serve_in_thread(create_app(llm, llm.config)) as url:
        plan = httpx.get(url + "/v1/status", timeout=30).json()["plan"]
        assert plan["plan"] == "auto" and plan["batch"] == 4
        assert plan["measured"]["tokens_per_s"] is None  # nothing run yet
        layers = [s["layers"] for s in plan["stages"]]
        assert layers == [str(r.stage.layers_range) for r in llm.pipeline.runners]  # what the stages loaded
        for stage in plan["stages"]:
            assert stage["threads"] >= 1 and stage["memory_bytes"] > 0 and stage["layer_ms"]["1"] > 0
            assert stage["step_ms"] > 0 and stage["step_ms_1"] > 0
        assert plan["predicted"]["tokens_per_s"] > plan["predicted"]["tokens_per_s_1"] > 0

        start = time.perf_counter()
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": httpx.get(url + "/v1/models").json()["data"][0]["id"], "prompt": PROMPT, "max_tokens": TOKENS,
            "ignore_eos": True, "temperature": 0})
        elapsed = time.perf_counter() - start
        assert r.status_code == 200, r.text
        measured = httpx.get(url + "/v1/status", timeout=30).json()["plan"]["measured"]
        # one sequence alone: its steps' pace, at least the request's average (which adds its prefill and HTTP)
        assert 0.7 * TOKENS / elapsed <= measured["tokens_per_s_1"] <= 100 * TOKENS / elapsed
        assert measured["sequences"] == 1 and measured["tokens_per_s"] > 0

        assert status_main(["--url", url]) == 0
        out = capsys.readouterr().out
        assert "plan auto: batch 4" in out and "predicted" in out and "measured" in out
        assert all(f" {layer} " in out for layer in layers)


def test_status_says_an_even_split_has_no_prediction(root, capsys):
    with ChatLoop.start(_config(root)) as llm, serve_in_thread(create_app(llm, llm.config)) as url:
        llm.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
        plan = httpx.get(url + "/v1/status", timeout=30).json()["plan"]
        assert plan["plan"] == "even" and "stages" not in plan and "cluster.plan=auto" in plan["note"]
        assert plan["measured"]["tokens_per_s_1"] > 0
        assert status_main(["--url", url]) == 0
        assert "plan even: the layers are split evenly" in capsys.readouterr().out
