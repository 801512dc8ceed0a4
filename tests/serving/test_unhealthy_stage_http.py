"""A stage whose outputs turn NaN reports itself down: the request gets a 503 naming it, /health and /v1/status
show it down with the reason, chatloop-status exits 1, and new requests are refused at once (in process, no RPC;
over RPC, self-healing replaces the worker: tests/distributed/test_unhealthy_stage.py)."""

from __future__ import annotations

import httpx
from serving_helpers import serve_in_thread, wait_until

from chatloop import ChatLoop, load_config
from chatloop.serving import create_app
from chatloop.serving.status import main as status_main
from chatloop.stage.fault_injection import NON_FINITE

REASON = "unhealthy: its hidden states hold NaN or infinity for its one sequence of micro-batch"


def test_a_stage_gone_non_finite_is_down_with_the_reason(smollm2_split, capsys):
    overrides = ["cluster=single", "cluster.num_workers=4", f"model.partitions_dir={smollm2_split}",
                 "cache.kv_cache_mb=32"]
    with ChatLoop.start(load_config(overrides)) as llm, serve_in_thread(create_app(llm, llm.config)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.get("/health").status_code == 200

        llm.pipeline.inject_failure(2, NON_FINITE)  # its next outputs are NaN, as damaged weights would make them
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert message.startswith("the pipeline failed at stage2: stage2 is unhealthy: its hidden states hold NaN")

        health = wait_until(lambda: (r := client.get("/health")).status_code == 503 and r.json(), timeout=30,
                            message="/health saying 503")
        assert health["down"] == ["stage2"]
        stage2 = next(s for s in health["stages"] if s["name"] == "stage2")
        assert stage2["error"].startswith(REASON) and "its weights may be damaged" in stage2["error"]

        status = client.get("/v1/status").json()
        node = next(n for n in status["nodes"] if n["name"] == "stage2")
        assert not status["healthy"] and node["state"] == "down" and node["error"].startswith(REASON)
        assert status_main(["--url", url]) == 1
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("stage2"))
        assert "DOWN: unhealthy: its hidden states hold NaN" in row

        r = client.post("/v1/completions", json=body)  # refused at once while the stage is known to be down
        assert r.status_code == 503 and "stage2" in r.json()["error"]["message"], r.text
