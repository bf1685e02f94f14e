"""tinymeg::rms_norm over the last dim, and its backward, tinymeg::rms_norm_backward.

    rms_norm(x, weight?, eps) -> (y, rstd)                y = x * rstd * weight
    rms_norm_backward(grad_y, x, weight?, rstd) -> (grad_x, grad_weight)

Llama's norm: no mean is taken out and there is no bias; ``rstd = 1 / sqrt(mean(x^2) + eps)``
per row (shape x.shape[:-1], float32 whatever x's dtype) is returned so that backward needs no
second pass over x to recompute it. grad_weight is always returned (for a missing weight, the
gradient w.r.t. an implicit weight of ones), which keeps the schema free of optional outputs.

Sharding (DTensor): any dim but the last may be sharded, weight replicated; nothing is
communicated. In backward, grad_weight is a sum over the sharded rows, so it comes out
Partial() (summed when someone asks for it whole). The same rules as layer_norm's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from . import _triton, paths, precision
from .autotune import dispatch
from .norm import candidates

# Rows per chunk in the chunked kernels: ~256 KB of activations, so that a chunk of x is still
# in cache when it is read the second time (for y, after its statistics).
CHUNK_ELEMENTS = 1 << 16


def _check(x: Tensor, weight: Tensor | None) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: x must be floating point, got {x.dtype}")
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},) to match x's last dim, "
                         f"got {tuple(weight.shape)}")


def _param_dtype(x: Tensor, weight: Tensor | None) -> torch.dtype:
    return x.dtype if weight is None else weight.dtype


# ---- implementations (contiguous local tensors in, new tensors out) ----

def forward_ref(x, weight, eps):
    """Plain aten, every step spelled out, in float32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    y = xf * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype), rstd


def forward_chunked(x, weight, eps, chunk_elements=CHUNK_ELEMENTS):
    """Row chunks that fit in cache: x is read from memory once, its square never stored whole."""
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    rows = max(1, chunk_elements // C)
    w = None if weight is None else weight.float()
    for s in range(0, x2.shape[0], rows):
        xc = x2[s:s + rows].float()   # (x itself when it is float32: never written)
        r = torch.rsqrt(xc.square().mean(-1, keepdim=True).add_(eps))
        rstd[s:s + rows] = r.squeeze(-1)
        y[s:s + rows] = xc * r if w is None else (xc * r).mul_(w)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def forward_fast(x, weight, eps):
    """aten's fused kernel (torch._fused_rms_norm): one read of x, one write of y."""
    y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
    return y, rstd.squeeze(-1).float()


def backward_ref(dy, x, weight, rstd):
    C = x.shape[-1]
    dyf = dy.float()
    xhat = x.float() * rstd.unsqueeze(-1)
    g = dyf if weight is None else dyf * weight.float()
    # d/dx of x * rstd applied to g: rstd * (g - xhat * mean(g * xhat)), the component along xhat
    # being what the normalisation takes out.
    dx = rstd.unsqueeze(-1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = (dyf * xhat).reshape(-1, C).sum(0)
    return dx.to(x.dtype), dw.to(_param_dtype(x, weight))


def backward_chunked(dy, x, weight, rstd, chunk_elements=CHUNK_ELEMENTS):
    C = x.shape[-1]
    x2, dy2, r2 = x.reshape(-1, C), dy.reshape(-1, C), rstd.reshape(-1, 1)
    dx = torch.empty_like(x2)
    dw = torch.zeros(C, dtype=torch.float32, device=x.device)
    w = None if weight is None else weight.float()
    rows = max(1, chunk_elements // C)
    for s in range(0, x2.shape[0], rows):
        dyc = dy2[s:s + rows].float()  # (the inputs themselves when float32: never written)
        xhat = x2[s:s + rows].float() * r2[s:s + rows]
        dw += (dyc * xhat).sum(0)
        g = dyc if w is None else dyc * w
        dot = (g * xhat).mean(-1, keepdim=True)
        dx[s:s + rows] = (g - xhat.mul_(dot)).mul_(r2[s:s + rows])
    return dx.view(x.shape), dw.to(_param_dtype(x, weight))


FORWARD = {"ref": forward_ref, "fast": forward_fast, "chunked": forward_chunked}
# (aten's _fused_rms_norm_backward has no CPU kernel in torch 2.13)
BACKWARD = {"ref": backward_ref, "chunked": backward_chunked}
if _triton.AVAILABLE:
    FORWARD["triton"], BACKWARD["triton"] = _triton.rms_norm_forward, _triton.rms_norm_backward

# Used when the tuner is off or cannot time; aten-based (see _triton.py for why not triton).
DEFAULT_FORWARD, DEFAULT_BACKWARD = "fast", "chunked"


# ---- the ops ----

@torch.library.custom_op("tinymeg::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    _check(x, weight)
    return dispatch("rms_norm", candidates(FORWARD, x), (x.contiguous(), weight, eps), DEFAULT_FORWARD)


@rms_norm_op.register_fake
def _(x, weight, eps):
    _check(x, weight)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tinymeg::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor) -> tuple[Tensor, Tensor]:
    _check(x, weight)
    args = (grad_y.contiguous(), x.contiguous(), weight, rstd.contiguous())
    return dispatch("rms_norm_backward", candidates(BACKWARD, x), args, DEFAULT_BACKWARD)


@rms_norm_backward_op.register_fake
def _(grad_y, x, weight, rstd):
    _check(x, weight)
    return x.new_empty(x.shape), x.new_empty(x.shape[-1:], dtype=_param_dtype(x, weight))


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # grad_y may then be None: only rstd was used downstream
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        return None, None, None
    dx, dw = torch.ops.tinymeg.rms_norm_backward(grad_y, x, weight, rstd)
    need_x, need_w, _ = ctx.needs_input_grad
    return dx if need_x else None, dw if need_w and weight is not None else None, None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast, as aten's rms_norm (on neither device's list): the inputs' own dtypes.
precision.register_autocast(rms_norm_op, precision.BACKWARD)
precision.register_autocast(rms_norm_backward_op, precision.BACKWARD)


# ---- sharding: every placement lists [outputs...] then [inputs...] (None for non-tensors) ----

def _r(t):
    return None if t is None else Replicate()


@register_sharding(torch.ops.tinymeg.rms_norm.default)
def _(x, weight, eps):
    rules = [([Replicate()] * 2, [Replicate(), _r(weight), None])]
    for d in range(x.ndim - 1):  # any dim but the normalised one
        rules.append(([Shard(d)] * 2, [Shard(d), _r(weight), None]))
    return rules


@register_sharding(torch.ops.tinymeg.rms_norm_backward.default)
def _(grad_y, x, weight, rstd):
    rules = [([Replicate()] * 2, [Replicate(), Replicate(), _r(weight), Replicate()])]
    for d in range(x.ndim - 1):
        rules.append(([Shard(d), Partial()], [Shard(d), Shard(d), _r(weight), Shard(d)]))
    return rules


# ---- the wrapper: the plain path or the op (paths.py) ----

def plain_rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """What nn.RMSNorm runs: aten's rms_norm and its autograd, no op boundary."""
    _check(x, weight)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _op_rms_norm(x, weight, eps):
    return torch.ops.tinymeg.rms_norm(x, weight, eps)[0]


PATHS = {"plain": plain_rms_norm, "op": _op_rms_norm}
# As layer_norm's: inductor fuses aten's norm with its neighbours, which it cannot do through
# an opaque op; the tuner finds where the op's one-pass kernels pay for its boundary.
DEFAULT_PATH = "plain"


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over x's last dim (F.rms_norm with normalized_shape=(x.shape[-1],)), by the plain
    path or tinymeg::rms_norm, whichever the tuner finds faster (see paths.py)."""
    args = (x, weight, eps)
    return PATHS[paths.choose("rms_norm", PATHS, args, DEFAULT_PATH)](*args)


class RMSNorm(torch.nn.RMSNorm):
    """A drop-in nn.RMSNorm (same parameter, init, state_dict key) computed by
    tinymeg.ops.rms_norm when it normalises one dim, by F.rms_norm otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps  # nn.RMSNorm's default
        if len(self.normalized_shape) != 1:
            return F.rms_norm(x, self.normalized_shape, self.weight, eps)
        return rms_norm(x, self.weight, eps)
