"""Speculative decoding: batch-1 greedy decode speed with a draft model (k = 2..8) and n-gram drafts, against none.

    flock /tmp/chatloop-bench.lock python -m benchmarks.speculation --rounds 2        # SmolLM2 fp32, 4 workers
    python -m benchmarks.speculation --ks 2,4 --tokens 64 --json out.json cluster=single

One engine is started with ``speculative=draft`` (SmolLM2 quantized to int4, beside the coordinator, unless
overridden); each request picks its mode with the per-request override (``speculative_tokens=0`` is none), so every
mode runs on the same engine. Each speculative run is paired with a run without speculation right before or after
it (in turn), and its speed-up is against that one: on a host shared with other work the load changes within
minutes, rarely within seconds. Rounds repeat the pairs in alternating order.

- draft: a chat prompt asking for a story; no speculation, then the draft model with k in ``--ks``.
- ngram: a prompt that asks to repeat a passage it quotes; no speculation, then n-gram drafts with k in
  ``--ngram-ks``.

Each run generates ``--tokens`` greedy tokens (end of sequence ignored). The figure is the decode rate: tokens after
the first over the time from the first to the last (prefill is the same in every mode). The acceptance rate is
accepted / drafted tokens; tokens per pass is how many tokens each pass through the pipeline yielded, (N - 1) / (N -
1 - accepted): the speed-up drafting and verification would give if they cost nothing, which the measured speed-up
is compared with. Greedy answers are checked equal to those without speculation. Other arguments are Hydra
overrides of ChatLoop's config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

__all__ = ["main"]

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper who saves a ship in a storm."}]
PASSAGE = ("The old lighthouse stood at the end of a long stone pier. Every night the keeper climbed its one hundred "
           "and twelve steps, lit the lamp, and watched the ships pass in the dark. One winter a storm broke the "
           "windows of the lantern room, and the keeper had to keep the flame alive with his own coat until the "
           "morning came and the fishing boats returned safely to the harbour.")
QUOTE = [{"role": "user", "content": f"Here is a passage:\n\n{PASSAGE}\n\nRepeat the passage word for word."}]


def run_one(llm, messages: list[dict], tokens: int, **speculation) -> dict:
    """One greedy request: its decode rate, time to first token, drafted and accepted tokens, token ids."""
    started = time.perf_counter()
    first = last = None
    ids: list[int] = []
    drafted = accepted = None
    for event in llm.stream_events(messages, chat=True, max_new_tokens=tokens, temperature=0.0, ignore_eos=True,
                                   **speculation):
        if event.token_ids:
            last = time.perf_counter()
            first = first or last
        ids.extend(event.token_ids)
        if event.finish_reason is not None:
            drafted, accepted = event.drafted_tokens, event.accepted_tokens
    decode = (len(ids) - 1) / (last - first)
    passes = len(ids) - 1 - (accepted or 0)
    return {"tokens": len(ids), "decode_tokens_per_s": decode, "ttft_s": first - started,
            "load_average": os.getloadavg()[0],  # (the last minute's, as the run ends)
            "drafted": drafted or 0, "accepted": accepted or 0,
            "acceptance": (accepted or 0) / drafted if drafted else None,
            "tokens_per_pass": (len(ids) - 1) / passes, "ids": ids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speculation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ks", default="2,4,6,8", help="the draft model's k values")
    parser.add_argument("--ngram-ks", default="4,8", help="n-gram k values (empty: no n-gram figure)")
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens per request")
    parser.add_argument("--json", help="also write every round here")
    ns, overrides = parser.parse_known_args(argv)
    if ns.rounds < 1:
        parser.error("--rounds must be at least 1")
    ks = [int(k) for k in ns.ks.split(",") if k]
    ngram_ks = [int(k) for k in ns.ngram_ks.split(",") if k]

    from chatloop import ChatLoop, load_config

    cfg = load_config(["cluster.num_workers=4", "speculative=draft", *overrides])
    started = time.perf_counter()
    with ChatLoop.start(cfg) as llm:
        startup = time.perf_counter() - started
        spec = cfg.speculative
        print(f"{cfg.model.name} {cfg.model.quantization or cfg.model.dtype}, {cfg.cluster.num_workers} workers"
              f"{' in process' if cfg.cluster.in_process else ''}; draft {spec.draft_model} "
              f"{spec.draft_quantization or cfg.model.dtype}; started in {startup:.1f} s; {ns.tokens} tokens a run",
              flush=True)
        modes = [("draft", f"k{k}", STORY, {"speculative_method": "draft", "speculative_tokens": k}) for k in ks]
        modes += [("ngram", f"k{k}", QUOTE, {"speculative_method": "ngram", "speculative_tokens": k})
                  for k in ngram_ks]
        run_one(llm, STORY, 8, speculative_tokens=0)  # warm-up: first-use costs out of the figures
        rounds = []
        for r in range(ns.rounds):
            entry: dict = {}
            for i, (kind, name, messages, options) in enumerate(modes if r % 2 == 0 else modes[::-1]):
                pair = [(False, {"speculative_tokens": 0}), (True, options)]
                results = {}
                for speculating, chosen in (pair if i % 2 == 0 else pair[::-1]):
                    results[speculating] = run_one(llm, messages, ns.tokens, **chosen)
                result, plain = results[True], results[False]
                if result["ids"] != plain["ids"]:
                    raise AssertionError(f"round {r + 1} {kind} {name}: the greedy answer differs from no speculation")
                result["off_decode_tokens_per_s"] = plain["decode_tokens_per_s"]
                result["off_load_average"] = plain["load_average"]
                result["speedup"] = result["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
                entry[f"{kind}_{name}"] = result
                print(f"round {r + 1} {kind} {name}: {result['decode_tokens_per_s']:.2f} tokens/s, without "
                      f"{plain['decode_tokens_per_s']:.2f}: {result['speedup']:.2f}x; {result['tokens_per_pass']:.2f}"
                      f" tokens a pass, acceptance {result['acceptance']:.2f}; load {plain['load_average']:.1f}, "
                      f"{result['load_average']:.1f}", flush=True)
            rounds.append(entry)
    summary: dict = {}
    for key in rounds[0]:
        runs = [e[key] for e in rounds]
        speedups = [r["speedup"] for r in runs]
        passes = statistics.median(r["tokens_per_pass"] for r in runs)
        summary[key] = {
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
            "off_decode_tokens_per_s": statistics.median(r["off_decode_tokens_per_s"] for r in runs),
            "speedup_median": statistics.median(speedups), "speedups": speedups,
            "acceptance": statistics.median(r["acceptance"] for r in runs),
            "tokens_per_pass": passes,
            "of_allowed": statistics.median(speedups) / passes,
        }
        s = summary[key]
        print(f"{key}: {s['decode_tokens_per_s']:.2f} tokens/s, {s['speedup_median']:.2f}x no speculation "
              f"({s['off_decode_tokens_per_s']:.2f}), acceptance {s['acceptance']:.2f}, {s['tokens_per_pass']:.2f} "
              f"tokens a pass: {s['of_allowed']:.2f} of what it allows")
    if ns.json:
        for entry in rounds:
            for result in entry.values():
                result.pop("ids")
        host = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
        with open(ns.json, "w") as f:
            json.dump({"command": "python -m benchmarks.speculation " + " ".join(argv or sys.argv[1:]),
                       "model": cfg.model.name, "dtype": cfg.model.dtype, "num_workers": cfg.cluster.num_workers,
                       "in_process": cfg.cluster.in_process, "draft_model": cfg.speculative.draft_model,
                       "draft_quantization": cfg.speculative.draft_quantization, "tokens": ns.tokens,
                       "startup_s": startup, "host": host, "summary": summary, "rounds": rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
