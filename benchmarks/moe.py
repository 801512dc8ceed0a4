"""A mixture-of-experts model of Qwen3-30B-A3B's layer shape, as one GGUF file that ChatLoop and llama.cpp both run.

Qwen3-30B-A3B's layers (hidden 2048, 32 query and 4 KV heads of 128, 128 experts of intermediate 768, 8 a token,
``norm_topk_prob``, vocabulary 151936) with random weights, fewer of them than its 48 (``--layers``, default 12: see
docs/performance.md for why), written as a ``qwen3moe`` GGUF of random quantized blocks (``--type``, default
``Q4_K``; routers and norms float32, as llama.cpp's converter leaves them) one tensor at a time, never the whole
model in memory. ChatLoop splits that file into its partitions (kept quantized, ``model.quantization=gguf``) and
llama.cpp's ``llama-server`` maps it: the same weights for both.

    python -m benchmarks.moe write                      # the file, into ~/.cache/chatloop/moe/
    python -m benchmarks.moe bytes                      # per stage: weight bytes a batch-1 decode step reads
    python -m benchmarks.moe workers --json w.json      # 4 workers: decode tokens/s, roofline, each worker's RSS
    python -m benchmarks.moe paired --rounds 3          # 4 workers against llama-server, benchmarks.paired's rounds

The active weights a token reads (:func:`active_bytes`): per layer attention, norms, the router and ``top_k`` of
``E`` experts, plus the head (the embedding is one row). ``bytes`` checks what a decode step of each loaded stage
really reads: forward hooks sum the bytes of every module a batch-1 step calls, so a step that ran an expert its row
did not choose would show. Timing commands hold no lock themselves: run them under
``flock /tmp/chatloop-bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

__all__ = ["MoEShape", "QWEN3_30B_A3B", "active_bytes", "file_bytes", "gguf_file", "measured_bytes",
           "rss_budget", "write_moe_gguf"]

NORM_SUFFIXES = ("attn_norm.weight", "ffn_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight")
"""A layer's float32 vectors."""
PROCESS_OVERHEAD = 500 * 2**20
"""What a worker may hold beyond its partition and KV pool (Python, torch, buffers): issue 20's target."""


@dataclass(frozen=True)
class MoEShape:
    """The model's shape; :data:`QWEN3_30B_A3B` is Qwen3-30B-A3B's but for its number of layers."""

    layers: int
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    experts: int = 128
    expert_ff: int = 768
    top_k: int = 8
    vocab: int = 151936
    dense_ff: int = 6144
    """``feed_forward_length``: Qwen3-30B-A3B's, unused (every layer is sparse), written as its file has it."""
    context: int = 40960
    rope_base: float = 1000000.0
    eps: float = 1e-6
    kind: str = "Q4_K"
    """GGUF type of every matrix (embedding, head, attention, experts)."""

    def name(self) -> str:
        return (f"qwen3moe-h{self.hidden}-e{self.experts}x{self.expert_ff}-k{self.top_k}-v{self.vocab}"
                f"-L{self.layers}-{self.kind}")

    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(GGUF name, shape as rows... x columns, type) of every tensor, in file order (llama.cpp's names)."""
        c, q, kv, d = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        out = [("token_embd.weight", (self.vocab, c), self.kind)]
        for i in range(self.layers):
            b = f"blk.{i}."
            out += [
                (b + "attn_norm.weight", (c,), "F32"), (b + "attn_q.weight", (q, c), self.kind),
                (b + "attn_k.weight", (kv, c), self.kind), (b + "attn_v.weight", (kv, c), self.kind),
                (b + "attn_output.weight", (c, q), self.kind), (b + "attn_q_norm.weight", (d,), "F32"),
                (b + "attn_k_norm.weight", (d,), "F32"), (b + "ffn_norm.weight", (c,), "F32"),
                (b + "ffn_gate_inp.weight", (self.experts, c), "F32"),
                (b + "ffn_gate_exps.weight", (self.experts, self.expert_ff, c), self.kind),
                (b + "ffn_up_exps.weight", (self.experts, self.expert_ff, c), self.kind),
                (b + "ffn_down_exps.weight", (self.experts, c, self.expert_ff), self.kind),
            ]
        return out + [("output_norm.weight", (c,), "F32"), ("output.weight", (self.vocab, c), self.kind)]


DEFAULT_LAYERS = 12
"""The benchmark's layers: the paired run holds the model twice (ChatLoop's workers, llama-server's mapping and its
repacked copy), ~12 GB at 12 layers, within what this shared 24 GB host can give one run."""
QWEN3_30B_A3B = MoEShape(layers=48)
"""Qwen3-30B-A3B as published: 48 layers (``--layers`` picks how many the benchmark's model has)."""
TINY = MoEShape(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, experts=8, expert_ff=256, top_k=2, vocab=512,
                dense_ff=512, context=512)
"""The tooling test's shape: every row a multiple of 256, as the k-quants need."""


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return int(np.prod(shape)) // block * size


def file_bytes(shape: MoEShape) -> int:
    """The tensors' bytes of the model's GGUF file (its metadata adds a few MB)."""
    return sum(_nbytes(s, kind) for _, s, kind in shape.tensors())


def _vocab(size: int) -> list[str]:
    """A byte-level SentencePiece-style vocabulary of ``size`` tokens: <unk>, <s>, </s>, 256 bytes, then words."""
    return ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *(f"▁w{i}" for i in range(size - 259))]


def _data(name: str, shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """The tensor's bytes: random quantized blocks of sane scales (weights near +-0.05), norms near 1, routers
    standard normal x 0.05."""
    helpers = str(Path(__file__).resolve().parents[1] / "tests" / "unit")
    if helpers not in sys.path:
        sys.path.insert(0, helpers)
    from gguf_files import random_blocks  # the tests' valid random blocks of every kept GGUF type

    if kind == "F32":
        if name.endswith(NORM_SUFFIXES) or name == "output_norm.weight":
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)
    rows = int(np.prod(shape[:-1]))
    return random_blocks(kind, rows, shape[-1], rng).reshape(*shape[:-1], -1)


def write_moe_gguf(path: Path, shape: MoEShape, seed: int = 0) -> Path:
    """Write ``shape`` as a ``qwen3moe`` GGUF at ``path`` (atomically: a ``.tmp`` then renamed), one tensor in memory
    at a time (an expert tensor of the full shape: 113 MB in Q4_K)."""
    import gguf

    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, "qwen3moe")
    writer.add_name(shape.name())
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.dense_ff)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(shape.eps)
    writer.add_expert_count(shape.experts)
    writer.add_expert_used_count(shape.top_k)
    writer.add_expert_feed_forward_length(shape.expert_ff)
    tokens = _vocab(shape.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    tensors = shape.tensors()
    for name, dims, kind in tensors:
        if kind == "F32":
            writer.add_tensor_info(name, dims, np.dtype(np.float32), _nbytes(dims, kind))
        else:
            row_bytes = _nbytes((dims[-1],), kind)
            writer.add_tensor_info(name, (*dims[:-1], row_bytes), np.dtype(np.uint8), _nbytes(dims, kind),
                                   raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, (name, dims, kind) in enumerate(tensors):
        writer.write_tensor_data(_data(name, dims, kind, np.random.default_rng([seed, index])))
    writer.close()
    os.replace(tmp, path)
    return path


def cache_dir() -> Path:
    from chatloop.paths import cache_root

    return cache_root() / "moe"


def gguf_file(shape: MoEShape, seed: int = 0, folder: Path | None = None) -> Path:
    """The model's file in the cache (``~/.cache/chatloop/moe/``), written first if missing; refused where the disk
    has not room for it and ChatLoop's split of it (its size twice, plus 2 GB)."""
    folder = folder or cache_dir()
    path = folder / f"{shape.name()}-s{seed}.gguf"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    need, free = 2 * file_bytes(shape) + 2 * 10**9, shutil.disk_usage(folder).free
    if free < need:
        raise OSError(f"{folder}: {free / 1e9:.1f} GB free, the {shape.layers}-layer file and its split need "
                      f"{need / 1e9:.1f} GB: free disk or lower --layers")
    return write_moe_gguf(path, shape, seed)


def active_bytes(path: Path) -> dict[str, int]:
    """Weight bytes one token reads from the GGUF file ``path`` as stored: every tensor but the experts' and the
    embedding (one row, left out), and of each stacked expert tensor ``top_k / E`` of it. ``{"total", "experts",
    "attention", "router_norms", "head", "all_experts"}``."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    top_k = reader.fields[f"{arch}.expert_used_count"].contents()
    count = reader.fields[f"{arch}.expert_count"].contents()
    parts = dict.fromkeys(("experts", "attention", "router_norms", "head", "all_experts"), 0)
    for t in reader.tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight":
            continue
        if t.name.endswith("_exps.weight"):
            parts["experts"] += n * top_k // count
            parts["all_experts"] += n
        elif ".attn_" in t.name and not t.name.endswith(NORM_SUFFIXES):
            parts["attention"] += n
        elif t.name == "output.weight":
            parts["head"] += n
        else:
            parts["router_norms"] += n
    parts["total"] = parts["experts"] + parts["attention"] + parts["router_norms"] + parts["head"]
    return parts


def rss_budget(partition_bytes: int, kv_cache_bytes: int) -> int:
    """A worker's RSS target: its partition, its KV pool and 500 MB (issue 20)."""
    return partition_bytes + kv_cache_bytes + PROCESS_OVERHEAD


def _config(path: Path, workers: int, overrides: list[str]):
    from chatloop import load_config

    return load_config([f"model.name={path}", "model.quantization=gguf", "model.dtype=float32",
                        f"cluster.num_workers={workers}", *overrides])


def measured_bytes(stage, steps: int = 1, context: int = 64) -> dict:
    """What a batch-1 decode step of the loaded ``stage`` reads: the bytes of every parameter and buffer of the
    modules it calls (an embedding: the rows it looks up), summed by forward hooks over ``steps`` steps and
    averaged, and of the experts' matrices handed to their one native call (counted on the modules' path: the
    one-call decode step, which reads the same matrices, runs no module); and the median step time (ms) of ``steps``
    more, unhooked (on the one call where the stage has it)."""
    import torch

    from .roofline import decode_step

    run = decode_step(stage, 1, context)
    run()
    read = {"bytes": 0}

    def hook(module, inputs, output) -> None:
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, torch.nn.Embedding) or type(module).__name__ == "QuantEmbedding":
            ids = inputs[0]
            read["bytes"] += ids.numel() * module.weight[0].numel() * module.weight.element_size()
            return
        read["bytes"] += sum(t.numel() * t.element_size() for t in tensors if t is not None)

    from chatloop.kernels import experts

    one_call = experts.moe_experts_unchecked

    def counted(x, out, gate_up, down, formats, row_bytes, counts, rows, weights, width, isa):
        # The experts' one native call (SparseMoE._native) runs no module: count the matrices it is handed.
        read["bytes"] += len(gate_up) * (2 * width * row_bytes[0] + x.shape[-1] * row_bytes[1])
        one_call(x, out, gate_up, down, formats, row_bytes, counts, rows, weights, width, isa)

    handles = [m.register_forward_hook(hook) for m in stage.modules() if not list(m.children())]
    experts.moe_experts_unchecked = counted
    kernel, stage.decode_kernel = stage.decode_kernel, None  # counted on the modules: the one call runs none
    try:
        for _ in range(steps):
            run()
    finally:
        experts.moe_experts_unchecked = one_call
        stage.decode_kernel = kernel
        for h in handles:
            h.remove()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"bytes_per_step": read["bytes"] / steps, "step_ms": statistics.median(times) * 1e3}


def stage_bytes(cfg, steps: int) -> list[dict]:
    """:func:`measured_bytes` of every stage of ``cfg``'s split, loaded here one at a time as a worker loads it."""
    import gc

    from chatloop.api import partitions_dir_for, prepare_partitions
    from chatloop.partition import load_stage

    prepare_partitions(cfg)
    rows = []
    for index in range(cfg.cluster.num_workers):
        stage = load_stage(partitions_dir_for(cfg), index, pack_weights=cfg.worker.pack_weights,
                           native_kernels=cfg.worker.native_kernels)
        rows.append({"stage": index, "layers": list(stage.layers_range.indices)} | measured_bytes(stage, steps))
        del stage
        gc.collect()
    return rows


def _bench_overrides(path: Path, args) -> list[str]:
    """The load every timing command offers: batch 1, one request, greedy, prefix cache off."""
    return [f"model.name={path}", "model.quantization=gguf", f"benchmark.gguf={path}",
            f"cluster.num_workers={args.workers}", "batching.max_batch_size=1", "benchmark.num_requests=1",
            f"benchmark.prompt_tokens={args.prompt_tokens}", f"benchmark.new_tokens={args.new_tokens}",
            f"cache.kv_cache_mb={args.kv_cache_mb}", "cache.prefix_caching=false", *args.overrides]


def workers(path: Path, args) -> dict:
    """One run of ChatLoop over the workers (``benchmarks.measure.measure_chatloop``), the read bandwidth measured
    just before: decode tokens/s, its fraction of the roofline over :func:`active_bytes`, and each worker's RSS
    against :func:`rss_budget`."""
    from .measure import host_info, in_temporary_thread, measure_chatloop, memory_bandwidth
    from .paired import job_specs
    from .run_one import typed_spec

    spec = job_specs("benchmark/sweep", _bench_overrides(path, args), ["chatloop"])["chatloop"]
    cfg, bench = typed_spec(spec)
    host = host_info()
    gbs = in_temporary_thread(memory_bandwidth, args.bandwidth_mb, repeats=3)["read_gbs"]
    row = measure_chatloop(cfg, bench)
    host["load_avg_1m_end"] = os.getloadavg()[0]
    active = active_bytes(path)["total"]
    row |= {"host": host, "bandwidth_gbs": gbs, "active_bytes_per_token": active,
            "roofline_tokens_per_s": gbs * 1e9 / active, "config": spec["config"]}
    row["fraction_of_roofline"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
    for stage in row["stages"]:
        stage["rss_budget_bytes"] = rss_budget(stage["partition_bytes"] or 0, stage["kv_cache_bytes"] or 0)
        stage["rss_within_budget"] = (stage["rss_bytes"] or 0) <= stage["rss_budget_bytes"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("write", "bytes", "workers", "paired"))
    parser.add_argument("--layers", type=int, default=None,
                        help=f"{DEFAULT_LAYERS} by default ({TINY.layers} with --tiny): what this host holds twice")
    parser.add_argument("--type", default="Q4_K", help="GGUF type of the matrices (Q4_0, Q4_K, Q8_0, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the tooling test's small shape, not Qwen3-30B-A3B's")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="bytes: decode steps per stage")
    parser.add_argument("--rounds", type=int, default=3, help="paired: rounds")
    parser.add_argument("--bandwidth-mb", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-mb", type=int, default=64, help="each worker's KV pool")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="ChatLoop or benchmark overrides, e.g. worker.worker_threads=2")
    args = parser.parse_intermixed_args(argv)
    layers = args.layers if args.layers is not None else TINY.layers if args.tiny else DEFAULT_LAYERS
    if layers < 1:
        parser.error(f"--layers {layers}: need >= 1")
    shape = replace(TINY if args.tiny else QWEN3_30B_A3B, layers=layers, kind=args.type)
    path = gguf_file(shape, args.seed)
    active = active_bytes(path)
    result: dict = {"command": " ".join(["python -m benchmarks.moe", *(argv if argv is not None else sys.argv[1:])]),
                    "shape": asdict(shape), "file": str(path), "file_bytes": path.stat().st_size,
                    "active_bytes": active, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "load_avg_1m": os.getloadavg()[0]}
    print(f"{path.name}: {path.stat().st_size / 1e9:.2f} GB; a token reads {active['total'] / 1e6:.1f} MB "
          f"(experts {active['experts'] / 1e6:.1f}, attention {active['attention'] / 1e6:.1f}, router and norms "
          f"{active['router_norms'] / 1e6:.1f}, head {active['head'] / 1e6:.1f})", flush=True)
    if args.command == "bytes":
        from .measure import in_temporary_thread

        cfg = _config(path, args.workers, args.overrides)
        rows = in_temporary_thread(stage_bytes, cfg, args.steps)
        total = sum(r["bytes_per_step"] for r in rows)
        for r in rows:
            print(f"stage {r['stage']} layers {r['layers'][0]}-{r['layers'][-1]}: reads "
                  f"{r['bytes_per_step'] / 1e6:.1f} MB a step, {r['step_ms']:.2f} ms", flush=True)
        print(f"all stages: {total / 1e6:.1f} MB a token = {total / active['total']:.3f} x the active weights; "
              f"steps {sum(r['step_ms'] for r in rows):.1f} ms in one process")
        result |= {"stages": rows, "bytes_per_token": total, "read_over_active": total / active["total"]}
    elif args.command == "workers":
        row = workers(path, args)
        print(f"{args.workers} workers, batch 1: {row['decode_tokens_per_s']:.1f} decode tok/s; roofline "
              f"{row['roofline_tokens_per_s']:.1f} tok/s at {row['bandwidth_gbs']:.1f} GB/s: "
              f"{row['fraction_of_roofline']:.2f}")
        for s in row["stages"]:
            print(f"{s['name']}: RSS {s['rss_bytes'] / 2**20:.0f} MiB, budget {s['rss_budget_bytes'] / 2**20:.0f} MiB "
                  f"(partition {s['partition_bytes'] / 2**20:.0f} + KV {s['kv_cache_bytes'] / 2**20:.0f} + 500)"
                  f"{'' if s['rss_within_budget'] else '  OVER'}")
        result |= {"workers": row}
    elif args.command == "paired":
        from .paired import main as paired_main

        paired = paired_main(["--modes", "llamacpp,chatloop", "--rounds", str(args.rounds), "--bandwidth-mb",
                              str(args.bandwidth_mb), *_bench_overrides(path, args)])
        if not paired:
            return 1
        result |= {"paired": paired}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":  # the guard matters: paired's contenders are spawned from this module
    sys.exit(main())
