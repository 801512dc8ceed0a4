"""ChatLoop's benchmarks: pytest-benchmark micro-benchmarks, Hydra sweeps, baselines, reports.

    python -m pytest benchmarks --benchmark-only                           # micro-benchmarks (make bench)
    python -m benchmarks.sweep -m cluster.num_workers=1,2,4 batching.max_batch_size=1,4,16
    python -m benchmarks.sweep -m --config-name benchmark/baselines        # a sweep kept as a file
    python -m benchmarks.report multirun/.../results.jsonl --out report/
    python -m benchmarks.synthetic --stages 1 2 4 8                        # the schedule on sleeping stages
    python -m benchmarks.checkpoints tinyllama-1.1b                        # a random-weight checkpoint

Nothing here is part of the installed package or of the test suite's pass/fail; the tooling
itself is tested by ``tests/benchmarks``.
"""
