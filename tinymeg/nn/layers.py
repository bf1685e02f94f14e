"""Tensor-parallel modules. Parameters are DTensors on the TP mesh, so ``state_dict()`` and
``full_tensor()`` describe the global model; forward computes on the local shards and talks
only through the primitives in ``functional`` (Megatron's communication, no more).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from ..ops import LayerNorm as FusedLayerNorm
from ..ops import layer_norm
from .functional import copy_to_tp, gather_from_tp, gather_seq, reduce_from_tp, reduce_scatter_seq
from .loss_parallel import vocab_parallel_cross_entropy


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor parameter (a plain tensor is returned as is)."""
    return t.to_local() if isinstance(t, DTensor) else t


def distribute_parameter(p: torch.Tensor, mesh: DeviceMesh, placement) -> nn.Parameter:
    """Shard (or replicate) a full parameter over mesh. The data is scattered from the mesh's
    first rank, so ranks that built slightly different models still agree afterwards."""
    return nn.Parameter(distribute_tensor(p.detach(), mesh, [placement]), requires_grad=p.requires_grad)


def row_shard(output_chunks: int):
    """Placement of a weight sharded on its output rows. A weight holding several stacked
    projections (GPT-2's q|k|v) is sharded within each projection: rank r holds the r-th
    slice of q, of k and of v. _StridedShard says exactly that, so the global view stays
    the unsharded layout."""
    return Shard(0) if output_chunks == 1 else _StridedShard(0, split_factor=output_chunks)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) sharded on out: each rank computes a slice of y's last dim.

    Forward: identity on x (already replicated); backward: all-reduce of x's gradient.
    With ``sequence_parallel`` x arrives sharded on the sequence: all-gather it in forward,
    reduce-scatter its gradient in backward. With ``gather_output`` the slices of y are
    all-gathered so every rank gets the whole y.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, mesh: DeviceMesh,
                 gather_output: bool = False):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.mesh, self.gather_output = mesh, gather_output
        self.sequence_parallel = False
        self.loss_parallel = False  # forward_loss keeps the logits vocab-sharded
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, mesh: DeviceMesh, output_chunks: int = 1,
                    gather_output: bool = False) -> "ColumnParallelLinear":
        placement = row_shard(output_chunks)
        bias = None if linear.bias is None else distribute_parameter(linear.bias, mesh, placement)
        return cls(distribute_parameter(linear.weight, mesh, placement), bias, mesh, gather_output)

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        return gather_seq(x, self.mesh) if self.sequence_parallel else copy_to_tp(x, self.mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self._enter(x), local(self.weight), local(self.bias))
        return gather_from_tp(y, self.mesh, dim=-1) if self.gather_output else y

    def forward_pre_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x W^T, b) on this rank's output slice, for a caller that fuses the bias add into its
        next op (GPT-2's MLP: bias + GELU). The slice of b matches the slice of x W^T."""
        if self.gather_output:
            return self(x), None
        return F.linear(self._enter(x), local(self.weight)), local(self.bias)

    def forward_loss(self, x: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                     ignore_index: int = -1) -> torch.Tensor:
        """Mean cross-entropy of self(x)[..., :vocab_size] (an LM head). With loss_parallel the
        logits stay sharded over the vocabulary (tinymeg.nn.loss_parallel); otherwise they are
        gathered, as forward does."""
        if not self.loss_parallel:
            logits = self(x)[..., :vocab_size]
            return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)
        vocab_start = self.mesh.get_local_rank() * (self.out_features // self.mesh.size())
        return vocab_parallel_cross_entropy(self._enter(x), local(self.weight), targets, vocab_start,
                                            vocab_size, self.mesh, ignore_index)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tp={self.mesh.size()}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) sharded on in; x arrives sharded on its last dim (the
    output of a column-parallel layer). Partial sums are all-reduced in forward; backward is
    the identity. The bias is replicated and added once, after the reduction.
    With ``sequence_parallel`` the partial sums are reduce-scattered over the sequence instead
    (all-gather in backward), and the bias then sees only this rank's tokens."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, mesh: DeviceMesh):
        super().__init__()
        self.weight, self.bias, self.mesh = weight, bias, mesh
        self.sequence_parallel = False
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, mesh: DeviceMesh) -> "RowParallelLinear":
        bias = None if linear.bias is None else distribute_parameter(linear.bias, mesh, Replicate())
        return cls(distribute_parameter(linear.weight, mesh, Shard(1)), bias, mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, bias = self.forward_pre_bias(x)
        return y if bias is None else y + bias

    def forward_pre_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = F.linear(x, local(self.weight))
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.mesh)
        else:
            y = reduce_from_tp(y, self.mesh)
        return y, replicated(self, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={self.mesh.size()}, sequence_parallel={self.sequence_parallel}"


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are sharded: each rank looks up the ids in its
    range, writes zeros for the others, and the partial results are summed (all-reduce)."""

    def __init__(self, weight: nn.Parameter, mesh: DeviceMesh):
        super().__init__()
        self.weight, self.mesh = weight, mesh
        self.num_embeddings, self.embedding_dim = weight.shape
        self.rows_per_rank = self.num_embeddings // mesh.size()
        self.vocab_start = mesh.get_local_rank() * self.rows_per_rank

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, mesh: DeviceMesh) -> "VocabParallelEmbedding":
        return cls(distribute_parameter(emb.weight, mesh, Shard(0)), mesh)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        out = F.embedding(local_ids.masked_fill(outside, 0), local(self.weight))
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.mesh)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.mesh.size()}"


# Modules that are not sharded keep their parameters as Replicate() DTensors (every
# parameter of a TP model lives on the TP mesh, so optimizers, clipping and checkpoints
# see one kind of tensor) and compute on the local copy.

def replicated(module: nn.Module, p: torch.Tensor | None) -> torch.Tensor | None:
    """The local copy of a replicated parameter. Under sequence parallelism the module sees
    only this rank's tokens, so its gradient is partial: copy_to_tp all-reduces it in backward."""
    if p is None or not getattr(module, "sequence_parallel", False):
        return local(p)
    return copy_to_tp(local(p), module.mesh)


class LayerNorm(FusedLayerNorm):
    """Replicated twin of nn.LayerNorm and of tinymeg.ops.LayerNorm: the fused op on local copies."""

    def forward(self, x):
        weight, bias = replicated(self, self.weight), replicated(self, self.bias)
        if len(self.normalized_shape) != 1:
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return layer_norm(x, weight, bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, replicated(self, self.weight), self.eps)


class ReplicatedEmbedding(nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, local(self.weight), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


class ReplicatedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, local(self.weight), local(self.bias))

    def forward_pre_bias(self, x):
        return F.linear(x, local(self.weight)), local(self.bias)


REPLICATED_TYPES = {nn.LayerNorm: LayerNorm, FusedLayerNorm: LayerNorm, nn.RMSNorm: RMSNorm,
                    nn.Embedding: ReplicatedEmbedding, nn.Linear: ReplicatedLinear}


def replicate_module(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Turn a LayerNorm/RMSNorm/Embedding/Linear in place into its replicated twin."""
    module.__class__ = REPLICATED_TYPES[type(module)]
    module.mesh, module.sequence_parallel = mesh, False
    for name, p in list(module.named_parameters(recurse=False)):
        setattr(module, name, distribute_parameter(p, mesh, Replicate()))
    return module
