"""One measurement in a fresh process: ``python -m benchmarks.run_one SPEC.json RESULT.json``.

torch.distributed.rpc starts once per process, so the sweep runs every job here. SPEC holds
the job's resolved ChatLoop configuration (``config``) and benchmark fields (``benchmark``);
RESULT receives the measured fields (:func:`benchmarks.measure.run`), or ``{"error": ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path


def load_spec(path: str | Path):
    """The typed (ChatLoopConfig, BenchmarkConfig) of a spec file; every ``__post_init__`` check runs."""
    return typed_spec(json.loads(Path(path).read_text()))


def typed_spec(spec: dict):
    """(ChatLoopConfig, BenchmarkConfig) of a spec's plain ``config`` and ``benchmark`` dicts."""
    from omegaconf import OmegaConf

    from chatloop.config import ChatLoopConfig

    from .config import BenchmarkConfig

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ChatLoopConfig), spec["config"]))
    bench = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchmarkConfig), spec["benchmark"]))
    return cfg, bench


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.run_one SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec_path, result_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        from .measure import run

        cfg, bench = load_spec(spec_path)
        result = run(cfg, bench)
        code = 0
    except Exception as e:  # recorded in the results file; the sweep goes on
        traceback.print_exc()
        result, code = {"error": f"{type(e).__name__}: {e}"}, 1
    Path(result_path).write_text(json.dumps(result))
    return code


if __name__ == "__main__":  # the guard matters: ChatLoop spawns its workers from this process
    sys.exit(main())
