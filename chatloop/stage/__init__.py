"""A stage at work, in whichever process holds it (a worker, or the coordinator in process): its model slice and
KV pool running micro-batches (:class:`StageRunner`), what it takes to build one (:class:`StageSpec`,
:func:`build_stage_runner`), the KV capacity check (:func:`kv_blocks`), and test hooks that make it misbehave once
(:mod:`.fault_injection`). The coordinator's engine (:mod:`chatloop.engine`) never builds a stage itself.
"""

from .runner import CapacityError, StageRunner, StageSpec, build_stage_runner, kv_blocks, kv_pools, stage_specs

__all__ = ["CapacityError", "StageRunner", "StageSpec", "build_stage_runner", "kv_blocks", "kv_pools", "stage_specs"]
