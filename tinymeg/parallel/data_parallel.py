"""Data parallelism over the mesh's ``dp`` dim (with ``cp``: the ranks that hold the same
weights and see different tokens), with ZeRO stages 0-3 and mixed precision.

``apply_data_parallel(model, ctx, zero=Z, param_dtype=None)`` works on any ``nn.Module``:

| zero | each dp rank keeps                          | gradients                     | after step()                 |
|------|---------------------------------------------|-------------------------------|------------------------------|
| 0    | everything (replicated)                     | all-reduced, on ``p.grad``    | nothing to do                |
| 1    | 1/dp of the optimizer states                | reduce-scattered into shards  | all-gather of the parameters |
| 2    | 1/dp of the optimizer states and gradients  | reduce-scattered into shards  | all-gather of the parameters |
| 3    | 1/dp of states, gradients and parameters    | FSDP2 reduce-scatter          | nothing (FSDP2 gathers per block) |

Stages 0-2 run tinymeg's gradient engine (``grad_sync``: buckets overlapped with backward,
launched in the same order on every rank, unused and rank-dependent parameters handled as DDP
does); the sharding, mixed precision and checkpoints are in ``zero``; stage 3 is torch's
``fully_shard``. With ZeRO 1-2 or mixed precision, hand the optimizer to ``shard_optimizer``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ..context import ParallelContext
from ..nn.layers import local as _local
from .grad_sync import GradSync
from .zero import ZeroState, fully_shard_model, make_holders, master_state_dict, recover_fsdp, shard_dims

DEFAULT_BUCKET_MB = 25.0
PARAM_DTYPES = {None: None, "fp32": None, "float32": None, torch.float32: None,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16}


class DataParallelMixin:
    """Mixed into the model's class by apply_data_parallel (the way FSDP2's fully_shard does),
    so the model keeps its type, its methods and its state_dict keys."""
    grad_sync: GradSync | None        # None at stage 3 (FSDP2 reduces)
    zero_state: ZeroState

    @contextlib.contextmanager
    def no_sync(self):
        """Skip the gradient reduction: gradients accumulate locally (use on every micro-step
        of a gradient accumulation but the last). ZeRO 1-2 and mixed precision accumulate them
        in the fp32 buckets; stage 3 in FSDP2's unsharded gradients."""
        if self.grad_sync is None and getattr(self, "pipeline", None) is not None:
            with super().no_sync():   # the pipeline's: its stages keep FSDP2's gradients unreduced
                yield
            return
        if self.grad_sync is None:
            self.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.set_requires_gradient_sync(True)
            return
        previous, self.grad_sync.enabled = self.grad_sync.enabled, False
        try:
            yield
        finally:
            self.grad_sync.enabled = previous

    def export_state_dict(self) -> dict:
        """What GPT2Model.save_pretrained writes: the fp32 masters under mixed precision, not the
        bf16 working copies (zero.master_state_dict)."""
        return master_state_dict(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """nn.Module.zero_grad, and the gradients accumulated in the data-parallel buckets."""
        if self.grad_sync is None:
            recover_fsdp(self)
        else:
            self.grad_sync.zero_grad()   # (first: it drops the GradientElsewhere that zero_() would reject)
        super().zero_grad(set_to_none)


def apply_data_parallel(model: nn.Module, ctx: ParallelContext, bucket_mb: float = DEFAULT_BUCKET_MB,
                        zero: int = 0, param_dtype=None) -> nn.Module:
    """Average gradients over ``ctx.dp_cp_mesh`` (each parameter's ``data_parallel_mesh`` if it
    names one), sharding optimizer states (zero=1), gradients (2) and parameters (3) over it.

    ``param_dtype=torch.bfloat16`` (or "bf16") computes in bf16 with fp32 master weights, fp32
    optimizer states and fp32 gradient reduction. Parameters and buffers are broadcast from
    dp-rank 0 first, so replicas start identical. Returns the model, changed in place.
    """
    if isinstance(model, DataParallelMixin):
        raise ValueError("data parallelism was already applied to this model; apply it once")
    if type(zero) is not int or zero not in (0, 1, 2, 3):   # (not True, not 1.0)
        raise ValueError(f"zero={zero!r}: ZeRO stages are 0 (replicated), 1 (optimizer states sharded), "
                         f"2 (+ gradients) or 3 (+ parameters, FSDP2); pass one of 0, 1, 2, 3")
    if not isinstance(bucket_mb, (int, float)) or bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype={param_dtype!r}: use None/'fp32' (float32 throughout) or 'bf16' "
                         f"(bf16 compute, fp32 master weights, states and gradient reduction)")
    param_dtype = PARAM_DTYPES[param_dtype]
    _check_moe_prepared(model, ctx)
    mesh = ctx.dp_cp_mesh
    params = list(model.parameters())
    if any(p.dtype != torch.float32 for p in params) and param_dtype is not None:
        raise ValueError("mixed precision keeps fp32 master weights made from the model's parameters: "
                         "build the model in float32 and pass param_dtype, not a model already in "
                         f"{next(p.dtype for p in params if p.dtype != torch.float32)}")
    broadcast_replicas([*params, *model.buffers()], mesh)

    dims = shard_dims(model)
    sync, holders = None, {}
    if zero == 3:
        fully_shard_model(model, mesh, param_dtype, dims)
    else:
        if zero in (1, 2) or param_dtype is not None:
            holders = make_holders(params, mesh, zero, param_dtype, dims)
        if param_dtype is not None:
            _cast_parameters(model, param_dtype)
        sync = GradSync(params, mesh, int(bucket_mb * 2**20), shard_dims=dims, sharded=zero in (1, 2),
                        reduce_dtype=torch.float32 if param_dtype is not None else None,
                        holders=holders or None, keep_buffers=zero != 2 and not (zero == 0 and holders))
    model.grad_sync = sync
    model.zero_state = ZeroState(model, zero, param_dtype, sync, holders, mesh)
    model.__class__ = type(f"DataParallel{type(model).__name__}", (DataParallelMixin, type(model)), {})
    return model


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters (and floating buffers) to dtype in place: each Parameter stays the same object
    with the same attributes, so tied weights stay tied (a DTensor's data cannot be reassigned
    with ``.data``: its contents are swapped, as nn.Module.to does)."""
    with torch.no_grad():
        for p in model.parameters():
            if isinstance(p, DTensor):
                attrs = dict(p.__dict__)
                torch.utils.swap_tensors(p, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
                p.__dict__.update(attrs)
            else:
                p.data = p.data.to(dtype)
        for module in model.modules():
            for name, b in module.named_buffers(recurse=False):
                if b.is_floating_point():
                    setattr(module, name, b.to(dtype))


def compile_model(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile(fullgraph=True) for a model, whatever its ZeRO stage: the whole model at
    stages 0-2 (returns the compiled module); at stage 3 each FSDP block's forward, in place (FSDP2's
    hooks cannot be traced: they run between the compiled blocks, as in torchtitan; the root's
    embeddings and loss stay eager)."""
    compile_kwargs = {"fullgraph": True, **compile_kwargs}
    if getattr(model, "grad_sync", 0) is not None:   # not stage 3
        return torch.compile(model, **compile_kwargs)
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule) and module is not model:
            module.forward = torch.compile(module.forward, **compile_kwargs)
    return model


def _check_moe_prepared(model: nn.Module, ctx: ParallelContext) -> None:
    """EP: MoE layers on a mesh need apply_expert_parallel (global balancing statistics)."""
    from .expert_parallel import unprepared_moe_layers
    unprepared = unprepared_moe_layers(model)
    if unprepared and (ctx.dp_size > 1 or ctx.tp_size > 1 or ctx.cp_size > 1):
        raise ValueError(f"{unprepared[0]} is a MoE layer: call tm.apply_expert_parallel(model, ctx) "
                         f"(after tensor parallelism) before data parallelism, so that its experts "
                         f"and balancing statistics span the mesh")


def broadcast_replicas(tensors, mesh) -> None:
    """Make replicas identical: each tensor (its local shard) is broadcast from rank 0 of its
    data-parallel mesh (its ``data_parallel_mesh`` attribute, set on experts, else ``mesh``)."""
    with torch.no_grad():
        for t in tensors:
            group = getattr(t, "data_parallel_mesh", None) or mesh
            if group.size() > 1:
                dist.broadcast(_local(t), group=group.get_group(), group_src=0)


def apply_hybrid_parallel(model: nn.Module, ctx: ParallelContext, tp_config: dict | None = None,
                          bucket_mb: float = DEFAULT_BUCKET_MB, zero: int = 0, param_dtype=None) -> nn.Module:
    """TP over ``ctx.mesh["tp"]``, then (for a model with MoE layers) EP, then DP (ZeRO ``zero``)
    over the data-parallel ranks, on one mesh."""
    from .expert_parallel import apply_expert_parallel, unprepared_moe_layers
    from .tensor_parallel import apply_tensor_parallel
    model = apply_tensor_parallel(model, ctx, tp_config, sync_replicas=False)  # DP broadcasts below
    if unprepared_moe_layers(model):
        model = apply_expert_parallel(model, ctx)
    return apply_data_parallel(model, ctx, bucket_mb, zero, param_dtype)
