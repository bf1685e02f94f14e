"""Checks on index values (token ids, targets) that neither break torch.compile nor stall a GPU.

A sharded lookup cannot rely on the kernel's own bounds check: an id outside the vocabulary
is outside every rank's shard, and masking would turn it into a zero vector silently. So the
values are checked, in a way that fits where the code runs:

- eager on CPU: a plain check, and an error that names the first bad value;
- on CUDA, or while torch.compile traces: ``torch._assert_async``, which fails the step
  without a host sync and without a data-dependent Python branch (a graph break under
  fullgraph=True). Its message cannot hold the value, so it names the range and the fix.
"""
from __future__ import annotations

import torch


def check_index(t: torch.Tensor, upper: int, *, what: str, fix: str, ignore: int | None = None,
                error: type[Exception] = ValueError) -> None:
    """Every element of t must be in [0, upper) or equal ``ignore``."""
    bad = (t < 0) | (t >= upper)
    if ignore is not None:
        bad &= t != ignore
    allowed = f"[0, {upper})" + ("" if ignore is None else f" or the ignore index {ignore}")
    if t.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"a {what} is outside {allowed}: {fix}")
    elif bad.any():
        raise error(f"{what} {t[bad][0].item()} is outside {allowed}: {fix}")
