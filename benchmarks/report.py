"""Turn sweep results into a Markdown report with plots.

    python -m benchmarks.report multirun/2026-11-26/12-00-00/results.jsonl --out report/
    python -m benchmarks.report a.jsonl b.jsonl --out report/ --max-timelines 4

Writes ``report.md`` (one table per model and load: tokens/s, ratios to the transformers and
one-process baselines, time to first token, inter-token latency, busy fraction and RSS per
stage; the batch-1 memory-bandwidth roofline; errors), ``throughput_vs_workers.png``,
``throughput_vs_batch.png`` and ``timeline_job*.png`` (which stage works on which micro-batch
over time, from the stages' own timestamps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .results import read_rows

__all__ = ["write_report", "main"]

MIB = 2**20


# ---- grouping ----------------------------------------------------------------------------------
def _setting(row: dict) -> tuple:
    """Rows comparable with each other: same model, dtype and load."""
    return (
        row.get("model"),
        row.get("dtype"),
        row.get("num_requests"),
        row.get("prompt_tokens"),
        row.get("new_tokens"),
    )


def _setting_title(setting: tuple) -> str:
    model, dtype, requests, prompt, new = setting
    return f"{model} {dtype}: {requests} requests x {prompt} prompt tokens -> {new} new tokens"


def _variant(row: dict) -> tuple:
    """What distinguishes rows within a setting; repeated runs of one variant are combined."""
    return (row.get("mode"), row.get("num_workers"), bool(row.get("in_process")), row.get("max_batch_size"))


def _combine(rows: list[dict]) -> dict:
    """One row per variant: the run with the median throughput, with how many runs there were."""
    ordered = sorted(rows, key=lambda r: r["tokens_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["num_runs"] = len(rows)
    return chosen


def _label(row: dict) -> str:
    if row["mode"] == "hf":
        return "transformers"
    if row["mode"] == "inprocess":
        return "ChatLoop 1 process"
    n = row["num_workers"]
    if row.get("in_process"):
        return f"ChatLoop {n} stage{'s' if n != 1 else ''}, 1 process"
    return f"ChatLoop {n} worker{'s' if n != 1 else ''}"


def _fmt(value, digits: int = 1, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}"


def _pct(values: list) -> str:
    return " / ".join(f"{v * 100:.0f}" if v is not None else "-" for v in values) or "-"


# ---- derived numbers -----------------------------------------------------------------------------
def transport_overhead_ms(row: dict) -> float | None:
    """Median over decode micro-batches of (coordinator round trip - time inside the stages), ms.

    For RPC this is the hops, the (de)serialisation and any queueing in front of a busy stage.
    """
    timeline = row.get("timeline") or {}
    coordinator = timeline.get("coordinator") or []
    stages = timeline.get("stages") or {}
    compute: dict[int, float] = defaultdict(float)
    for rows in stages.values():
        for mb, start, end in rows:
            compute[mb] += end - start
    gaps = [(done - sent) - compute[mb] for mb, _, tokens, sent, done in coordinator if tokens == 1 and mb in compute]
    return statistics.median(gaps) * 1e3 if gaps else None


def _ratio(row: dict, baseline: dict | None, key: str) -> float | None:
    """row[key] / baseline[key], None where either is missing (older results have no decode rate)."""
    return row[key] / baseline[key] if baseline and row.get(key) and baseline.get(key) else None


def _baseline(rows: list[dict], mode: str, batch) -> dict | None:
    found = [r for r in rows if r["mode"] == mode and r.get("max_batch_size") == batch]
    return found[0] if found else None


# ---- plots ----------------------------------------------------------------------------------------
def _throughput_plots(groups: dict[tuple, list[dict]], out: Path) -> list[str]:
    written = []
    settings = sorted(groups, key=str)
    if not settings:
        return written
    for name, xkey, xlabel in (
        ("throughput_vs_workers.png", "num_workers", "workers (pipeline stages)"),
        ("throughput_vs_batch.png", "max_batch_size", "max batch size"),
    ):
        fig, axes = plt.subplots(len(settings), 1, figsize=(8, 4.2 * len(settings)), squeeze=False)
        for ax, setting in zip(axes[:, 0], settings):
            rows = groups[setting]
            chatloop = [r for r in rows if r["mode"] == "chatloop" and not r.get("in_process")]
            cmap = plt.get_cmap("tab10")
            if xkey == "num_workers":
                batches = sorted({r["max_batch_size"] for r in rows})
                for i, batch in enumerate(batches):
                    pts = sorted(
                        (r["num_workers"], r["tokens_per_s"]) for r in chatloop if r["max_batch_size"] == batch
                    )
                    if pts:
                        ax.plot(*zip(*pts), "o-", color=cmap(i), label=f"ChatLoop, batch {batch}")
                    for mode, style in (("hf", "--"), ("inprocess", ":")):
                        base = _baseline(rows, mode, batch)
                        if base:
                            ax.axhline(
                                base["tokens_per_s"],
                                color=cmap(i),
                                linestyle=style,
                                label=f"{_label(base)}, batch {batch}",
                            )
                ax.set_xticks(sorted({r["num_workers"] for r in chatloop}) or [1])
            else:
                workers = sorted({r["num_workers"] for r in chatloop})
                lines = [
                    (
                        f"ChatLoop {w} worker{'s' if w != 1 else ''}",
                        "o-",
                        [r for r in chatloop if r["num_workers"] == w],
                    )
                    for w in workers
                ]
                lines += [
                    ("ChatLoop 1 process", "s:", [r for r in rows if r["mode"] == "inprocess"]),
                    ("transformers", "^--", [r for r in rows if r["mode"] == "hf"]),
                ]
                for i, (label, style, subset) in enumerate(lines):
                    pts = sorted((r["max_batch_size"], r["tokens_per_s"]) for r in subset)
                    if pts:
                        ax.plot(*zip(*pts), style, color=cmap(i), label=label)
                batches = sorted({r["max_batch_size"] for r in rows})
                if len(batches) > 1 and min(batches) > 0:
                    ax.set_xscale("log", base=2)
                ax.set_xticks(batches)
                ax.set_xticklabels([str(b) for b in batches])
            ax.set_title(_setting_title(setting), fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("tokens/s (all requests)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _window(row: dict, duration: float) -> tuple[float, float]:
    """A steady-state stretch in the middle of the run, a few decode round trips long."""
    coordinator = (row.get("timeline") or {}).get("coordinator") or []
    decode = [done - sent for _, _, tokens, sent, done in coordinator if tokens == 1]
    span = 4 * statistics.median(decode) if decode else duration / 10
    start = max(0.0, duration / 2 - span / 2)
    return start, min(duration, start + span)


def timeline_plot(row: dict, path: Path) -> None:
    """Bars per stage: which micro-batch it computed when (the whole run above, a steady-state zoom below)."""
    stages = row["timeline"]["stages"]
    names = list(stages)
    duration = max((end for rows in stages.values() for _, _, end in rows), default=0.0)
    fig, (whole, zoom) = plt.subplots(
        2, 1, figsize=(11, 1.2 + 0.9 * len(names) * 2), gridspec_kw={"height_ratios": [1, 1.4]}
    )
    cmap = plt.get_cmap("tab20")
    lo, hi = _window(row, duration)
    for ax, (a, b) in ((whole, (0.0, duration)), (zoom, (lo, hi))):
        for y, name in enumerate(names):
            bars = [(s, e - s, mb) for mb, s, e in stages[name] if e >= a and s <= b]
            ax.broken_barh(
                [(s * 1e3, d * 1e3) for s, d, _ in bars],
                (y - 0.4, 0.8),
                facecolors=[cmap(mb % 20) for _, _, mb in bars],
                edgecolor="black",
                linewidth=0.2,
            )
            if ax is zoom:
                for s, d, mb in bars:
                    if d > (b - a) / 40:
                        ax.text((s + d / 2) * 1e3, y, str(mb), ha="center", va="center", fontsize=6)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.invert_yaxis()
        ax.set_xlim(a * 1e3, b * 1e3)
        ax.set_xlabel("ms since the first request")
        ax.grid(axis="x", alpha=0.3)
    busy = [s.get("busy_fraction") for s in row.get("stages", [])]
    whole.set_title(
        f"job {row.get('job')}: {_label(row)}, batch {row.get('max_batch_size')}, "
        f"{row.get('model')} {row.get('dtype')} - busy % per stage: {_pct(busy)}",
        fontsize=9,
    )
    zoom.set_title("steady state (numbers: micro-batch ids)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the report -------------------------------------------------------------------------------------
def write_report(paths: list[str | Path], out: str | Path, max_timelines: int = 8) -> Path:
    """Write ``report.md`` and the PNGs into ``out``; return the Markdown file's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for p in paths for r in read_rows(p)]
    good = [r for r in rows if not r.get("error") and r.get("tokens_per_s")]
    errors = [r for r in rows if r.get("error")]
    by_variant: dict[tuple, list[dict]] = defaultdict(list)
    for r in good:
        by_variant[(_setting(r), _variant(r))].append(r)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for (setting, _), runs in by_variant.items():
        groups[setting].append(_combine(runs))

    lines = ["# ChatLoop benchmark report", ""]
    lines += [
        f"Results: {', '.join(f'`{p}`' for p in paths)}: {len(rows)} rows, {len(good)} measured, {len(errors)} errors.",
        "",
    ]
    lines += _host_lines(good)
    plots = _throughput_plots(groups, out)
    for setting in sorted(groups, key=str):
        lines += _setting_table(setting, groups[setting])
    for name in plots:
        lines += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})", ""]
    lines += _roofline_table(good)
    lines += _timelines(good, out, max_timelines)
    if errors:
        lines += ["## Errors", "", "| job | mode | model | overrides | error |", "| --- | --- | --- | --- | --- |"]
        for r in errors:
            message = str(r["error"]).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(
                f"| {r.get('job')} | {r.get('mode')} | {r.get('model')} | {' '.join(r.get('overrides', []))} "
                f"| {message} |"
            )
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _host_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return ["No measured rows.", ""]
    host = rows[0].get("host", {})
    loads = [
        v
        for r in rows
        for v in (r.get("host", {}).get("load_avg_1m"), r.get("host", {}).get("load_avg_1m_end"))
        if v is not None
    ]
    bandwidth = [r["bandwidth"]["read_gbs"] for r in rows if r.get("bandwidth")]
    bandwidth_1t = [r["bandwidth_1t"]["read_gbs"] for r in rows if r.get("bandwidth_1t")]
    lines = [
        f"Host: {host.get('cpu', '?')}, {host.get('cores', '?')} cores, "
        f"{_fmt(host.get('memory_bytes'), 0, 1 / 2**30)} GiB; "
        f"torch {host.get('torch', '?')}, transformers {host.get('transformers', '?')}.",
        "",
    ]
    if bandwidth:
        lines += [
            "Memory bandwidth (the faster of torch's sum and ChatLoop's four-stream read of a large fp32 tensor, "
            "median of the jobs): "
            f"{statistics.median(bandwidth):.1f} GB/s "
            f"with {rows[0].get('bandwidth', {}).get('threads', '?')} threads"
            + (f", {statistics.median(bandwidth_1t):.1f} GB/s with 1 thread." if bandwidth_1t else "."),
            "",
        ]
    if loads:
        cores = host.get("cores") or 1
        lines += [
            f"Load average during the jobs: {min(loads):.1f} to {max(loads):.1f} on {cores} cores."
            + (" **Other work was running: treat these numbers as noisy.**" if max(loads) > 0.5 + cores else ""),
            "",
        ]
    return lines


def _setting_table(setting: tuple, rows: list[dict]) -> list[str]:
    lines = [
        f"## {_setting_title(setting)}",
        "",
        "tok/s: generated tokens of all requests / time from the first request to the last token (prefill included). "
        "decode tok/s: the steady decode rate of a full batch, batch / median inter-token gap (prefill left out). "
        "vs HF / vs 1 proc: over transformers' generate() / ChatLoop with one stage in one process, same batch. "
        "TTFT and ITL are what a client sees (ms). overhead: median decode micro-batch round trip minus time inside "
        "the stages (ms). busy and RSS: per stage.",
        "",
        "| mode | workers | batch | in flight | tok/s | vs HF | vs 1 proc | decode tok/s | vs HF | vs 1 proc "
        "| TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | overhead | busy % | RSS MiB | coordinator MiB | runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| --- | --- | ---: | ---: |",
    ]
    order = {"hf": 0, "inprocess": 1, "chatloop": 2}
    for r in sorted(rows, key=lambda r: (r["max_batch_size"], order.get(r["mode"], 3), r["num_workers"])):
        hf = _baseline(rows, "hf", r["max_batch_size"])
        one = _baseline(rows, "inprocess", r["max_batch_size"])
        stages = r.get("stages") or []
        lines.append(
            f"| {_label(r)} | {r['num_workers']} | {r['max_batch_size']} | {r.get('max_in_flight', '-')} "
            f"| {r['tokens_per_s']:.1f} | "
            f"{_fmt(r['tokens_per_s'] / hf['tokens_per_s'] if hf else None, 2)} | "
            f"{_fmt(r['tokens_per_s'] / one['tokens_per_s'] if one else None, 2)} | "
            f"{_fmt(r.get('decode_tokens_per_s'))} | {_fmt(_ratio(r, hf, 'decode_tokens_per_s'), 2)} | "
            f"{_fmt(_ratio(r, one, 'decode_tokens_per_s'), 2)} | "
            f"{_fmt(r['ttft_ms']['p50'])} | {_fmt(r['ttft_ms']['p99'])} | "
            f"{_fmt(r['itl_ms']['p50'])} | {_fmt(r['itl_ms']['p99'])} | "
            f"{_fmt(transport_overhead_ms(r), 2)} | {_pct([s.get('busy_fraction') for s in stages])} | "
            f"{' / '.join(_fmt(s.get('rss_bytes'), 0, 1 / MIB) for s in stages) or '-'} | "
            f"{_fmt(r.get('coordinator_rss_bytes'), 0, 1 / MIB)} | {r.get('num_runs', 1)} |"
        )
    lines.append("")
    return lines


def _roofline_table(rows: list[dict]) -> list[str]:
    batch1 = [r for r in rows if r.get("max_batch_size") == 1 and r.get("roofline_ms")]
    if not batch1:
        return []
    lines = [
        "## Memory-bandwidth roofline (batch 1)",
        "",
        "A batch-1 decode step reads every weight once: its time cannot be below weight bytes / memory bandwidth. "
        "Measured: the inter-token latency p50. 1-thread roofline: the bound of one core (a worker pinned to one "
        "core).",
        "",
        "| model | dtype | mode | workers | weights MB/token | GB/s | roofline ms | 1-thread roofline ms | decode ms "
        "| roofline / decode |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(batch1, key=lambda r: (str(r["model"]), r["mode"], r["num_workers"])):
        decode = r["itl_ms"]["p50"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {_label(r)} | {r['num_workers']} "
            f"| {r['weight_bytes_per_token'] / 1e6:.1f} | {r['bandwidth']['read_gbs']:.1f} | {r['roofline_ms']:.2f} "
            f"| {_fmt(r.get('roofline_1t_ms'), 2)} | {_fmt(decode, 2)} | "
            f"{_fmt(r['roofline_ms'] / decode if decode else None, 2)} |"
        )
    lines.append("")
    return lines


def _timelines(rows: list[dict], out: Path, max_timelines: int) -> list[str]:
    candidates = [r for r in rows if (r.get("timeline") or {}).get("stages") and r["mode"] == "chatloop"]
    candidates += [r for r in rows if (r.get("timeline") or {}).get("stages") and r["mode"] == "inprocess"]
    # The most interesting first: more stages, then bigger batches.
    candidates.sort(key=lambda r: (r["mode"] != "chatloop", -r["num_workers"], -r["max_batch_size"], r.get("job", 0)))
    lines = (
        [
            "## Pipeline timelines",
            "",
            "Each bar is one stage computing one micro-batch (colour: micro-batch id), "
            "from the timestamps the stages record.",
            "",
        ]
        if candidates[:max_timelines]
        else []
    )
    for r in candidates[:max_timelines]:
        name = f"timeline_job{r.get('job')}_{zlib.crc32(str(r.get('sweep')).encode()) % 10000:04d}.png"
        timeline_plot(r, out / name)
        lines += [
            f"### job {r.get('job')}: {_label(r)}, batch {r['max_batch_size']}, {r['model']}",
            "",
            f"![timeline]({name})",
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", help="results.jsonl file(s) written by benchmarks.sweep")
    parser.add_argument("--out", required=True, help="folder for report.md and the PNGs")
    parser.add_argument("--max-timelines", type=int, default=8, help="pipeline timelines to draw (most stages first)")
    ns = parser.parse_args(argv)
    missing = [p for p in ns.results if not Path(p).is_file()]
    if missing:
        print(f"benchmarks.report: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    report = write_report(ns.results, ns.out, ns.max_timelines)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
