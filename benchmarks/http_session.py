"""ChatLoop behind its OpenAI server as a contender (``benchmark.mode=http``), driven as ``llama-server`` is.

The server (``ChatLoop.start`` as configured, RPC workers and all, then ``create_app`` under uvicorn) runs in a
process of its own, as ``chatloop-serve`` would; the measuring process is only its client, as it is
``llama-server``'s (``benchmarks/llamacpp.py``). Every request streams ``/v1/completions`` (prompt as token ids,
greedy, ``ignore_eos``, ``stream_options.include_usage``): a chunk with text is a token's arrival; tokens whose
text was held back (not yet whole UTF-8: no chunk of their own) count as arriving with the last one (the usage
chunk says how many), as ``llama-server``'s held-back tokens do.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time

__all__ = ["ChatLoopHttpSession"]


def _server_main(spec: dict, port: int, conn) -> None:
    """The server's process: ChatLoop as configured behind its OpenAI API on ``port``, until SIGTERM."""
    logging.basicConfig(level=logging.WARNING)
    try:
        import uvicorn

        from chatloop import ChatLoop
        from chatloop.api import prepare_partitions
        from chatloop.serving import create_app

        from .measure import in_temporary_thread
        from .run_one import typed_spec

        cfg, _ = typed_spec(spec)
        in_temporary_thread(prepare_partitions, cfg)
        llm = ChatLoop.start(cfg)
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})
        return
    conn.send({"vocab_size": llm.vocab_size})
    try:
        uvicorn.run(create_app(llm, cfg, on_shutdown=llm.shutdown), host="127.0.0.1", port=port,
                    log_level="warning", timeout_graceful_shutdown=5)
    finally:
        llm.shutdown()


class ChatLoopHttpSession:
    """ChatLoop's OpenAI server started and warmed up for a load; ``measure()`` offers it once."""

    def __init__(self, cfg, bench, spec: dict) -> None:
        from chatloop.network import free_port

        from .measure import make_prompts

        self.slots, self.new_tokens, self.timeout_s = cfg.batching.max_batch_size, bench.new_tokens, bench.timeout_s
        self.port = free_port()
        self._conn, child = multiprocessing.Pipe()
        started = time.perf_counter()
        # Not a daemon: ChatLoop starts its workers from it.
        self.process = multiprocessing.get_context("spawn").Process(
            target=_server_main, args=(spec, self.port, child), name="paired-http-server")
        self.process.start()
        try:
            if not self._conn.poll(bench.timeout_s):
                raise TimeoutError(f"the ChatLoop server did not start in {bench.timeout_s:.0f} s")
            answer = self._conn.recv()
            if "error" in answer:
                raise RuntimeError(f"the ChatLoop server failed to start: {answer['error']}")
            self._wait_ready(bench.timeout_s)
            self.startup_s = time.perf_counter() - started
            self.prompts = make_prompts(bench.num_requests, bench.prompt_tokens, answer["vocab_size"], bench.seed)
            if bench.warmup_new_tokens:
                self._drive(self.prompts[: self.slots], bench.warmup_new_tokens)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.is_alive():
                raise RuntimeError(f"the ChatLoop server exited with {self.process.exitcode}")
            try:
                answer = httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2)
                if answer.status_code == 200:
                    self.model = answer.json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the ChatLoop server did not answer in {timeout:.0f} s")

    def _drive(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[float]]]:
        import httpx

        from .measure import stream_all

        async def one(client: httpx.AsyncClient, prompt: list[int], arrivals: list[float]) -> float:
            body = {"model": self.model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            sent = time.perf_counter()
            async with client.stream("POST", f"http://127.0.0.1:{self.port}/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    now = time.perf_counter()
                    if "error" in event:
                        raise RuntimeError(f"the ChatLoop server failed a request: {event['error']}")
                    if event.get("usage"):
                        arrivals.extend([arrivals[-1] if arrivals else now]
                                        * (event["usage"]["completion_tokens"] - len(arrivals)))
                        continue
                    if event["choices"] and event["choices"][0].get("text"):
                        arrivals.append(now)
            return sent

        return stream_all(prompts, self.timeout_s, one)

    def measure(self) -> dict:
        from .measure import streamed_metrics

        t0 = time.perf_counter()
        sent, arrivals = self._drive(self.prompts, self.new_tokens)
        return streamed_metrics("the ChatLoop server", t0, sent, arrivals, self.new_tokens, self.slots)

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: uvicorn stops, then ChatLoop shuts its workers down
            self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
