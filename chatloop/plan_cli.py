"""``chatloop-plan``: measure a host, and show the plan for hosts of unequal speed and memory (docs/placement.md).

    chatloop-plan probe --partitions DIR --name HOST [--holds partition_0.safetensors,...] [--output HOST.json]
    chatloop-plan show --partitions DIR HOST.json... [--batch 16] [--kv-cache-mb 512] [--json]

``probe`` runs on each host, with the threads its worker will use, and writes that host's figures; ``show`` plans
the layers over the hosts in the order given (the pipeline's order) and prints each host's figures, its layers and
the predicted tokens/s at batch 1 and at the batch size, beside the even split's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .partition import Manifest, ManifestError, PlanError, plan_layers
from .partition.costs import HEADROOM_MB, model_costs
from .partition.placement import HostFigures, Placement, layer_seconds, place_layers, predict

__all__ = ["main", "format_plan"]


def format_plan(title: str, placement: Placement, hosts: list[HostFigures]) -> str:
    """A plan as a table: each host's figures, its layers and the predictions."""
    placed = {s.host: s for s in placement.stages}
    lines = [f"{title}: {placement.tokens_per_s_1:.1f} tokens/s at batch 1, {placement.tokens_per_s:.1f} tokens/s "
             f"at batch {placement.batch} ({placement.micro_batches} micro-batches of {placement.micro_batch}: slowest "
             f"stage {placement.bottleneck_s * 1e3:.2f} ms a step, a trip {placement.trip_s * 1e3:.2f} ms)",
             f"  {'host':<12} {'threads':>7} {'cpu':>5} {'mem MiB':>8} {'GB/s':>6} {'layer ms b=1':>12} "
             f"{'b=' + str(placement.micro_batch):>8} {'fixed ms':>8} {'head ms':>8} {'layers':>8} {'stage ms':>9}"]
    micro = placement.micro_batch
    for h in hosts:
        stage = placed.get(h.name)
        cpu = "-" if h.cpu_limit is None else f"{h.cpu_limit:.2g}"
        bandwidth = "-" if h.bandwidth_gb_s is None else f"{h.bandwidth_gb_s:.1f}"
        layers = str(stage.layers) if stage else "out"
        step = f"{stage.step_s * 1e3:.2f}" if stage else "-"
        fixed, head = ("-" if t is None else f"{layer_seconds(t, micro) * 1e3:.3f}" for t in (h.step_fixed_s, h.head_s))
        lines.append(f"  {h.name:<12} {h.threads or '-':>7} {cpu:>5} {h.memory_bytes / 2**20:>8.0f} {bandwidth:>6} "
                     f"{layer_seconds(h.decode_s, 1) * 1e3:>12.3f} "
                     f"{layer_seconds(h.decode_s, micro) * 1e3:>8.3f} {fixed:>8} {head:>8} {layers:>8} {step:>9}")
    for name, why in placement.left_out.items():
        lines.append(f"  {name} is left out: {why}")
    return "\n".join(lines)


def _probe(args: argparse.Namespace) -> int:
    from .stage.probe import probe_host  # torch and the kernels: only for the probe

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    held = [f for f in args.holds.split(",") if f] if args.holds else None
    figures = probe_host(args.name, args.partitions, held=held, hop_s=args.hop_ms / 1e3)
    text = json.dumps(figures.as_dict(), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def _show(args: argparse.Namespace) -> int:
    hosts = []
    for path in args.figures:
        try:
            hosts.append(HostFigures.from_dict(json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read {path}: {e}: write it with chatloop-plan probe --output {path}") from None
    manifest = Manifest.load(Path(args.partitions))
    costs = model_costs(manifest, kv_cache_mb=args.kv_cache_mb, num_hosts=len(hosts), headroom_mb=args.headroom_mb)
    auto = place_layers(hosts, costs, args.batch)
    result = {"auto": auto}
    try:
        result["even"] = predict(hosts, costs, plan_layers(costs.num_layers, len(hosts)), args.batch)
    except PlanError as e:
        result["even"] = None
        even_why = str(e)
    if args.json:
        print(json.dumps({name: None if p is None else {
            "ranges": [str(r) for r in p.ranges], "hosts": p.hosts, "left_out": p.left_out,
            "tokens_per_s_1": p.tokens_per_s_1, "tokens_per_s": p.tokens_per_s, "batch": p.batch,
        } for name, p in result.items()}, indent=2))
        return 0
    print(format_plan("auto", auto, hosts))
    if result["even"] is not None:
        print(format_plan("even", result["even"], hosts))
    else:
        print(f"even: cannot run ({even_why})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatloop-plan", description="Measure a host, and show the plan for hosts "
                                     "of unequal speed and memory (docs/placement.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="measure this host for the plan")
    probe.add_argument("--partitions", required=True, help="the split's folder on this host")
    probe.add_argument("--name", required=True, help="this host's name in the plan")
    probe.add_argument("--holds", default="", help="the partition files this host holds (comma-separated); "
                       "default: those present in --partitions")
    probe.add_argument("--hop-ms", type=float, default=0.0, help="one hop to the next host, in ms")
    probe.add_argument("--threads", type=int, default=0, help="the threads its worker will use (worker_threads); "
                       "default: torch's")
    probe.add_argument("--output", help="write the figures here (JSON); default: standard output")
    show = sub.add_parser("show", help="plan the layers over hosts from their figures")
    show.add_argument("figures", nargs="+", help="each host's figures (chatloop-plan probe), in pipeline order")
    show.add_argument("--partitions", required=True, help="the split's folder (its manifest.json is enough)")
    show.add_argument("--batch", type=int, default=16, help="sequences a decode step (batching.max_batch_size)")
    show.add_argument("--kv-cache-mb", type=float, default=512, help="an even split's stage's KV pool")
    show.add_argument("--headroom-mb", type=float, default=HEADROOM_MB, help="each worker's memory beyond its "
                      "weights and KV pool")
    show.add_argument("--json", action="store_true", help="print the plans as JSON")
    args = parser.parse_args(argv)
    try:
        return _probe(args) if args.command == "probe" else _show(args)
    except (PlanError, ManifestError, ValueError) as e:
        print(f"chatloop-plan: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
