"""Prefix caching: a long chat's time to first token, and the throughput of many chats at once, with and without.

    python -m benchmarks.prefix_cache --rounds 3                      # SmolLM2, 4 workers, 10 turns of ~200 tokens
    python -m benchmarks.prefix_cache --rounds 3 --chats 16 --turns 10
    python -m benchmarks.prefix_cache --rounds 1 --kinds batch --turns 5        # a shorter batch figure
    python -m benchmarks.prefix_cache --json out.json cluster.in_process=true cluster.num_workers=4

A chat: ``--turns`` turns, each a user message of about ``--user-tokens`` tokens of plain words (its own words for
each chat) and a greedy answer of ``--answer-tokens`` tokens (end of sequence ignored), every turn's prompt the
whole conversation so far through the model's chat template, as a chat client sends it.

One engine is started; the modes take turns on it, round after round, in alternating order, each starting from an
empty cache (``Scheduler.set_prefix_caching``): so both see the same machine within minutes.

- single: one chat alone; the time to the first token of every turn (the last turn's is the figure: target with
  caching <= 0.25x without).
- batch: ``--chats`` chats at once, each sending its next turn when its answer is complete; generated tokens per
  second over the whole run, and the median time to first token of the last turn.

Greedy answers are checked equal with and without. Any other argument is a Hydra override of ChatLoop's config.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time

__all__ = ["main"]

WORDS = [
    "the", "river", "city", "light", "morning", "stone", "garden", "road", "winter", "music", "window", "bread",
    "story", "market", "green", "old", "small", "house", "people", "village", "sea", "water", "mountain", "long",
    "quiet", "evening", "bright", "friend", "letter", "paper", "train", "station", "field", "summer", "fire",
    "north", "south", "bridge", "tower", "song", "book", "table", "chair", "door", "street", "cloud", "rain",
    "snow", "wind",
]


def user_message(chat: int, turn: int, tokens: int) -> str:
    """About ``tokens`` tokens of plain words, the same for a (chat, turn)."""
    rng = random.Random(chat * 1000 + turn)
    words = [rng.choice(WORDS) for _ in range(max(1, int(tokens * 0.9)))]
    return f"Turn {turn + 1}. Please remember these words and answer briefly: " + " ".join(words) + "."


def run_chat(llm, chat: int, turns: int, user_tokens: int, answer_tokens: int) -> dict:
    """One chat, turn after turn: each turn's time to first token, prompt length, cached tokens and answer ids."""
    history: list[dict] = []
    ttft, prompt_len, cached, answers, generated = [], [], [], [], 0
    for turn in range(turns):
        history.append({"role": "user", "content": user_message(chat, turn, user_tokens)})
        ids = llm.encode(history, chat=True)
        started = time.perf_counter()
        first, out, hit = None, [], 0
        for event in llm.stream_events(ids, max_new_tokens=answer_tokens, temperature=0.0, ignore_eos=True):
            if event.token_ids and first is None:
                first = time.perf_counter() - started
            out.extend(event.token_ids)
            if event.cached_tokens is not None:
                hit = event.cached_tokens
        ttft.append(first)
        prompt_len.append(len(ids))
        cached.append(hit)
        answers.append(out)
        generated += len(out)
        history.append({"role": "assistant", "content": llm.tokenizer.decode(out, skip_special_tokens=True)})
    return {"ttft_s": ttft, "prompt_tokens": prompt_len, "cached_tokens": cached, "answers": answers,
            "generated": generated}


def run_mode(llm, on: bool, chats: int, ns) -> dict:
    """``chats`` chats at once (one: the single figure) with caching on or off, from an empty cache."""
    assert llm.scheduler.set_prefix_caching(on) is on
    before = llm.stats()
    results: list = [None] * chats
    started = time.perf_counter()

    def one(c: int) -> None:
        results[c] = run_chat(llm, c, ns.turns, ns.user_tokens, ns.answer_tokens)

    threads = [threading.Thread(target=one, args=(c,)) for c in range(chats)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    after = llm.stats()
    generated = sum(r["generated"] for r in results)
    return {
        "prefix_caching": on, "chats": chats, "elapsed_s": elapsed, "generated_tokens": generated,
        "tokens_per_s": generated / elapsed,
        "prompt_tokens": sum(sum(r["prompt_tokens"]) for r in results),
        "cached_tokens": sum(sum(r["cached_tokens"]) for r in results),
        "hit_rate": ((after.prefix_cache_hits - before.prefix_cache_hits)
                     / max(1, after.prefix_cache_queries - before.prefix_cache_queries)),
        "last_turn_ttft_s": statistics.median(r["ttft_s"][-1] for r in results),
        "last_turn_prompt_tokens": results[0]["prompt_tokens"][-1],
        "ttft_s": results[0]["ttft_s"] if chats == 1 else None,
        "answers": [r["answers"] for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--user-tokens", type=int, default=150)
    parser.add_argument("--answer-tokens", type=int, default=50)
    parser.add_argument("--chats", type=int, default=16, help="chats at once in the batch figure")
    parser.add_argument("--kinds", default="single,batch", help="the figures to measure: single, batch or both")
    parser.add_argument("--json", help="also write every round here")
    ns, overrides = parser.parse_known_args(argv)
    if ns.rounds < 1:
        parser.error("--rounds must be at least 1")

    from chatloop import ChatLoop, load_config

    cfg = load_config(["cluster.num_workers=4", *overrides])
    started = time.perf_counter()
    with ChatLoop.start(cfg) as llm:
        startup = time.perf_counter() - started
        print(f"{cfg.model.name}, {cfg.cluster.num_workers} workers{' in process' if cfg.cluster.in_process else ''}"
              f", started in {startup:.1f} s; {ns.turns} turns of ~{ns.user_tokens} + {ns.answer_tokens} tokens",
              flush=True)
        rounds = []
        for r in range(ns.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            entry: dict = {}
            for kind, chats in (("single", 1), ("batch", ns.chats)):
                if kind not in ns.kinds.split(","):
                    continue
                for on in order:
                    result = run_mode(llm, on, chats, ns)
                    entry[f"{kind}_{'on' if on else 'off'}"] = result
                    print(f"round {r + 1} {kind} caching {'on ' if on else 'off'}: last turn "
                          f"({result['last_turn_prompt_tokens']} prompt tokens) first token "
                          f"{result['last_turn_ttft_s']:.3f} s; {result['tokens_per_s']:.1f} tokens/s over "
                          f"{result['elapsed_s']:.1f} s; hit rate {result['hit_rate']:.2f}", flush=True)
                if entry[f"{kind}_on"]["answers"] != entry[f"{kind}_off"]["answers"]:
                    raise AssertionError(f"round {r + 1} {kind}: the answers differ with and without caching")
            rounds.append(entry)
    summary: dict = {}
    for kind in ("single", "batch"):
        if f"{kind}_on" not in rounds[0]:
            continue
        ttft = [e[f"{kind}_on"]["last_turn_ttft_s"] / e[f"{kind}_off"]["last_turn_ttft_s"] for e in rounds]
        tput = [e[f"{kind}_on"]["tokens_per_s"] / e[f"{kind}_off"]["tokens_per_s"] for e in rounds]
        summary[kind] = {
            "last_turn_ttft_on_s": statistics.median(e[f"{kind}_on"]["last_turn_ttft_s"] for e in rounds),
            "last_turn_ttft_off_s": statistics.median(e[f"{kind}_off"]["last_turn_ttft_s"] for e in rounds),
            "ttft_ratio_median": statistics.median(ttft), "ttft_ratios": ttft,
            "tokens_per_s_on": statistics.median(e[f"{kind}_on"]["tokens_per_s"] for e in rounds),
            "tokens_per_s_off": statistics.median(e[f"{kind}_off"]["tokens_per_s"] for e in rounds),
            "throughput_ratio_median": statistics.median(tput), "throughput_ratios": tput,
            "hit_rate": statistics.median(e[f"{kind}_on"]["hit_rate"] for e in rounds),
        }
        s = summary[kind]
        print(f"{kind}: last turn first token {s['last_turn_ttft_on_s']:.3f} s with caching, "
              f"{s['last_turn_ttft_off_s']:.3f} s without: {s['ttft_ratio_median']:.3f}x (median of rounds); "
              f"{s['tokens_per_s_on']:.1f} vs {s['tokens_per_s_off']:.1f} tokens/s: "
              f"{s['throughput_ratio_median']:.2f}x; hit rate {s['hit_rate']:.2f}")
    if ns.json:
        for entry in rounds:
            for result in entry.values():
                result.pop("answers")
        host = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
        with open(ns.json, "w") as f:
            json.dump({"command": "python -m benchmarks.prefix_cache " + " ".join(argv or sys.argv[1:]),
                       "model": cfg.model.name, "num_workers": cfg.cluster.num_workers,
                       "in_process": cfg.cluster.in_process, "turns": ns.turns, "user_tokens": ns.user_tokens,
                       "answer_tokens": ns.answer_tokens, "chats": ns.chats, "startup_s": startup, "host": host,
                       "summary": summary, "rounds": rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
