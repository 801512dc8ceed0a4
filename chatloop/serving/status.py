"""``chatloop-status``: one line per rank, from a running server's GET /v1/status.

    $ chatloop-status --url http://127.0.0.1:8000
    NAME         ROLE/RANK      HOST  PORTS                     LAYERS  PARTITION              MEMORY   STATUS
    coordinator  coordinator/0  vm    http 8000, store 50050    -       -                      455 MiB  up 25s (...)
    worker0      worker/1       vm    health 50051, metrics 9091  0-7   partition_0.safetensors  1.0 GiB  up 17s (...)
    worker2      worker/3       vm    metrics 9093              16-22   partition_2.safetensors  -  DOWN: no answer ...

A worker in a container shows the container's name as its host; a down one says how to bring it back
("... bring it back with `docker start chatloop-worker-2`"). The exit status is 0 when every stage answers,
1 when a stage is down, 2 when the server cannot be reached. After the table it prints the KV cache (blocks used,
cached, free), the prefix cache's hit rate and, where speculation is on, its acceptance rate. ``--json`` prints the
raw document. The server side is :func:`build_status`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import psutil

from ..engine import EngineStats
from .health import HealthReport

__all__ = ["build_status", "format_cache", "format_plan", "format_table", "main"]

COLUMNS = ("NAME", "ROLE/RANK", "HOST", "PORTS", "LAYERS", "PARTITION", "MEMORY", "STATUS")


def build_status(stats: EngineStats, report: HealthReport, *, model: str,
                 ports: dict[str, int] | None = None, plan: dict[str, Any] | None = None,
                 speculative_method: str | None = None) -> dict[str, Any]:
    """The coordinator and every stage: where it runs, what it holds, how long it has been up, its state.

    ``ports``: the coordinator's own ({"http": 8000, "store": 50050}); a worker reports its own.
    ``plan``: how the layers were placed, predicted and measured tokens/s
    (:func:`~chatloop.stage.plan_report.plan_report`).
    ``speculative_method``: ``speculative.method`` (None: off unless requests asked for it).
    """
    queue = {
        "num_waiting": stats.num_waiting, "num_running": stats.num_running, "num_in_flight": stats.num_in_flight,
        "max_in_flight": stats.max_in_flight,
        "kv_blocks_used": stats.kv_blocks_used, "kv_blocks_total": stats.kv_blocks_total,
        "generated_tokens": stats.generated_tokens,
    }
    me = psutil.Process()
    nodes: list[dict[str, Any]] = [{
        "name": "coordinator", "role": "coordinator", "rank": 0, "host": socket.gethostname(), "pid": os.getpid(),
        "layers": None, "partition": None, "partition_bytes": None, "uptime_s": time.time() - me.create_time(),
        "rss_bytes": me.memory_info().rss, "ports": dict(ports or {}),
        "state": stats.cluster_state if stats.cluster_state != "serving" or report.healthy else "degraded", **queue,
    }]
    for stage in report.stages:
        node = {
            "name": stage.name,
            "role": "stage" if stage.in_process else "worker",
            "rank": 0 if stage.in_process else stage.index + 1,
            "host": stage.host,
            "container": stage.container,
            "machine": stage.machine,
            "cores": list(stage.cores) if stage.cores is not None else None,
            "threads": stage.threads,
            "cpu_limit": stage.cpu_limit,
            "omp_spin_count": stage.omp_spin_count,
            "simd": stage.simd,
            "pid": stage.pid,
            "layers": stage.layers,
            "partition": stage.partition,
            "partition_bytes": stage.partition_bytes,
            "uptime_s": stage.uptime_s,
            "rss_bytes": stage.rss_bytes,
            "state": "up" if stage.up else "recovering" if stage.recovering else "down",
            "busy_s": stage.busy_s,
            "num_micro_batches": stage.num_micro_batches,
            "num_blocks": stage.num_blocks,
            "metrics_port": stage.metrics_port,
            "ports": {name: port for name, port in (("health", stage.health_port), ("metrics", stage.metrics_port))
                      if port is not None},
        }
        if not stage.up:
            node["error"] = stage.error
        nodes.append(node)
    return {"model": model, "healthy": report.healthy, "checked_at": report.checked_at, "nodes": nodes, "plan": plan,
            **_cache(stats, speculative_method)}


def _cache(stats: EngineStats, speculative_method: str | None) -> dict[str, Any]:
    """The KV and prefix caches and speculation, from the stats GET /metrics reads (rates None before any lookup or
    draft; speculation None while it is off and no request has drafted)."""
    cache = {
        "kv_blocks_used": stats.kv_blocks_used, "kv_blocks_cached": stats.kv_blocks_cached,
        "kv_blocks_free": stats.kv_blocks_free, "kv_blocks_total": stats.kv_blocks_total,
        "prefix_cache_queries_tokens": stats.prefix_cache_queries, "prefix_cache_hits_tokens": stats.prefix_cache_hits,
        "prefix_cache_hit_rate": stats.prefix_cache_hit_rate if stats.prefix_cache_queries else None,
        "kv_window_blocks_used": stats.kv_window_blocks_used, "kv_window_blocks_total": stats.kv_window_blocks_total,
    }
    drafted = stats.speculative_drafted_tokens
    speculation = None if speculative_method is None and not drafted else {
        "method": speculative_method, "drafted_tokens": drafted,
        "accepted_tokens": stats.speculative_accepted_tokens,
        "acceptance_rate": stats.speculative_acceptance_rate if drafted else None,
    }
    return {"cache": cache, "speculation": speculation}


# ---- the command-line client -----------------------------------------------------------------
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _status(node: dict[str, Any]) -> str:
    """'up 5m02s (...)', or 'DOWN: why' / 'RECOVERING: why'."""
    if node["role"] == "coordinator":
        return (f"up {_duration(node.get('uptime_s'))} ({node['state']}: {node['num_running']} running, "
                f"{node['num_waiting']} waiting, KV {node['kv_blocks_used']}/{node['kv_blocks_total']} blocks)")
    if node["state"] != "up":
        return f"{node['state'].upper()}: {node.get('error', 'no answer')}"
    busy, up = node.get("busy_s"), node.get("uptime_s")
    share = f", {100 * busy / up:.0f}% busy" if busy is not None and up else ""
    return f"up {_duration(up)} ({node.get('num_micro_batches', 0)} micro-batches{share})"


def _ports(node: dict[str, Any]) -> str:
    return ", ".join(f"{name} {port}" for name, port in (node.get("ports") or {}).items()) or "-"


def _row(node: dict[str, Any]) -> list[str]:
    partition = node.get("partition")
    if partition and node.get("partition_bytes"):
        partition = f"{partition} ({_bytes(node['partition_bytes'])})"
    return [
        node["name"],
        f"{node['role']}/{node['rank']}",
        node.get("container") or node.get("host") or "-",
        _ports(node),
        node.get("layers") or "-",
        partition or "-",
        _bytes(node.get("rss_bytes")),
        _status(node),
    ]


def format_table(status: dict[str, Any]) -> str:
    """The status document as an aligned table, one line per rank."""
    rows = [list(COLUMNS)] + [_row(n) for n in status["nodes"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _figure(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def format_plan(plan: dict[str, Any]) -> str:
    """The status document's plan: under auto one line per host (its probe, its layers, its predicted step), then the
    predicted tokens/s beside the measured ones."""
    measured = plan.get("measured") or {}
    seen = (f"measured {_figure(measured.get('tokens_per_s_1'))} tokens/s at batch 1, "
            f"{_figure(measured.get('tokens_per_s'))} at {_figure(measured.get('sequences'))} sequences in flight"
            if measured.get("tokens_per_s") is not None else "measured: no decode steps yet")
    if "stages" not in plan:
        return f"plan {plan['plan']}: {plan.get('note', '')}\n{seen}"
    header = ["HOST", "LAYERS", "THREADS", "CPU LIMIT", "MEMORY", "LAYER MS b1", f"b{plan['micro_batch']}",
              "HOP MS", "STEP MS b1", f"b{plan['micro_batch']}"]
    rows = [header] + [[
        s["host"], s["layers"], _figure(s.get("threads"), "d") if s.get("threads") else "-",
        _figure(s.get("cpu_limit"), ".2f"), _bytes(s.get("memory_bytes")),
        _figure((s.get("layer_ms") or {}).get("1"), ".3f"), _figure(s.get("layer_ms_at_micro_batch"), ".3f"),
        _figure(s.get("hop_ms"), ".3f"), _figure(s["step_ms_1"], ".2f"), _figure(s["step_ms"], ".2f"),
    ] for s in plan["stages"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"plan auto: batch {plan['batch']} as {plan['micro_batches']} micro-batch(es) of {plan['micro_batch']}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"left out {host}: {why}" for host, why in plan.get("left_out", {}).items()]
    predicted = plan["predicted"]
    lines.append(f"predicted {predicted['tokens_per_s_1']:.1f} tokens/s at batch 1, {predicted['tokens_per_s']:.1f} "
                 f"at batch {plan['batch']}; {seen}")
    return "\n".join(lines)


def format_cache(status: dict[str, Any]) -> str:
    """The status document's cache (and speculation) section as lines of text."""
    c = status["cache"]
    lines = [f"KV cache: {c['kv_blocks_used']} blocks used, {c['kv_blocks_cached']} cached, {c['kv_blocks_free']} free "
             f"of {c['kv_blocks_total']}"]
    if c.get("kv_window_blocks_total"):  # (a model that mixes windowed and full layers)
        lines.append(f"windowed layers' pool: {c['kv_window_blocks_used']} blocks used of "
                     f"{c['kv_window_blocks_total']}")
    if c["prefix_cache_hit_rate"] is None:
        lines.append("prefix cache: no lookups yet")
    else:
        lines.append(f"prefix cache: {c['prefix_cache_hits_tokens']} of {c['prefix_cache_queries_tokens']} tokens hit "
                     f"({100 * c['prefix_cache_hit_rate']:.1f}%)")
    spec = status.get("speculation")
    if spec is not None:
        method = f" ({spec['method']})" if spec["method"] else ""
        lines.append(f"speculation{method}: no drafts yet" if spec["acceptance_rate"] is None else
                     f"speculation{method}: {spec['accepted_tokens']} of {spec['drafted_tokens']} drafted tokens "
                     f"accepted ({100 * spec['acceptance_rate']:.1f}%)")
    return "\n".join(lines)


def fetch_status(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """GET {url}/v1/status; raise RuntimeError saying what went wrong."""
    request = urllib.request.Request(url.rstrip("/") + "/v1/status")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:
            message = e.reason
        hint = ": pass --api-key or set CHATLOOP_API_KEY" if e.code == 401 else ""
        raise RuntimeError(f"{url} answered {e.code}: {message}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"cannot reach {url} ({reason}): is chatloop-serve running there? (--url)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatloop-status",
                                     description="Show the coordinator and every worker of a running ChatLoop server.")
    parser.add_argument("--url", default=os.environ.get("CHATLOOP_URL", "http://127.0.0.1:8000"),
                        help="the server (default: $CHATLOOP_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=os.environ.get("CHATLOOP_API_KEY"),
                        help="server.api_key (default: $CHATLOOP_API_KEY)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")
    args = parser.parse_args(argv)
    try:
        status = fetch_status(args.url, args.api_key, args.timeout)
    except RuntimeError as e:
        print(f"chatloop-status: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"model {status['model']} at {args.url}: "
              f"{'healthy' if status['healthy'] else 'DEGRADED (a stage is down)'}")
        print(format_table(status))
        if status.get("cache"):  # (a server from before the cache section has none)
            print(format_cache(status))
        if status.get("plan"):
            print(format_plan(status["plan"]))
    return 0 if status["healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
