"""Test hooks that make a stage misbehave once, as a real fault would, without a line of the live path knowing.

:func:`fail_next` wraps the stage model's ``forward`` for one call, then puts it back: the runner computes, checks
and reports exactly as it does in service. Tests reach it through ``inject_failure`` on a pipeline (in process) or
``worker_host.fail_next`` over RPC.
"""

from __future__ import annotations

import time

import torch

__all__ = ["NON_FINITE", "fail_next"]

NON_FINITE = "non-finite"
"""``fail_next``'s message that makes the next micro-batch's outputs NaN, as damaged weights would."""


def fail_next(runner, message: str, stall_s: float = 0.0) -> None:
    """``runner``'s next micro-batch fails inside the stage (a wrong input shape, as a bug would make); with
    ``stall_s``, it computes only after that many seconds instead, and succeeds (a stage that stopped); with the
    message :data:`NON_FINITE`, its outputs are NaN (as damaged weights would make them)."""
    model = runner.stage

    def once(inputs: torch.Tensor, *args, **kwargs):
        del model.forward  # the class's own forward again, from the next call on
        if stall_s:
            time.sleep(stall_s)
        elif message != NON_FINITE:
            inputs = inputs[..., :-1] if inputs.dim() == 3 else inputs[:, :0]
        out = model.forward(inputs, *args, **kwargs)
        return torch.full_like(out, float("nan")) if message == NON_FINITE and not stall_s else out

    model.forward = once
