"""tinymeg::grouped_mm: one matmul per group of rows, and its backward, tinymeg::grouped_mm_backward.

    grouped_mm(x, w, offs) -> y            x (M, K), w (G, K, N), offs (G,) int32 -> y (M, N)
    grouped_mm_backward(grad_y, x, w, offs) -> (grad_x, grad_w)

Rows ``offs[g-1]:offs[g]`` of x (rows ``0:offs[0]`` for the first group) are multiplied by
``w[g]``; ``offs`` is the running sum of the group sizes and must end at M. A mixture of
experts computes all its experts in one call this way, on tokens sorted by expert, whatever
the number of tokens each expert got (zero included): dropless routing with no padding.

Why a custom op and not ``torch._grouped_mm`` directly: torch's kernel runs on the CPU in
float32, but its fake (meta) kernel accepts only bfloat16, so ``torch.compile`` cannot trace it
in float32; and it needs 16-byte aligned rows. As a tinymeg op it is opaque to the compiler
(the fake kernel below only says the output is (M, N)), and the autotuner picks between

- ``loop``: the reference, one ``mm`` per group on the split rows (sort-and-split);
- ``grouped``: ``torch._grouped_mm`` (16-byte aligned K and N; see ``_grouped_ok``).

Sharding (DTensor): everything replicated; or w sharded on N (``Shard(2)``: a column-parallel
expert) giving y ``Shard(1)``; or x and w sharded on K (row-parallel) giving a ``Partial`` y.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from . import precision
from .autotune import dispatch


def _check(x: Tensor, w: Tensor, offs: Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_mm: x must be (M, K) and w (G, K, N), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x has K={x.shape[1]} columns but w has K={w.shape[1]} rows per group")
    if offs.dim() != 1 or offs.shape[0] != w.shape[0] or offs.dtype != torch.int32:
        raise ValueError(f"grouped_mm: offs must be int32 of shape ({w.shape[0]},) (one end offset per "
                         f"group), got {offs.dtype} {tuple(offs.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"grouped_mm: x and w must have one dtype, got {x.dtype} and {w.dtype}")


def _bounds(offs: Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


# ---- implementations (contiguous local tensors in, new tensors out) ----

def forward_loop(x, w, offs):
    y = x.new_empty(x.shape[0], w.shape[2])
    for g, (a, b) in enumerate(_bounds(offs)):
        torch.mm(x[a:b], w[g], out=y[a:b])
    return y


def forward_grouped(x, w, offs):
    if not x.shape[0]:  # no rows (no token was routed here): torch's stride check may refuse them
        return forward_loop(x, w, offs)
    return torch._grouped_mm(x, w, offs=offs)


def backward_loop(dy, x, w, offs):
    dx, dw = torch.empty_like(x), torch.empty_like(w)
    for g, (a, b) in enumerate(_bounds(offs)):
        torch.mm(dy[a:b], w[g].T, out=dx[a:b])
        torch.mm(x[a:b].T, dy[a:b], out=dw[g])   # zeros for an empty group
    return dx, dw


def backward_grouped(dy, x, w, offs):
    if not x.shape[0]:
        return backward_loop(dy, x, w, offs)
    return torch._grouped_mm(dy, w.transpose(1, 2), offs=offs), torch._grouped_mm(x.T, dy, offs=offs)


FORWARD = {"loop": forward_loop, "grouped": forward_grouped}
BACKWARD = {"loop": backward_loop, "grouped": backward_grouped}
# recipes/bench.py moe: on this project's 2-core CPU the two are within noise of each other
# (+-8%, widths 128 to 768; README); grouped is one call, so it is the default where it can run.
DEFAULT = "grouped"


def _grouped_ok(x: Tensor, w: Tensor) -> bool:
    """torch._grouped_mm's constraints: on the CPU float32/bfloat16/float16, on CUDA bfloat16
    (the dtype its kernels are documented for; nothing else was tried on a GPU here), rows of K
    and N 16-byte aligned. (Its stride check also rejects the zero strides of an x with no rows:
    the grouped implementations hand those to the loop themselves.)"""
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if x.device.type == "cpu" else (torch.bfloat16,)
    return x.dtype in dtypes and all(d * x.element_size() % 16 == 0 for d in (w.shape[1], w.shape[2]))


# The rows of x (and of grad_y) are the tokens routed to these experts: their number differs
# from rank to rank and step to step, so it is not part of the tuner's key (every rank must ask
# the same question), nor of what decides the candidates.
DATA_DEPENDENT = {"grouped_mm": ((0, 0),), "grouped_mm_backward": ((0, 0), (1, 0))}


def candidates(table: dict, x: Tensor, w: Tensor) -> tuple[dict, str]:
    """(the implementations that can run on these inputs, the default among them): the same for
    any number of rows."""
    if _grouped_ok(x, w):
        return table, DEFAULT
    return {"loop": table["loop"]}, "loop"


# ---- the ops ----

@torch.library.custom_op("tinymeg::grouped_mm", mutates_args=())
def grouped_mm_op(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    _check(x, w, offs)
    cands, default = candidates(FORWARD, x, w)
    return dispatch("grouped_mm", cands, (x.contiguous(), w.contiguous(), offs.contiguous()), default,
                    data_dependent=DATA_DEPENDENT["grouped_mm"])


@grouped_mm_op.register_fake
def _(x, w, offs):
    _check(x, w, offs)
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("tinymeg::grouped_mm_backward", mutates_args=())
def grouped_mm_backward_op(grad_y: Tensor, x: Tensor, w: Tensor, offs: Tensor) -> tuple[Tensor, Tensor]:
    _check(x, w, offs)
    cands, default = candidates(BACKWARD, x, w)
    args = (grad_y.contiguous(), x.contiguous(), w.contiguous(), offs.contiguous())
    return dispatch("grouped_mm_backward", cands, args, default, data_dependent=DATA_DEPENDENT["grouped_mm_backward"])


@grouped_mm_backward_op.register_fake
def _(grad_y, x, w, offs):
    _check(x, w, offs)
    return x.new_empty(x.shape), w.new_empty(w.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    x, w, offs = ctx.saved_tensors
    dx, dw = torch.ops.tinymeg.grouped_mm_backward(grad_y, x, w, offs)
    need_x, need_w, _ = ctx.needs_input_grad
    return dx if need_x else None, dw if need_w else None, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast: a matmul, in the autocast dtype.
AUTOCAST = {"cpu": precision.LOWER, "cuda": precision.LOWER}
precision.register_autocast(grouped_mm_op, AUTOCAST)
precision.register_autocast(grouped_mm_backward_op, precision.BACKWARD)


# ---- sharding: [outputs...], [inputs...] ----

@register_sharding(torch.ops.tinymeg.grouped_mm.default)
def _(x, w, offs):
    return [([Replicate()], [Replicate(), Replicate(), Replicate()]),
            ([Shard(1)], [Replicate(), Shard(2), Replicate()]),       # column-parallel w
            ([Partial()], [Shard(1), Shard(1), Replicate()])]         # row-parallel x and w


@register_sharding(torch.ops.tinymeg.grouped_mm_backward.default)
def _(grad_y, x, w, offs):
    return [([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), Replicate()]),
            ([Partial(), Shard(2)], [Shard(1), Replicate(), Shard(2), Replicate()]),
            ([Shard(1), Shard(1)], [Replicate(), Shard(1), Shard(1), Replicate()])]


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Rows offs[g-1]:offs[g] of x (M, K) times w[g] (K, N), for every group g: (M, N)."""
    return torch.ops.tinymeg.grouped_mm(x, w, offs)
