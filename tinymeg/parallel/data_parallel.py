"""Data parallelism over the mesh's ``dp`` dim: bucketed, overlapped gradient all-reduce.

Each rank's gradients (the local shards, when parameters are TP DTensors) are packed into
flat buckets of about ``bucket_mb``. A bucket's all-reduce is launched asynchronously by the
post-accumulate-grad hook of its last parameter, so communication overlaps the rest of
backward; a callback queued on the autograd engine waits for every bucket at the end of
backward and writes the averaged gradients back. After ``loss.backward()`` the gradients
are synchronised: any optimizer can step. Bytes all-reduced per step = the gradient bytes
this rank holds.

EP (expert parallelism, moe-ep branch): a parameter may name the mesh it is data-parallel over
in ``p.data_parallel_mesh`` (expert weights: ``ctx.edp_mesh``, the ranks holding the same
experts). Its gradient is summed over that mesh and still divided by the dp size: every rank's
loss is a 1/dp share of the global batch's, whichever ranks contributed to the gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ..context import ParallelContext
from ..nn.layers import local as _local

DEFAULT_BUCKET_MB = 25.0


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor                     # flat, holds this rank's local grads
    group: dist.ProcessGroup | None = None   # EP: the bucket's own dp group (None: GradSync.group)
    launched: bool = False                    # EP: a 1-rank group launches no all-reduce (work stays None)
    ready: int = 0                            # params whose grad is accumulated this backward
    work: dist.Work | None = None             # the in-flight all-reduce


@dataclass
class GradSync:
    """The DP state of one model (``model.grad_sync``)."""
    group: dist.ProcessGroup
    dp_size: int
    buckets: list[_Bucket]
    enabled: bool = True                      # False inside no_sync()
    # For tests and debugging: for each bucket launched in the last backward, how many
    # parameters still had no gradient at that moment (> 0 means overlap with backward).
    launch_log: list[tuple[int, int]] = field(default_factory=list)
    _bucket_of: dict[int, int] = field(default_factory=dict)
    _pending: int = 0
    _callback_queued: bool = False

    def on_grad_ready(self, p: nn.Parameter) -> None:
        if not self.enabled:
            return
        if not self._callback_queued:
            # First gradient of this backward: arrange to finish the sync when backward ends.
            self._callback_queued = True
            self._pending = sum(len(b.params) for b in self.buckets)
            self.launch_log.clear()
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        self._pending -= 1
        i = self._bucket_of[id(p)]
        bucket = self.buckets[i]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(i)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        offset = 0
        for p in bucket.params:
            n = _local(p).numel()
            view = bucket.buffer[offset:offset + n]
            if p.grad is None:   # unused in this forward: contributes zeros
                view.zero_()
            else:
                view.copy_(_local(p.grad).reshape(-1))
            offset += n
        bucket.buffer.div_(self.dp_size)  # gloo has no AVG: pre-divide, then sum
        bucket.launched = True
        group = bucket.group or self.group
        if group.size() > 1:  # EP: with ep = dp, each expert is held by one rank: only divide
            bucket.work = dist.all_reduce(bucket.buffer, group=group, async_op=True)
        self.launch_log.append((i, self._pending))

    def finish(self) -> None:
        """Launch what is left (buckets with unused parameters), wait, write grads back."""
        for i, bucket in enumerate(self.buckets):
            if not bucket.launched:
                self._launch(i)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            offset = 0
            for p in bucket.params:
                local = _local(p)
                n = local.numel()
                grad = bucket.buffer[offset:offset + n].view_as(local)
                if p.grad is None:
                    p.grad = (DTensor.from_local(grad.clone(), p.device_mesh, p.placements,
                                                 shape=p.shape, stride=p.stride())
                              if isinstance(p, DTensor) else grad.clone())
                else:
                    _local(p.grad).copy_(grad)
                offset += n
            bucket.work, bucket.ready, bucket.launched = None, 0, False
        self._callback_queued = False


def _dp_group(p: nn.Parameter) -> dist.ProcessGroup | None:
    """EP: the group a parameter is data-parallel over, if it names one (else None: dp)."""
    mesh = getattr(p, "data_parallel_mesh", None)
    return None if mesh is None else mesh.get_group()


def _make_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
    """Group parameters in reverse order (gradients arrive roughly last layer first), one
    dtype (and, EP, one dp group) per bucket, each bucket up to bucket_bytes (a larger
    parameter gets its own)."""
    buckets, current, size = [], [], 0
    for p in reversed(params):
        nbytes = _local(p).numel() * p.element_size()
        if current and (size + nbytes > bucket_bytes or current[0].dtype != p.dtype
                        or _dp_group(current[0]) is not _dp_group(p)):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(current)
    return [_Bucket(ps, torch.empty(sum(_local(p).numel() for p in ps), dtype=ps[0].dtype,
                                    device=_local(ps[0]).device), _dp_group(ps[0])) for ps in buckets]


class DataParallelMixin:
    """Mixed into the model's class by apply_data_parallel (the way FSDP2's fully_shard
    does), so the model keeps its type, its methods and its state_dict keys."""
    grad_sync: GradSync

    @contextlib.contextmanager
    def no_sync(self):
        """Skip the gradient all-reduce: gradients accumulate locally (use on every
        micro-step of a gradient accumulation but the last)."""
        previous, self.grad_sync.enabled = self.grad_sync.enabled, False
        try:
            yield
        finally:
            self.grad_sync.enabled = previous


def apply_data_parallel(model: nn.Module, ctx: ParallelContext,
                        bucket_mb: float = DEFAULT_BUCKET_MB) -> nn.Module:
    """Average gradients over ``ctx.dp_cp_mesh`` (dp, and cp: context-parallel ranks hold the
    same weights and see other tokens) with bucketed, overlapped all-reduces.

    Parameters and buffers are broadcast from dp-rank 0 first, so replicas start identical.
    """
    if isinstance(model, DataParallelMixin):
        raise ValueError("data parallelism was already applied to this model; apply it once")
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    _check_moe_prepared(model, ctx)
    # context-par: reduce over dp x cp, not dp alone (branch dp-zero does the same on its rewrite).
    mesh = ctx.dp_cp_mesh
    group, size = mesh.get_group(), mesh.size()
    params = [p for p in model.parameters() if p.requires_grad]
    if size > 1:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                own = _dp_group(t) if isinstance(t, nn.Parameter) else None  # EP: among replicas only
                if (own or group).size() > 1:
                    dist.broadcast(_local(t), group=own or group, group_src=0)

    sync = GradSync(group, size, _make_buckets(params, int(bucket_mb * 2**20)))
    sync._bucket_of = {id(p): i for i, b in enumerate(sync.buckets) for p in b.params}
    if size > 1:
        for p in params:
            p.register_post_accumulate_grad_hook(sync.on_grad_ready)
    model.grad_sync = sync
    model.__class__ = type(f"DataParallel{type(model).__name__}", (DataParallelMixin, type(model)), {})
    return model


def _check_moe_prepared(model: nn.Module, ctx: ParallelContext) -> None:
    """EP: MoE layers on a mesh need apply_expert_parallel (global balancing statistics)."""
    from .expert_parallel import unprepared_moe_layers
    unprepared = unprepared_moe_layers(model)
    if unprepared and (ctx.dp_size > 1 or ctx.tp_size > 1 or ctx.cp_size > 1):
        raise ValueError(f"{unprepared[0]} is a MoE layer: call tm.apply_expert_parallel(model, ctx) "
                         f"(after tensor parallelism) before data parallelism, so that its experts "
                         f"and balancing statistics span the mesh")


def apply_hybrid_parallel(model: nn.Module, ctx: ParallelContext, tp_config: dict | None = None,
                          bucket_mb: float = DEFAULT_BUCKET_MB) -> nn.Module:
    """TP over ``ctx.mesh["tp"]``, then (for a model with MoE layers) EP, then DP over
    ``ctx.mesh["dp"]``, on the one mesh."""
    from .expert_parallel import apply_expert_parallel, unprepared_moe_layers
    from .tensor_parallel import apply_tensor_parallel
    model = apply_tensor_parallel(model, ctx, tp_config)
    if unprepared_moe_layers(model):
        model = apply_expert_parallel(model, ctx)
    return apply_data_parallel(model, ctx, bucket_mb)
