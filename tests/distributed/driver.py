"""Runs one ChatLoop cluster in its own process and a script of requests against it.

torch.distributed.rpc starts once per process, so every cluster a test needs gets a fresh
coordinator process: ``python driver.py SPEC_JSON`` runs the named ops in order and prints one
JSON line ``{name: result}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

BACKGROUND: dict = {}
PIDS: dict[int, int] = {}
STREAMED = [0]  # tokens received by every "streams" op so far: faults are timed by progress, not by the clock
STREAMED_LOCK = threading.Lock()


def run_op(llm, op: dict):
    kind = op["op"]
    if kind == "generate":
        try:
            c = llm.generate(op["prompt"], chat=op.get("chat", False), **op.get("params", {}))
            return {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                    "cached_tokens": c.cached_tokens, "drafted_tokens": c.drafted_tokens,
                    "accepted_tokens": c.accepted_tokens}
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}
    if kind == "concurrent":
        with ThreadPoolExecutor(len(op["requests"])) as pool:
            return list(pool.map(lambda r: run_op(llm, {"op": "generate", **r}), op["requests"]))
    if kind == "cancel_after":
        stream = llm.stream_events(op["prompt"], **op.get("params", {}))
        got = [next(stream) for _ in range(op["tokens"])]
        stream.close()  # abandoning the stream cancels the request
        return {"received": sum(len(e.token_ids) for e in got)}
    if kind == "blocks":
        # Wait for the scheduler to settle (a cancelled sequence frees at its next step).
        done = threading.Event()
        for _ in range(100):
            stats = llm.stats()
            if stats.kv_blocks_used == 0 and stats.kv_window_blocks_used == 0:
                break
            done.wait(0.05)
        stats = llm.stats()
        return {"free": stats.kv_blocks_free, "total": stats.kv_blocks_total,
                "window_free": stats.kv_window_blocks_free, "window_total": stats.kv_window_blocks_total}
    if kind == "inject":
        llm.pipeline.inject_failure(op["stage"], op.get("message", "injected"), stall_s=op.get("stall_s", 0.0))
        return {}
    if kind == "overwrite":  # bytes of a file, its times restored afterwards (as `touch -r` would)
        before = os.stat(op["path"])
        with open(op["path"], "r+b") as f:
            f.seek(op["offset"])
            f.write(bytes.fromhex(op["hex"]) * op.get("repeat", 1))
        os.utime(op["path"], ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(op["path"])
        return {"unchanged": [getattr(before, k) == getattr(after, k)
                              for k in ("st_size", "st_mtime_ns", "st_ino", "st_dev")]}
    if kind == "start":  # an op in the background: "join" waits for it
        pool = ThreadPoolExecutor(1)
        started = time.monotonic()
        BACKGROUND[op["id"]] = (pool.submit(run_op, llm, op["inner"]), started)
        return {}
    if kind == "join":
        future, started = BACKGROUND.pop(op["id"])
        return {"result": future.result(), "elapsed_s": time.monotonic() - started}
    if kind == "sleep":
        time.sleep(op["seconds"])
        return {}
    if kind == "wait_tokens":  # until the streams so far have received this many tokens
        deadline = time.monotonic() + op.get("timeout", 120)
        while STREAMED[0] < op["tokens"] and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"streamed": STREAMED[0]}
    if kind == "signal":  # to stage k's worker process (its pid looked up once: a stopped stage does not answer)
        pid = PIDS.setdefault(op["stage"], llm.describe_stages(10.0)[op["stage"]].pid)
        try:
            os.kill(pid, getattr(signal, op["signal"]))
        except ProcessLookupError:
            return {"pid": pid, "at": time.monotonic(), "gone": True}
        return {"pid": pid, "at": time.monotonic()}
    if kind == "streams":  # requests at once, each token's arrival time kept
        def one(request: dict) -> dict:
            times, ids, reason, error, logprobs, prompt_logprobs = [], [], None, None, [], None
            try:
                for event in llm.stream_events(request["prompt"], **request.get("params", {})):
                    times.extend([time.monotonic()] * len(event.token_ids))
                    with STREAMED_LOCK:
                        STREAMED[0] += len(event.token_ids)
                    ids.extend(event.token_ids)
                    logprobs.extend(s.logprob for s in event.logprobs)
                    if event.prompt_logprobs is not None:
                        prompt_logprobs = [s.logprob for s in event.prompt_logprobs]
                    reason = event.finish_reason
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            return {"token_ids": ids, "times": times, "finish_reason": reason, "error": error, "logprobs": logprobs,
                    "prompt_logprobs": prompt_logprobs}

        with ThreadPoolExecutor(len(op["requests"])) as pool:
            return list(pool.map(one, op["requests"]))
    if kind == "stats":
        stats = llm.stats()
        return {"replays": stats.replays, "recovery_seconds": stats.recovery_seconds, "state": stats.cluster_state,
                "restarts": stats.worker_restarts, "prefix_queries": stats.prefix_cache_queries,
                "prefix_hits": stats.prefix_cache_hits}
    if kind == "wait_state":
        deadline = time.monotonic() + op.get("timeout", 120)
        while llm.stats().cluster_state != op["state"] and time.monotonic() < deadline:
            time.sleep(0.2)
        return {"state": llm.stats().cluster_state}
    if kind == "timed_generate":
        started = time.monotonic()
        return {"result": run_op(llm, {**op, "op": "generate"}), "elapsed_s": time.monotonic() - started}
    if kind == "describe":
        return [report.as_dict() for report in llm.describe_stages(10.0)]
    if kind == "plan":  # what GET /v1/status shows of the plan
        return llm.plan_report()
    raise ValueError(f"unknown op {kind}")


def main() -> int:
    from chatloop import ChatLoop, load_config

    spec = json.loads(sys.argv[1])
    llm = ChatLoop.start(load_config(spec["overrides"]))
    try:
        results = {op["name"]: run_op(llm, op) for op in spec["ops"]}
    finally:
        llm.shutdown()
    print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
