"""ChatLoop on the GGUF files people download, against llama.cpp and transformers (issue 21, point 6).

    python -m benchmarks.gguf_accuracy --json accuracy.json               # SmolLM2 Q4_K_M Q5_K_M Q6_K Q8_0
    python -m benchmarks.gguf_accuracy --types Q8_0 --skip-perplexity cluster.num_workers=2

For each file (``benchmarks/gguf_files.py`` makes them with llama.cpp's converter and quantizer):

- perplexity: ``python -m benchmarks.perplexity --llamacpp --gguf FILE model.name=FILE model.quantization=gguf``
  (ChatLoop splits and runs the file itself; llama-perplexity runs the same file on the same text, in the same
  chunks), the relative difference of the two figures;
- prompt log-probabilities over HTTP: ChatLoop on the file behind its OpenAI server (``/v1/completions`` with the
  prompt as token ids, ``echo``, ``max_tokens`` 0, ``logprobs`` 1), against transformers loading the same file
  (``from_pretrained(folder, gguf_file=...)``: every tensor dequantized by gguf-py, float32); the largest absolute
  difference over every prompt token.

Any other argument is a ChatLoop config override for the HTTP part (default: 4 stages in this process). One JSON
line per file goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["http_prompt_logprobs", "serve", "transformers_prompt_logprobs"]

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def serve(llm) -> Iterator[str]:
    """ChatLoop's OpenAI server for a started ``llm``, with uvicorn on a loopback port in a thread; its base URL."""
    import uvicorn

    from chatloop.network import free_port
    from chatloop.serving import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(llm, llm.config), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def http_prompt_logprobs(url: str, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
    """Each prompt's tokens' log-probabilities after the first, as lm-evaluation-harness asks for them (one request a
    prompt, all at once)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

    def one(prompt: Sequence[int]) -> list[float]:
        body = {"model": model, "prompt": list(prompt), "max_tokens": 0, "echo": True, "logprobs": 1,
                "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=1800)
        if answer.status_code != 200:
            raise RuntimeError(f"/v1/completions answered {answer.status_code}: {answer.text[:2000]}")
        logprobs = answer.json()["choices"][0]["logprobs"]["token_logprobs"]
        if len(logprobs) != len(prompt) or logprobs[0] is not None:
            raise RuntimeError(f"{len(logprobs)} logprobs for a prompt of {len(prompt)} tokens")
        return logprobs[1:]

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(one, prompts))


def transformers_prompt_logprobs(gguf: Path, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
    """The same from transformers on the GGUF file, dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            logprobs = model(torch.tensor([list(ids)])).logits[0].float().log_softmax(-1)
            out.append(logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist())
    return out


def prompts_from(text: str, encode, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens, consecutive slices of ``text``'s tokens."""
    ids = encode(text)
    if len(ids) < count * length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {count} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def compare_logprobs(gguf: Path, overrides: Sequence[str], count: int, length: int, text: Path) -> dict:
    """ChatLoop over HTTP against transformers on ``gguf``: the largest absolute difference, and where."""
    from chatloop import ChatLoop, load_config

    cfg = load_config([f"model.name={gguf}", "model.quantization=gguf", "cluster=single", "cluster.num_workers=4",
                       "cache.kv_cache_mb=64", *overrides])
    with ChatLoop.start(cfg) as llm:
        prompts = prompts_from(text.read_text(), llm.encode, count, length)
        with serve(llm) as url:
            ours = http_prompt_logprobs(url, prompts)
    theirs = transformers_prompt_logprobs(gguf, prompts)
    diffs = [abs(a - b) for row_a, row_b in zip(ours, theirs) for a, b in zip(row_a, row_b)]
    nll = [-math.fsum(x for row in rows for x in row) / len(diffs) for rows in (ours, theirs)]
    return {"tokens_compared": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": math.fsum(diffs) / len(diffs),
            "chatloop_mean_nll": nll[0], "transformers_mean_nll": nll[1],
            "workers": cfg.cluster.num_workers, "in_process": cfg.cluster.in_process}


def run_perplexity(gguf: Path, window: int, text: Path | None) -> dict:
    from chatloop.network import free_port

    args = [sys.executable, "-m", "benchmarks.perplexity", "--llamacpp", "--gguf", str(gguf), "--window", str(window),
            *(["--text", str(text)] if text else []), f"model.name={gguf}", "model.quantization=gguf",
            "cluster=single", f"cluster.master_port={free_port()}"]
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.perplexity failed: {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["command"] = " ".join(["python", *args[1:-1]])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from .gguf_files import TYPES, gguf_file, tensor_types
    from .perplexity import DEFAULT_TEXT

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gguf_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    parser.add_argument("--window", type=int, default=512, help="llama-perplexity's chunk (-c)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--prompts", type=int, default=2, help="prompts scored over HTTP")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--skip-logprobs", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every file's result here")
    args, overrides = parser.parse_known_args(argv)
    results = []
    for kind in args.types:
        gguf = gguf_file(kind)
        result = {"type": kind, "file": gguf.name, "bytes": gguf.stat().st_size, "tensor_types": tensor_types(gguf),
                  "load_avg_1m_start": os.getloadavg()[0]}
        if not args.skip_perplexity:
            result["perplexity"] = run_perplexity(gguf, args.window, args.text)
        if not args.skip_logprobs:
            result["logprobs"] = compare_logprobs(gguf, overrides, args.prompts, args.prompt_tokens, args.text)
        result["load_avg_1m_end"] = os.getloadavg()[0]
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
