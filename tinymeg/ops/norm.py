"""tinymeg::layer_norm over the last dim, and its backward, tinymeg::layer_norm_backward.

    layer_norm(x, weight?, bias?, eps) -> (y, mean, rstd)
    layer_norm_backward(grad_y, x, weight?, mean, rstd) -> (grad_x, grad_weight, grad_bias)

mean and rstd (shape x.shape[:-1], float32 whatever x's dtype) are returned so that backward
needs no second pass over x to recompute them. grad_weight and grad_bias are always returned
(for a missing weight, the gradient w.r.t. an implicit weight of ones), which keeps the schema
free of optional outputs; autograd drops what no input asked for.

Sharding (DTensor): any dim but the last may be sharded, weight and bias replicated; nothing
is communicated. In backward, grad_weight and grad_bias are sums over the sharded rows, so
they come out Partial() (summed when someone asks for them whole).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from . import _triton, paths, precision
from .autotune import dispatch


def _check(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"layer_norm: x must be floating point, got {x.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (x.shape[-1],):
            raise ValueError(f"layer_norm: {name} must have shape ({x.shape[-1]},) to match x's last "
                             f"dim, got {tuple(p.shape)}")


def _param_dtype(x: Tensor, weight: Tensor | None) -> torch.dtype:
    return x.dtype if weight is None else weight.dtype


# ---- implementations (contiguous local tensors in, new tensors out) ----

def forward_ref(x, weight, bias, eps):
    """Plain aten, every step spelled out, in float32."""
    xf = x.float()
    mean = xf.mean(-1)
    xc = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
    y = xc * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), mean, rstd


def forward_fast(x, weight, bias, eps):
    """aten's fused kernel: one read of x, one write of y."""
    y, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
    return y, mean.squeeze(-1).float(), rstd.squeeze(-1).float()


def backward_ref(dy, x, weight, mean, rstd):
    C = x.shape[-1]
    dyf = dy.float()
    xhat = (x.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = dyf if weight is None else dyf * weight.float()
    # d/dx of (x - mean) * rstd, applied to g: the two means remove g's components along
    # the directions that normalisation takes out (the constant and xhat itself).
    dx = rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = (dyf * xhat).reshape(-1, C).sum(0)
    db = dyf.reshape(-1, C).sum(0)
    pdt = _param_dtype(x, weight)
    return dx.to(x.dtype), dw.to(pdt), db.to(pdt)


def backward_fast(dy, x, weight, mean, rstd):
    C = x.shape[-1]
    if weight is None:  # aten's kernel only returns grad_weight for a real weight
        return backward_ref(dy, x, weight, mean, rstd)
    # aten wants the statistics in x's dtype (it keeps bf16 ones for bf16 inputs)
    stats = mean.to(x.dtype).unsqueeze(-1), rstd.to(x.dtype).unsqueeze(-1)
    dx, dw, _ = torch.ops.aten.native_layer_norm_backward(dy, x, [C], *stats, weight, None,
                                                          [True, True, False])
    db = dy.reshape(-1, C).sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dw, db


FORWARD = {"ref": forward_ref, "fast": forward_fast}
BACKWARD = {"ref": backward_ref, "fast": backward_fast}
if _triton.AVAILABLE:
    FORWARD["triton"], BACKWARD["triton"] = _triton.layer_norm_forward, _triton.layer_norm_backward

# Used when the tuner is off or cannot time; aten-based (see _triton.py for why not triton).
DEFAULT_FORWARD, DEFAULT_BACKWARD = "fast", "fast"


def candidates(table: dict, x: Tensor) -> dict:
    """The implementations in table that can run on x (triton: CUDA tensors only)."""
    return {k: f for k, f in table.items() if k != "triton" or _triton.supports(x)}


# ---- the ops ----

@torch.library.custom_op("tinymeg::layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias)
    args = (x.contiguous(), weight, bias, eps)
    return dispatch("layer_norm", candidates(FORWARD, x), args, DEFAULT_FORWARD)


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    _check(x, weight, bias)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("tinymeg::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                           rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, None)
    args = (grad_y.contiguous(), x.contiguous(), weight, mean.contiguous(), rstd.contiguous())
    return dispatch("layer_norm_backward", candidates(BACKWARD, x), args, DEFAULT_BACKWARD)


@layer_norm_backward_op.register_fake
def _(grad_y, x, weight, mean, rstd):
    _check(x, weight, None)
    pdt = _param_dtype(x, weight)
    return x.new_empty(x.shape), x.new_empty(x.shape[-1:], dtype=pdt), x.new_empty(x.shape[-1:], dtype=pdt)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # grad_y may then be None: see _backward
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if grad_y is None:  # only mean/rstd were used downstream: they carry no gradient
        return None, None, None, None
    dx, dw, db = torch.ops.tinymeg.layer_norm_backward(grad_y, x, weight, mean, rstd)
    need_x, need_w, need_b, _ = ctx.needs_input_grad
    return (dx if need_x else None, dw if need_w and weight is not None else None,
            db.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None, None)


layer_norm_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast, as aten's layer_norm: float32 on CUDA, the inputs' dtypes on the CPU.
AUTOCAST = {"cpu": precision.KEEP, "cuda": precision.FP32}
precision.register_autocast(layer_norm_op, AUTOCAST)
precision.register_autocast(layer_norm_backward_op, precision.BACKWARD)


# ---- sharding: every placement lists [outputs...] then [inputs...] (None for non-tensors) ----

def _r(t):
    return None if t is None else Replicate()


@register_sharding(torch.ops.tinymeg.layer_norm.default)
def _(x, weight, bias, eps):
    rules = [([Replicate()] * 3, [Replicate(), _r(weight), _r(bias), None])]
    for d in range(x.ndim - 1):  # any dim but the normalised one
        rules.append(([Shard(d)] * 3, [Shard(d), _r(weight), _r(bias), None]))
    return rules


@register_sharding(torch.ops.tinymeg.layer_norm_backward.default)
def _(grad_y, x, weight, mean, rstd):
    rules = [([Replicate()] * 3, [Replicate(), Replicate(), _r(weight), Replicate(), Replicate()])]
    for d in range(x.ndim - 1):
        rules.append(([Shard(d), Partial(), Partial()], [Shard(d), Shard(d), _r(weight), Shard(d), Shard(d)]))
    return rules


# ---- the wrapper: the plain path or the op (paths.py) ----

def plain_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """What nn.LayerNorm runs: aten's native_layer_norm and its autograd, no op boundary."""
    _check(x, weight, bias)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _op_layer_norm(x, weight, bias, eps):
    return torch.ops.tinymeg.layer_norm(x, weight, bias, eps)[0]


PATHS = {"plain": plain_layer_norm, "op": _op_layer_norm}
# aten's kernel is the op's "fast" kernel too: the op only adds its boundary, unless a faster
# kernel (triton, on a GPU) is timed faster.
DEFAULT_PATH = "plain"


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over x's last dim (F.layer_norm with normalized_shape=(x.shape[-1],)), by the
    plain path or tinymeg::layer_norm, whichever the tuner finds faster (see paths.py)."""
    args = precision.cast_for(AUTOCAST, (x, weight, bias, eps))  # under autocast: as the op casts them
    return PATHS[paths.choose("layer_norm", PATHS, args, DEFAULT_PATH)](*args)


class LayerNorm(torch.nn.LayerNorm):
    """A drop-in nn.LayerNorm (same parameters, init, state_dict keys) computed by
    tinymeg.ops.layer_norm when it normalises one dim, by F.layer_norm otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)
