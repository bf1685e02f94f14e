"""The autotuner's check that a candidate computes what the default computes, before it is timed.

Each candidate runs once on the inputs, the default first. A candidate that raises, or whose
outputs are shaped otherwise or differ beyond rounding, is left out: a broken kernel never wins,
and a warning about one means a bug. How far is rounding:

- fp32 (and fp64): the default's outputs are the reference, within ``TOLERANCE`` of each
  output's largest value (float reassociation is ~1e-7 of it; a bug is ~1).
- bf16/fp16 inputs: the reference is the default run on float32 copies of the inputs, and a
  candidate may be off it by the low precision's tolerance plus twice the default's own error.
  aten's bf16 kernels can be far from float32 math (LayerNorm's weight gradient by tens of
  percent where rows have large means), and a candidate more exact than the default must not be
  reported as disagreeing with it. The outputs' tolerance is that of the least precise dtype
  among the inputs and outputs (a bf16 LayerNorm's float32 statistics carry bf16 rounding).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch.utils._pytree import tree_flatten

TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def checked(candidates: Mapping[str, Callable], args: tuple, default: str, verify: bool,
            untuned: Callable[[], ContextManager]) -> tuple[dict[str, Callable], dict[str, str]]:
    """(the candidates that run on args and agree with the default, {name: why} for the others).
    ``untuned()``: a block in which ops take their defaults (the float32 reference run tunes
    nothing); ``verify`` False: only whether each runs."""
    ok, left_out, expected = {}, {}, None
    for name in sorted(candidates, key=lambda k: k != default):
        try:
            out = candidates[name](*args)
        except Exception as e:  # noqa: BLE001 - a broken candidate must not break training
            left_out[name] = f"failed ({first_line(e)})"
            continue
        if name == default:
            expected = out if verify else None
            if expected is not None:
                reference, allowed = _reference(candidates[default], args, expected, untuned)
        elif expected is not None and (why := _disagreement(out, expected, reference, allowed)):
            left_out[name] = f"disagrees with {default!r} ({why})"
            continue
        ok[name] = candidates[name]
    return ok, left_out


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _reference(default_fn: Callable, args: tuple, expected, untuned) -> tuple[Any, list[float]]:
    """What candidates' outputs are compared with, and each output's allowed error (module doc)."""
    tol = _tolerance(args, expected)
    if any(isinstance(a, torch.Tensor) and a.dtype in LOW_PRECISION for a in args):
        try:
            with untuned():
                exact = default_fn(*_in_float32(args))
        except Exception:  # noqa: BLE001 - then the check is against the default's own outputs
            exact = None
        if exact is not None and len(tree_flatten(exact)[0]) == len(tree_flatten(expected)[0]):
            return exact, [tol + 2 * e for e in _errors(expected, exact)]
    return expected, [tol] * len(tree_flatten(expected)[0])


def _tolerance(args: tuple, expected) -> float:
    dtypes = {t.dtype for t in tree_flatten((args, expected))[0]
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return max((TOLERANCE.get(d, TOLERANCE[torch.bfloat16]) for d in dtypes), default=TOLERANCE[torch.float32])


def _in_float32(args: tuple) -> tuple:
    """args with every bf16/fp16 tensor as a float32 copy (requiring grad where it did)."""
    return tuple(a.detach().float().requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) and a.dtype in LOW_PRECISION else a for a in args)


def _disagreement(out, expected, reference, allowed: list[float]) -> str | None:
    """Why out is not the default's expected (shaped alike, each output within its allowed error
    of the reference), or None."""
    if (why := _mismatch(out, expected)) is not None:
        return why
    for err, limit in zip(_errors(out, reference), allowed):
        if err > limit:
            return f"an output off by {err:.3g} of its largest value, {limit:.3g} allowed"
    return None


def _mismatch(out, expected) -> str | None:
    """Why out is not shaped as expected (structure, shapes, dtypes), or None."""
    fa, fb = tree_flatten(out)[0], tree_flatten(expected)[0]
    if len(fa) != len(fb):
        return f"{len(fa)} outputs, not {len(fb)}"
    for i, (x, y) in enumerate(zip(fa, fb)):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return f"output {i} is {type(x).__name__}, not {type(y).__name__}"
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or x.dtype != y.dtype):
            return f"output {i} is {x.dtype}{list(x.shape)}, not {y.dtype}{list(y.shape)}"
    return None


def _errors(out, reference) -> list[float]:
    """Each output tensor's largest |difference| from the reference's, relative to the reference's
    largest finite value (at least 1); inf where one has a NaN or inf the other has not."""
    errors = []
    for x, y in zip(tree_flatten(out)[0], tree_flatten(reference)[0]):
        if isinstance(x, torch.Tensor) and x.numel():
            x, y = x.float(), y.float()
            same = (x == y) | (x.isnan() & y.isnan())  # equal infinities, NaNs in the same places
            diff = torch.where(same, 0.0, (x - y).abs()).nan_to_num(nan=math.inf).max().item()
            errors.append(diff / max(1.0, y.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max().item()))
    return errors
