"""The plain path or the custom op: the choice each tinymeg op's wrapper makes.

A custom op pays for its boundary on every call: the dispatcher, an autograd Function, a
Python kernel, and the same again for its backward op (about 20-30 us a call on a CPU). At
small shapes that outweighs anything a fused kernel saves, and a model written with plain
``F.layer_norm`` / ``F.gelu`` / ``F.cross_entropy`` is faster. So each wrapper
(``tinymeg.ops.layer_norm``, ``bias_gelu``, ``linear_cross_entropy``) has two paths:

- ``plain``: the aten ops such a model runs, with aten's autograd (the same math as the op's
  reference kernel: same checks and errors, same result to float reassociation);
- ``op``: ``torch.ops.tinymeg.*``, whose kernel the tuner picks among its implementations;

and asks the tuner which is faster for these inputs. Each path is timed as a model runs it:
forward and, when a gradient is wanted, backward, through the wrapper, so the dispatch cost is
in what is timed. Training (gradients wanted) and evaluation (no gradient) are separate keys.

- ``TINYMEG_OP_IMPL=layer_norm=plain`` forces the plain path, ``=op`` the op (kernel tuned),
  ``=fast`` (any kernel name) the op with that kernel.
- Under ``torch.compile`` (and with tuning off, or on a rank outside ``synchronized()`` with an
  undecided key) each op takes its default path, chosen by what the bench measured: plain
  for layer_norm and bias_gelu (inductor fuses the aten ops with their neighbours; the custom
  op is opaque to it), and for the loss plain while its logits are small, the op beyond
  (``linear_cross_entropy.default_path``): there the op wins on memory and time.
- DTensor arguments always take the op: its registered sharding rule decides the communication.

The tuner times its candidates ``unobserved()``: outside whatever watches the model's forward, so
that activation checkpointing, which runs a block's forward again in backward (where the choice
is a lookup), sees the same ops both times.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Collection, Mapping

import torch
from torch.distributed.tensor import DTensor

from .. import compat
from .autotune import PATHS, forced_choice, get_default_tuner


@torch.compiler.assume_constant_result  # read once when traced; a graph never reads the environment
def forced_path(op: str) -> str | None:
    """The path TINYMEG_OP_IMPL forces for op: "plain", "op" (a kernel name implies it), or None."""
    forced = forced_choice(op)
    return None if forced is None else "plain" if forced == "plain" else "op"


def choose(op: str, paths: Mapping[str, Callable], args: tuple, default: str,
           untuned: Collection[str] = ()) -> str:
    """"plain" or "op" for op on args. ``paths`` maps both names to functions of args; ``untuned``
    names a path that may run only when forced (the loss's plain path, where its logits are big)."""
    if torch.compiler.is_compiling():
        return forced_path(op) or default
    name = _NAMES[op, torch.is_grad_enabled() and _requires_grad(args)]
    tuner = get_default_tuner()
    choice = tuner.cached(name, args)  # the hot path: about a microsecond once decided
    if choice is not None:
        return choice
    forced = forced_path(op)
    if forced is not None:
        tuner.remember(name, args, forced)
        return forced
    if any(isinstance(a, DTensor) for a in args):
        return "op"
    grad = name.endswith("fwd+bwd")
    candidates = {k: (forward_backward(f) if grad else f) for k, f in paths.items()}
    with unobserved():
        return tuner.choose(name, candidates, args, default, untuned)


@contextlib.contextmanager
def unobserved():
    """Run work that is not part of the model's computation (timing candidates, probing a shape)
    unseen by what observes that computation: no dispatch mode (selective activation
    checkpointing's cache, CommDebugMode, FlopCounterMode) and no saved-tensor hooks (activation
    checkpointing's, which would otherwise recompute a whole block when a candidate's backward
    runs) apply inside."""
    with compat.disable_dispatch_modes(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        yield


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _requires_grad(args: tuple) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


class _Names(dict):
    """(op, gradient wanted) -> the tuner's name of the path choice, e.g. "layer_norm:fwd+bwd"."""

    def __missing__(self, key):
        op, grad = key
        self[key] = f"{op}:{'fwd+bwd' if grad else 'fwd'}"
        return self[key]


_NAMES = _Names()


def forward_backward(fn: Callable) -> Callable:
    """fn as a training step runs it: forward, then backward from a fixed output gradient (the
    output itself: deterministic, no random numbers drawn). Returns the outputs and gradients, so
    that the tuner checks both paths agree on all of them."""
    def run(*args):
        leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a
                  for a in args]
        with torch.enable_grad():
            out = fn(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [o.detach() for o in outs])
        return outs, [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    return run


__all__ = ["PATHS", "choose", "forced_path", "forward_backward", "unobserved"]
