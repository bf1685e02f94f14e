"""Megatron's four communication primitives as autograd functions over functional collectives.

Each moves exactly what Megatron moves, in forward and in backward, and nothing else:

| function          | forward            | backward           | where                        |
|-------------------|--------------------|--------------------|------------------------------|
| copy_to_tp        | identity           | all-reduce         | entry of a column region     |
| reduce_from_tp    | all-reduce         | identity           | after a row-parallel layer   |
| gather_from_tp    | all-gather (dim)   | keep own slice     | column output wanted whole   |

and, with sequence parallelism (activations sharded on the sequence dim outside TP regions),
the same bytes moved differently:

| function          | forward            | backward           | where                        |
|-------------------|--------------------|--------------------|------------------------------|
| gather_seq        | all-gather (seq)   | reduce-scatter     | entry of a column region     |
| reduce_scatter_seq| reduce-scatter     | all-gather (seq)   | after a row-parallel layer   |
| split_seq         | keep own slice     | all-gather (seq)   | entry of the SP region       |

Functional collectives are used (not torch.distributed's in-place ones) so that
torch.compile can trace them and CommDebugMode can count them.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from .. import compat


def _wait(t: torch.Tensor) -> torch.Tensor:
    # Eager funcols return a lazy AsyncCollectiveTensor; autograd wants a plain tensor.
    return t.wait() if isinstance(t, compat.AsyncCollectiveTensor) else t


def all_reduce(x: torch.Tensor, mesh: DeviceMesh, op: str = "sum") -> torch.Tensor:
    return _wait(compat.all_reduce(x.contiguous(), op, mesh))


def all_gather(x: torch.Tensor, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    return _wait(compat.all_gather_single(x.contiguous(), dim % x.dim(), mesh))


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.mesh), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        return all_reduce(x, mesh)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, dim):
        ctx.mesh, ctx.dim = mesh, dim
        return all_gather(x, mesh, dim)

    @staticmethod
    def backward(ctx, grad):
        # Every rank holds the same gradient of the gathered tensor: keep our slice.
        return _own_slice(grad, ctx.mesh, ctx.dim), None, None


def reduce_scatter(x: torch.Tensor, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    return _wait(compat.reduce_scatter_single(x.contiguous(), "sum", dim % x.dim(), mesh))


def _own_slice(x: torch.Tensor, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    return x.chunk(mesh.size(), dim)[mesh.get_local_rank()].contiguous()


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, dim):
        ctx.mesh, ctx.dim = mesh, dim
        return all_gather(x, mesh, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.mesh, ctx.dim), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, dim):
        ctx.mesh, ctx.dim = mesh, dim
        return reduce_scatter(x, mesh, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.mesh, ctx.dim), None, None


class _SplitSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, dim):
        ctx.mesh, ctx.dim = mesh, dim
        return _own_slice(x, mesh, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.mesh, ctx.dim), None, None


SEQ_DIM = 1  # activations are (batch, seq, features)


def gather_seq(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return x if mesh.size() == 1 else _GatherSeq.apply(x, mesh, SEQ_DIM)


def reduce_scatter_seq(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return x if mesh.size() == 1 else _ReduceScatterSeq.apply(x, mesh, SEQ_DIM)


def split_seq(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    if mesh.size() == 1:
        return x
    if x.size(SEQ_DIM) % mesh.size():
        raise ValueError(f"sequence parallelism splits the sequence over tp={mesh.size()} ranks, "
                         f"but the sequence length is {x.size(SEQ_DIM)}: use a multiple of {mesh.size()}")
    return _SplitSeq.apply(x, mesh, SEQ_DIM)


def copy_to_tp(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return x if mesh.size() == 1 else _CopyToTP.apply(x, mesh)


def reduce_from_tp(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return x if mesh.size() == 1 else _ReduceFromTP.apply(x, mesh)


def gather_from_tp(x: torch.Tensor, mesh: DeviceMesh, dim: int = -1) -> torch.Tensor:
    return x if mesh.size() == 1 else _GatherFromTP.apply(x, mesh, dim)
