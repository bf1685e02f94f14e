"""tinymeg::swiglu: y = silu(gate) * up, and its backward, tinymeg::swiglu_backward.

    swiglu(gate, up) -> y                                     (y has gate's dtype)
    swiglu_backward(grad_y, gate, up) -> (grad_gate, grad_up)

Llama's MLP computes down(silu(gate(x)) * up(x)). Unfused, silu(gate) is written to memory and
read back by the product (and kept for backward); fused, both happen in one pass, and backward
recomputes the sigmoid from the saved gate and up instead of keeping silu(gate) too.

Sharding (DTensor): elementwise, so any dim may be sharded, gate and up alike (under tensor
parallelism both are column-parallel outputs, sharded on the hidden dim). No communication.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from . import _triton, paths, precision
from .autotune import dispatch
from .norm import candidates

# Elements per chunk in the chunked kernels: ~256 KB of activations, so that what one pass
# writes is still in cache when the next reads it.
CHUNK_ELEMENTS = 1 << 16


def _check(gate: Tensor, up: Tensor) -> None:
    if not (gate.is_floating_point() and up.is_floating_point()):
        raise TypeError(f"swiglu: gate and up must be floating point, got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")


# ---- implementations (contiguous local tensors in, new tensors out) ----

def forward_ref(gate, up):
    """Plain aten in float32: silu written out."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def forward_fast(gate, up):
    """aten's SiLU, then the product in place: two passes, one allocation."""
    return F.silu(gate).mul_(up)


def forward_chunked(gate, up, chunk_elements=CHUNK_ELEMENTS):
    """Chunks that fit in cache: the product reads silu(gate) back from cache, not memory."""
    g, u = gate.reshape(-1), up.reshape(-1)
    y = torch.empty_like(g)
    for s in range(0, g.numel(), chunk_elements):
        part = slice(s, s + chunk_elements)
        torch.mul(F.silu(g[part]), u[part], out=y[part])
    return y.view(gate.shape)


def _grads(dy, g, u):
    """(d/d gate, d/d up) of silu(g) * u: silu' = s (1 + g (1 - s)), s = sigmoid(g)."""
    s = torch.sigmoid(g)
    silu = g * s
    return dy * u * s * (1 + g * (1 - s)), dy * silu


def backward_ref(dy, gate, up):
    dg, du = _grads(dy.float(), gate.float(), up.float())
    return dg.to(gate.dtype), du.to(up.dtype)


def backward_chunked(dy, gate, up, chunk_elements=CHUNK_ELEMENTS):
    g, u, d = gate.reshape(-1), up.reshape(-1), dy.reshape(-1)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    for s in range(0, g.numel(), chunk_elements):
        part = slice(s, s + chunk_elements)
        dg[part], du[part] = _grads(d[part], g[part], u[part])
    return dg.view(gate.shape), du.view(up.shape)


FORWARD = {"ref": forward_ref, "fast": forward_fast, "chunked": forward_chunked}
BACKWARD = {"ref": backward_ref, "chunked": backward_chunked}
if _triton.AVAILABLE:
    FORWARD["triton"], BACKWARD["triton"] = _triton.swiglu_forward, _triton.swiglu_backward

# Used when the tuner is off or cannot time; aten-based (see _triton.py for why not triton).
DEFAULT_FORWARD, DEFAULT_BACKWARD = "fast", "chunked"


# ---- the ops ----

@torch.library.custom_op("tinymeg::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    _check(gate, up)
    return dispatch("swiglu", candidates(FORWARD, gate), (gate.contiguous(), up.contiguous()), DEFAULT_FORWARD)


@swiglu_op.register_fake
def _(gate, up):
    _check(gate, up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("tinymeg::swiglu_backward", mutates_args=())
def swiglu_backward_op(grad_y: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    _check(gate, up)
    args = (grad_y.contiguous(), gate.contiguous(), up.contiguous())
    return dispatch("swiglu_backward", candidates(BACKWARD, gate), args, DEFAULT_BACKWARD)


@swiglu_backward_op.register_fake
def _(grad_y, gate, up):
    _check(gate, up)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # gate and up: silu(gate) is recomputed, not stored


def _backward(ctx, grad_y):
    gate, up = ctx.saved_tensors
    dg, du = torch.ops.tinymeg.swiglu_backward(grad_y, gate, up)
    need_g, need_u = ctx.needs_input_grad
    return dg if need_g else None, du if need_u else None


swiglu_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast, as silu(gate) * up (on neither device's list): the inputs' own dtypes.
precision.register_autocast(swiglu_op, precision.BACKWARD)
precision.register_autocast(swiglu_backward_op, precision.BACKWARD)


# ---- sharding: [outputs...], [inputs...] ----

@register_sharding(torch.ops.tinymeg.swiglu.default)
def _(gate, up):
    return [([Replicate()], [Replicate(), Replicate()])] + [([Shard(d)], [Shard(d), Shard(d)])
                                                             for d in range(gate.ndim)]


@register_sharding(torch.ops.tinymeg.swiglu_backward.default)
def _(grad_y, gate, up):
    return [([Replicate()] * 2, [Replicate()] * 3)] + [([Shard(d)] * 2, [Shard(d)] * 3) for d in range(gate.ndim)]


# ---- the wrapper: the plain path or the op (paths.py) ----

def plain_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """What a model written with F.silu runs: aten's SiLU, a product, and their autograd."""
    _check(gate, up)
    return F.silu(gate) * up


def _op_swiglu(gate, up):
    return torch.ops.tinymeg.swiglu(gate, up)


PATHS = {"plain": plain_swiglu, "op": _op_swiglu}
# As bias_gelu's: the op saves a pass over memory, which pays for its boundary only at large
# shapes; the tuner finds where (and inductor fuses the plain path under compile).
DEFAULT_PATH = "plain"


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, by the plain path or tinymeg::swiglu (one pass), whichever the tuner
    finds faster (see paths.py)."""
    args = (gate, up)
    return PATHS[paths.choose("swiglu", PATHS, args, DEFAULT_PATH)](*args)
