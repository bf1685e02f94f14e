"""tinymeg::bias_gelu: y = gelu_tanh(x + bias), and its backward, tinymeg::bias_gelu_backward.

    bias_gelu(x, bias) -> y                                  (y has x's dtype)
    bias_gelu_backward(grad_y, x, bias) -> (grad_x, grad_bias)

GPT-2's MLP computes gelu(x W^T + b). Unfused, x W^T + b is written to memory, read back by
gelu, and saved for backward. Fused, the bias add happens on the fly in the same pass as the
GELU, and backward recomputes x + bias from the saved x (one add) instead of keeping both.

Sharding (DTensor): elementwise, so any dim may be sharded; when x is sharded on its last dim
the bias is sharded alongside (Shard(0)), otherwise replicated. No communication. grad_bias is
a sum over rows: Partial() when rows are sharded, Shard(0) when columns are.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from . import _triton, paths, precision
from .autotune import dispatch

_K = math.sqrt(2.0 / math.pi)
# Rows per chunk in the chunked kernels: ~256 KB of activations, so that x + bias is still in
# cache when the GELU reads it back.
CHUNK_ELEMENTS = 1 << 16


def _check(x: Tensor, bias: Tensor) -> None:
    if x.dim() < 1:
        raise ValueError("bias_gelu: x must have at least one dim")
    if not (x.is_floating_point() and bias.is_floating_point()):
        raise TypeError(f"bias_gelu: x and bias must be floating point, got {x.dtype} and {bias.dtype}")
    if tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias must have shape ({x.shape[-1]},) to match x's last dim, "
                         f"got {tuple(bias.shape)}")


# ---- implementations (contiguous local tensors in, new tensors out) ----

def forward_ref(x, bias):
    """Plain aten in float32: the tanh approximation written out."""
    h = x.float() + bias.float()
    return (0.5 * h * (1.0 + torch.tanh(_K * (h + 0.044715 * h * h * h)))).to(x.dtype)


def forward_fast(x, bias):
    """aten's add, then its GELU in place on the sum: two passes, one allocation."""
    y = torch.add(x, bias).to(x.dtype)
    return torch.ops.aten.gelu_(y, approximate="tanh")


def forward_chunked(x, bias, chunk_elements=CHUNK_ELEMENTS):
    """Row chunks that fit in cache: the GELU reads x + bias back from cache, not memory."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty_like(x2)
    rows = max(1, chunk_elements // max(1, x2.shape[1]))
    for s in range(0, x2.shape[0], rows):
        yc = y[s:s + rows]
        torch.add(x2[s:s + rows], bias, out=yc)
        torch.ops.aten.gelu_(yc, approximate="tanh")
    return y.view(x.shape)


def backward_ref(dy, x, bias):
    C = x.shape[-1]
    h = x.float() + bias.float()
    t = torch.tanh(_K * (h + 0.044715 * h * h * h))
    dgelu = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _K * (1.0 + 3 * 0.044715 * h * h)
    dx = dy.float() * dgelu
    return dx.to(x.dtype), dx.reshape(-1, C).sum(0).to(bias.dtype)


def backward_fast(dy, x, bias):
    C = x.shape[-1]
    dx = torch.ops.aten.gelu_backward(dy, torch.add(x, bias).to(x.dtype), approximate="tanh")
    return dx, dx.reshape(-1, C).sum(0, dtype=torch.float32).to(bias.dtype)


def backward_chunked(dy, x, bias, chunk_elements=CHUNK_ELEMENTS):
    C = x.shape[-1]
    x2, dy2 = x.reshape(-1, C), dy.reshape(-1, C)
    dx = torch.empty_like(x2)
    db = torch.zeros(C, dtype=torch.float32, device=x.device)
    rows = max(1, chunk_elements // C)
    h = torch.empty((min(rows, x2.shape[0]), C), dtype=x.dtype, device=x.device)
    for s in range(0, x2.shape[0], rows):
        n = min(rows, x2.shape[0] - s)
        hc, dxc = h[:n], dx[s:s + n]
        torch.add(x2[s:s + n], bias, out=hc)
        torch.ops.aten.gelu_backward.grad_input(dy2[s:s + n], hc, approximate="tanh", grad_input=dxc)
        db += dxc.sum(0, dtype=torch.float32)
    return dx.view(x.shape), db.to(bias.dtype)


FORWARD = {"ref": forward_ref, "fast": forward_fast, "chunked": forward_chunked}
BACKWARD = {"ref": backward_ref, "fast": backward_fast, "chunked": backward_chunked}
if _triton.AVAILABLE:
    FORWARD["triton"], BACKWARD["triton"] = _triton.bias_gelu_forward, _triton.bias_gelu_backward

# Used when the tuner is off or cannot time; aten-based (see _triton.py for why not triton).
DEFAULT_FORWARD, DEFAULT_BACKWARD = "fast", "fast"


def candidates(table: dict, x: Tensor) -> dict:
    """The implementations in table that can run on x (triton: CUDA tensors only)."""
    return {k: f for k, f in table.items() if k != "triton" or _triton.supports(x)}


# ---- the ops ----

@torch.library.custom_op("tinymeg::bias_gelu", mutates_args=())
def bias_gelu_op(x: Tensor, bias: Tensor) -> Tensor:
    _check(x, bias)
    return dispatch("bias_gelu", candidates(FORWARD, x), (x.contiguous(), bias.contiguous()), DEFAULT_FORWARD)


@bias_gelu_op.register_fake
def _(x, bias):
    _check(x, bias)
    return x.new_empty(x.shape)


@torch.library.custom_op("tinymeg::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(grad_y: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    _check(x, bias)
    args = (grad_y.contiguous(), x.contiguous(), bias.contiguous())
    return dispatch("bias_gelu_backward", candidates(BACKWARD, x), args, DEFAULT_BACKWARD)


@bias_gelu_backward_op.register_fake
def _(grad_y, x, bias):
    _check(x, bias)
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # x and bias: x + bias is recomputed, not stored


def _backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    dx, db = torch.ops.tinymeg.bias_gelu_backward(grad_y, x, bias)
    need_x, need_b = ctx.needs_input_grad
    return dx if need_x else None, db if need_b else None


bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast: the bias add of a matmul (addmm adds it in the autocast dtype), then GELU on that.
AUTOCAST = {"cpu": precision.LOWER, "cuda": precision.LOWER}
precision.register_autocast(bias_gelu_op, AUTOCAST)
precision.register_autocast(bias_gelu_backward_op, precision.BACKWARD)


# ---- sharding: [outputs...], [inputs...] ----

@register_sharding(torch.ops.tinymeg.bias_gelu.default)
def _(x, bias):
    last = x.ndim - 1
    rules = [([Replicate()], [Replicate(), Replicate()]), ([Shard(last)], [Shard(last), Shard(0)])]
    rules += [([Shard(d)], [Shard(d), Replicate()]) for d in range(last)]
    return rules


@register_sharding(torch.ops.tinymeg.bias_gelu_backward.default)
def _(grad_y, x, bias):
    last = x.ndim - 1
    rules = [([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate()]),
             ([Shard(last), Shard(0)], [Shard(last), Shard(last), Shard(0)])]
    rules += [([Shard(d), Partial()], [Shard(d), Shard(d), Replicate()]) for d in range(last)]
    return rules


# ---- the wrapper: the plain path or the op (paths.py) ----

def plain_bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """What a model written with F.gelu runs: an add, then aten's GELU, and their autograd."""
    _check(x, bias)
    return F.gelu(x + bias, approximate="tanh")


def _op_bias_gelu(x, bias):
    return torch.ops.tinymeg.bias_gelu(x, bias)


PATHS = {"plain": plain_bias_gelu, "op": _op_bias_gelu}
# Measured (recipes/bench.py ops): the op's kernels save a pass over memory, which pays for its
# boundary only at large shapes; the tuner finds where.
DEFAULT_PATH = "plain"


def bias_gelu_path(x: Tensor, bias: Tensor) -> str:
    """The path bias_gelu(x, bias) takes: "plain" or "op" (decided on the first call, then a lookup)."""
    return paths.choose("bias_gelu", PATHS, precision.cast_for(AUTOCAST, (x, bias)), DEFAULT_PATH)


def bias_gelu(x: Tensor, bias: Tensor | None) -> Tensor:
    """gelu(x + bias, approximate="tanh"), by the plain path or tinymeg::bias_gelu (one pass),
    whichever the tuner finds faster (see paths.py); plain GELU when bias is None."""
    if bias is None:
        return F.gelu(x, approximate="tanh")
    x, bias = precision.cast_for(AUTOCAST, (x, bias))  # under autocast: as the op casts them (precision.py)
    return PATHS[bias_gelu_path(x, bias)](x, bias)
