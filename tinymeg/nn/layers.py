"""Tensor-parallel modules. Parameters are DTensors on the TP mesh, so ``state_dict()`` and
``full_tensor()`` describe the global model; forward computes on the local shards and talks
only through the primitives in ``functional`` (Megatron's communication, no more).

Inside a model sharded by ``apply_tensor_parallel`` the layers share a ``Region`` (region.py)
that says where the activations are (whole, on sequence shards, on feature shards) and so
which primitive each boundary needs. A layer built on its own (``region=None``) does what
Megatron's layer does: column = copy_to_tp in, row = all-reduce out.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.nn.utils.stateless import _reparametrize_module

from .. import compat
from ..ops import LayerNorm as FusedLayerNorm
from ..ops import RMSNorm as FusedRMSNorm
from ..ops import layer_norm, rms_norm
from .checks import check_index
from .functional import copy_to_tp, gather_from_tp, reduce_from_tp
from .loss_parallel import vocab_parallel_cross_entropy
from .region import Region

HF_IGNORE_INDEX = -100


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor parameter (a plain tensor is returned as is). In an eager
    forward, through _LocalShard: to_local with a cheaper backward."""
    if not isinstance(t, DTensor):
        return t
    if (t.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not any(pl.is_partial() for pl in t.placements)):
        return _LocalShard.apply(t)
    return t.to_local()


class _LocalShard(torch.autograd.Function):
    """DTensor.to_local for a parameter, with the same gradient made more cheaply. to_local's
    backward wraps the local gradient with DTensor.from_local, itself an autograd Function with
    checks: on CPU about 80 us a call, once per parameter per step, a few % of a small model's
    step. A parameter's gradient needs no graph of its own, so here it is wrapped directly in a
    DTensor with the parameter's placements and shape: what to_local's backward returns for
    placements without Partial (every parameter's). The compiler traces to_local instead."""

    @staticmethod
    def forward(ctx, p: DTensor) -> torch.Tensor:
        ctx.spec, ctx.local_stride = compat.spec(p), compat.local_tensor(p).stride()
        ctx.set_materialize_grads(False)
        return compat.local_tensor(p).view_as(compat.local_tensor(p))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor | None) -> DTensor | None:
        if grad is None:
            return None
        spec = ctx.spec
        if grad.stride() == ctx.local_stride:  # laid out as the parameter: its global stride too
            spec = copy.copy(spec)  # not shared with the parameter: sharding propagation may change it
        else:
            _, stride = compat.compute_global_tensor_info(grad, spec.mesh, spec.placements)
            spec = compat.DTensorSpec(spec.mesh, spec.placements,
                                      tensor_meta=compat.TensorMeta(spec.shape, tuple(stride), spec.tensor_meta.dtype))
        return DTensor(grad, spec, requires_grad=False)


def distribute_parameter(p: torch.Tensor, mesh: DeviceMesh, placement) -> nn.Parameter:
    """Shard (or replicate) a full parameter over mesh. The data is scattered from the mesh's
    first rank, so ranks that built slightly different models still agree afterwards."""
    return nn.Parameter(distribute_tensor(p.detach(), mesh, [placement]), requires_grad=p.requires_grad)


def row_shard(output_chunks: int, dim: int = 0):
    """Placement of a weight sharded on its output features (dim 0 of nn.Linear's weight,
    dim 1 of a transposed Conv1D's). A weight holding several stacked projections (GPT-2's
    q|k|v) is sharded within each projection: rank r holds the r-th slice of q, of k and of
    v. _StridedShard (compat.StridedShard) says exactly that, so the global view stays the unsharded layout."""
    return Shard(dim) if output_chunks == 1 else compat.StridedShard(dim, split_factor=output_chunks)


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a Linear whose weight is stored (in, out), y = x W + b."""
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and (b is None or tuple(b.shape) == (w.shape[1],)))


def _features(weight: torch.Tensor, transposed: bool) -> tuple[int, int]:
    """(in_features, out_features) of a Linear's (out, in) or a Conv1D's (in, out) weight."""
    return tuple(weight.shape) if transposed else (weight.shape[1], weight.shape[0])


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) sharded on out: each rank computes a slice of y's last dim.

    Forward: identity on x (already replicated); backward: all-reduce of x's gradient.
    With sequence parallelism x arrives sharded on the sequence: all-gather it in forward,
    reduce-scatter its gradient in backward (or, when the parent module gathered it already,
    take it as is). With ``gather_output`` the slices of y are all-gathered so every rank gets
    the whole y. ``transposed``: W is stored (in, out), as Hugging Face's Conv1D stores it, so
    that the parameter keeps its name, shape and layout.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, mesh: DeviceMesh,
                 gather_output: bool = False, transposed: bool = False):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.mesh, self.gather_output, self.transposed = mesh, gather_output, transposed
        self.region: Region | None = None
        self.tp_name = type(self).__name__  # its name in the model, for errors (set by apply)
        self.loss_parallel = False  # forward_loss keeps the logits vocab-sharded
        self.in_features, self.out_features = _features(weight, transposed)

    @classmethod
    def from_linear(cls, linear: nn.Module, mesh: DeviceMesh, output_chunks: int = 1,
                    gather_output: bool = False) -> "ColumnParallelLinear":
        transposed = is_transposed_linear(linear)
        bias = None if linear.bias is None else distribute_parameter(linear.bias, mesh, row_shard(output_chunks))
        weight = distribute_parameter(linear.weight, mesh, row_shard(output_chunks, 1 if transposed else 0))
        return cls(weight, bias, mesh, gather_output, transposed)

    def _weight(self) -> torch.Tensor:
        w = local(self.weight)
        return w.t() if self.transposed else w

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-1) != self.in_features:
            raise RuntimeError(
                f"column-parallel layer {self.tp_name!r} expects its whole input of {self.in_features} "
                f"features on every rank, but got {x.size(-1)}: is it fed by another sharded layer? A "
                f"column layer's output goes to a RowParallel layer")
        if self.region is None:
            return copy_to_tp(x, self.mesh)
        return self.region.enter_column(x, self.tp_name, self.gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self._enter(x), self._weight(), local(self.bias))
        return gather_from_tp(y, self.mesh, dim=-1) if self.gather_output else y

    def forward_pre_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x W^T, b) on this rank's output slice, for a caller that fuses the bias add into its
        next op (GPT-2's MLP: bias + GELU). The slice of b matches the slice of x W^T."""
        if self.gather_output:
            return self(x), None
        return F.linear(self._enter(x), self._weight()), local(self.bias)

    def forward_loss(self, x: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                     ignore_index: int = -1) -> torch.Tensor:
        """Mean cross-entropy of self(x)[..., :vocab_size] (an LM head) over the targets that are
        not ignore_index (0 when all are). With loss_parallel the logits stay sharded over the
        vocabulary (tinymeg.nn.loss_parallel); otherwise they are gathered, as forward does."""
        fix = (f"targets must be token ids or {ignore_index} (ignored)"
               + (f"; Hugging Face's ignore index is {HF_IGNORE_INDEX}: replace it, e.g. "
                  f"targets.masked_fill(targets == {HF_IGNORE_INDEX}, {ignore_index})"
                  if ignore_index != HF_IGNORE_INDEX else ""))
        check_index(targets, vocab_size, ignore=ignore_index, what="target", fix=fix)
        if not self.loss_parallel:
            logits = self(x)[..., :vocab_size].flatten(0, -2).float()  # the loss in float32, as the fused op
            targets = targets.flatten()
            # sum / count rather than reduction="mean", which is 0/0 = NaN when every target is ignored
            total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
            return total / (targets != ignore_index).sum().clamp(min=1)
        vocab_start = self.mesh.get_local_rank() * (self.out_features // self.mesh.size())
        return vocab_parallel_cross_entropy(self._enter(x), local(self.weight), targets, vocab_start,
                                            vocab_size, self.mesh, ignore_index)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tp={self.mesh.size()}, "
                f"gather_output={self.gather_output}{', transposed' if self.transposed else ''}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) sharded on in; x arrives sharded on its last dim (the
    output of a column-parallel layer). Partial sums are all-reduced in forward; backward is
    the identity. The bias is replicated and added once, after the reduction.
    With sequence parallelism the partial sums are reduce-scattered over the sequence instead
    (all-gather in backward), and the bias then sees only this rank's tokens."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, mesh: DeviceMesh,
                 transposed: bool = False):
        super().__init__()
        self.weight, self.bias, self.mesh, self.transposed = weight, bias, mesh, transposed
        self.region: Region | None = None
        self.tp_name = type(self).__name__
        self.in_features, self.out_features = _features(weight, transposed)

    @classmethod
    def from_linear(cls, linear: nn.Module, mesh: DeviceMesh) -> "RowParallelLinear":
        transposed = is_transposed_linear(linear)
        bias = None if linear.bias is None else distribute_parameter(linear.bias, mesh, Replicate())
        return cls(distribute_parameter(linear.weight, mesh, Shard(0 if transposed else 1)), bias, mesh, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, bias = self.forward_pre_bias(x)
        return y if bias is None else y + bias

    def forward_pre_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = local(self.weight)
        w = w.t() if self.transposed else w
        if x.size(-1) != w.shape[1]:
            raise RuntimeError(
                f"row-parallel layer {self.tp_name!r} expects this rank's {w.shape[1]} of its "
                f"{self.in_features} input features (the output of a column-parallel layer), but got "
                f"{x.size(-1)}: its input is not sharded. Check that the layers feeding it are ColumnParallel")
        y = F.linear(x, w)
        if self.region is None:
            return reduce_from_tp(y, self.mesh), local(self.bias)
        return self.region.leave_row(y, self.tp_name), replicated(self, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tp={self.mesh.size()}"
                f"{', transposed' if self.transposed else ''}")


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are sharded: each rank looks up the ids in its
    range, writes zeros for the others, and the partial results are summed (all-reduce).
    Ids outside the vocabulary are an error, as they are for nn.Embedding (here they would
    be outside every shard and silently become zeros)."""

    def __init__(self, weight: nn.Parameter, mesh: DeviceMesh, padding_idx: int | None = None):
        super().__init__()
        self.weight, self.mesh = weight, mesh
        self.num_embeddings, self.embedding_dim = weight.shape
        self.rows_per_rank = self.num_embeddings // mesh.size()
        self.vocab_start = mesh.get_local_rank() * self.rows_per_rank
        self.padding_idx = padding_idx
        # the padding row gets no gradient (nn.Embedding's padding_idx), on the rank that holds it
        local_pad = None if padding_idx is None else padding_idx - self.vocab_start
        self.local_padding_idx = local_pad if local_pad is not None and 0 <= local_pad < self.rows_per_rank else None

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, mesh: DeviceMesh) -> "VocabParallelEmbedding":
        return cls(distribute_parameter(emb.weight, mesh, Shard(0)), mesh, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_index(ids, self.num_embeddings, what="token id", error=IndexError,
                    fix=f"the embedding has {self.num_embeddings} rows; ids must be in that range")
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        out = F.embedding(local_ids.masked_fill(outside, 0), local(self.weight), self.local_padding_idx)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.mesh)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.mesh.size()}"


# ---- modules that are not sharded

# Their parameters are Replicate() DTensors (every parameter of a TP model lives on the TP
# mesh, so optimizers, clipping and checkpoints see one kind of tensor) and they compute on
# the local copy, exactly what they compute unsharded. Where the gradients reaching them are
# partial (region.py: on sequence shards, between a column layer and its row layer), their
# parameters' gradients are all-reduced over TP.

def replicated(module: nn.Module, p: torch.Tensor | None) -> torch.Tensor | None:
    """The local copy of a replicated parameter, all-reducing its gradient in backward where
    the module's gradients are partial sums over the TP ranks."""
    region = getattr(module, "region", None)
    if p is None or region is None or not region.partial_grads():
        return local(p)
    return copy_to_tp(local(p), module.mesh)


class LayerNorm(FusedLayerNorm):
    """Replicated twin of nn.LayerNorm and of tinymeg.ops.LayerNorm: the fused op on local copies."""

    def forward(self, x):
        weight, bias = replicated(self, self.weight), replicated(self, self.bias)
        if len(self.normalized_shape) != 1:
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return layer_norm(x, weight, bias, self.eps)


class RMSNorm(FusedRMSNorm):
    """Replicated twin of nn.RMSNorm and of tinymeg.ops.RMSNorm: the fused op on local copies."""

    def forward(self, x):
        weight = replicated(self, self.weight)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps  # nn.RMSNorm's default
        if len(self.normalized_shape) != 1:
            return F.rms_norm(x, self.normalized_shape, weight, eps)
        return rms_norm(x, weight, eps)


class ReplicatedEmbedding(nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, replicated(self, self.weight), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


class ReplicatedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, replicated(self, self.weight), replicated(self, self.bias))

    def forward_pre_bias(self, x):
        return F.linear(x, replicated(self, self.weight)), replicated(self, self.bias)


# Twins for the hot module classes: their own forward on local copies, no per-call overhead.
REPLICATED_TYPES = {nn.LayerNorm: LayerNorm, FusedLayerNorm: LayerNorm, nn.RMSNorm: RMSNorm, FusedRMSNorm: RMSNorm,
                    nn.Embedding: ReplicatedEmbedding, nn.Linear: ReplicatedLinear}


class Replicated:
    """Mixin for a module of any other class: its forward runs unchanged, with the module's
    own parameters swapped for their local copies for the duration of the call (as
    torch.func.functional_call does; functional_call itself would call this forward again)."""

    def forward(self, *args, **kwargs):
        params = {name: replicated(self, p) for name, p in self._parameters.items() if p is not None}
        with _reparametrize_module(self, params):
            return super().forward(*args, **kwargs)


_replicated_classes: dict[type, type] = {}


def _replicated_class(cls: type) -> type:
    """Replicated{cls}: one class per original class, as fully_shard's FSDP{cls}."""
    if cls not in _replicated_classes:
        _replicated_classes[cls] = type(f"Replicated{cls.__name__}", (Replicated, cls), {})
    return _replicated_classes[cls]


def replicate_module(module: nn.Module, mesh: DeviceMesh, region: Region | None = None,
                     done: dict[int, nn.Parameter] | None = None) -> nn.Module:
    """Turn a module with parameters, whatever its class, in place into a replicated one: its
    twin for the hot classes, else its own class under the Replicated mixin. ``done`` maps
    id(plain parameter) -> its replicated DTensor, so that a parameter two modules share (a
    tied embedding and LM head) stays one parameter."""
    twin = REPLICATED_TYPES.get(type(module))
    module.__class__ = twin or _replicated_class(type(module))
    module.mesh, module.region = mesh, region
    done = {} if done is None else done
    for name, p in list(module.named_parameters(recurse=False)):
        if isinstance(p, DTensor):
            continue
        if id(p) not in done:
            done[id(p)] = distribute_parameter(p, mesh, Replicate())
        setattr(module, name, done[id(p)])
    return module


class ParallelDropout(nn.Dropout):
    """nn.Dropout that knows whether the TP ranks hold the same data (region.py).

    Where they do, it is nn.Dropout: every rank draws the same mask from the shared stream
    (all ranks are seeded alike), as the unsharded model does. Where each rank holds its own
    tokens or heads, each needs its own mask: every rank draws the masks of all tp ranks
    from the shared stream, (tp, *x.shape) at once, and keeps its own. That costs the RNG
    work of the unsharded model's mask, keeps the shared stream in step on every rank, is
    reproducible from torch.manual_seed, draws nothing in eval mode, and is plain tensor
    code, so torch.compile traces it (a torch.Generator or an RNG-state swap would not).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = getattr(self, "region", None)
        if not self.training or self.p == 0 or region is None or not region.ranks_differ():
            return super().forward(x)
        tp, rank = region.mesh.size(), region.mesh.get_local_rank()
        keep = torch.empty((tp, *x.shape), dtype=torch.bool, device=x.device).bernoulli_(1 - self.p)[rank]
        return x * keep / (1 - self.p) if self.p < 1 else x * 0
