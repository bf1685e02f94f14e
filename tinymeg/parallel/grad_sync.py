"""The data-parallel gradient engine: bucketed gradient reduction that overlaps backward.

Every trainable parameter is averaged over its data-parallel mesh: ``ctx.dp_cp_mesh`` (dp and cp
flattened: the ranks that hold the same weights and see different tokens), unless the parameter
names another one in a ``data_parallel_mesh`` attribute (a 1-D ``DeviceMesh``; expert parallelism
sets it to the ranks that hold the same experts). Such a gradient is summed over its own mesh and
divided by the default mesh's size, like every other: each rank's loss is 1/(dp x cp) of the
global batch's, and an expert's gradient on one rank already holds the contributions of the tokens
that other ranks routed to it. Parameters are packed, in reverse order
(gradients arrive roughly last layer first), into buckets of about ``bucket_mb`` per (mesh,
reduction dtype). A bucket is a flat buffer viewed as ``parts`` rows:

    row r = [ chunk r of param 0 | chunk r of param 1 | ... | used flag 0 | used flag 1 | ... ]

``parts`` is 1 for replicated data parallelism (the rows are the whole gradients; one all-reduce)
and the mesh size for ZeRO stages 1-2 (chunk r is dp-rank r's shard, ``ShardLayout``; one
reduce-scatter leaves each rank its own row, summed). Each rank writes 1 in a parameter's used
flag when the parameter got a gradient, in every row, so the reduction also counts the ranks that
used it: a parameter no rank used keeps ``grad=None`` (as in the one-process model: AdamW's decay
and momentum do not move it), one used on some ranks only is averaged with the others' zeros (as
DDP does). The flags cost 4 bytes per parameter per step.

Launch order. A bucket's reduction starts from the post-accumulate-grad hook that completes it,
but only after every bucket before it has started: all ranks launch buckets 0, 1, 2, ... in the
same order even when a rank-dependent branch (stochastic depth, MoE routing) leaves some
parameters without a gradient on some ranks. Buckets still incomplete when backward ends are
launched, in order, by a callback queued on the autograd engine, which then waits for all of them.

Where the averaged gradient goes:

- replicated, same dtype (``holders=None``): ``p.grad`` becomes a view of its bucket region (no
  second copy of the gradients, like DDP's ``gradient_as_bucket_view``); ``no_sync()`` leaves
  gradients to accumulate in ``p.grad``.
- ZeRO 1-2, or mixed precision (``holders``: parameter -> the tensor its optimizer steps: its dp
  shard and/or fp32 master): every backward, ``no_sync()`` or not, adds each gradient into its
  bucket in the reduction dtype (fp32 accumulation of bf16 gradients) and frees it; the reduced
  shard lands in ``holder.grad``. The model's own ``p.grad`` becomes a ``GradientElsewhere``,
  which any use turns into an error that says where the gradient is (``torch.nn.utils.
  clip_grad_norm_(model.parameters())`` would otherwise find no gradient and clip nothing).

State is per backward (keyed by the autograd graph task), so a backward that raises, caught and
retried (as after an out-of-memory error), leaves nothing stale behind; the gradients it may have
accumulated are undefined until ``zero_grad()``, as without data parallelism. A parameter whose
``requires_grad`` changes after wrapping (unfrozen for fine-tuning) is picked up at the next
backward: the buckets are rebuilt. Every rank must freeze/unfreeze the same parameters.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .. import compat
from ..nn.layers import local as _local

DATA_PARALLEL_MESH_ATTR = "data_parallel_mesh"
MAX_IN_FLIGHT = 2   # ZeRO 2: reduce-scatters in flight before backward waits for the oldest


def data_parallel_mesh(p: nn.Parameter, default: DeviceMesh) -> DeviceMesh:
    """The mesh p's gradient is averaged over (and, under ZeRO, its state sharded over)."""
    return getattr(p, DATA_PARALLEL_MESH_ATTR, None) or default


def as_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """local wrapped as a tensor of like's kind: a DTensor with like's mesh, placements and global
    shape (sharing local's memory), or local itself."""
    if not isinstance(like, DTensor):
        return local
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride(), run_check=False)


class ShardLayout:
    """A local tensor of ``shape`` split into ``parts`` chunks along ``dim`` with torch.chunk's
    sizes (``size`` each, the last ones shorter or empty), as DTensor's ``Shard(dim)`` does. In a
    bucket row each chunk is padded to ``size`` along dim, so every rank's row has the same length."""

    def __init__(self, shape: torch.Size, dim: int, parts: int):
        self.shape = tuple(shape) or (1,)        # a 0-dim parameter is one element
        self.dim, self.parts = dim, parts
        self.n = self.shape[dim]
        self.size = -(-self.n // parts)
        self.chunk_shape = self.shape[:dim] + (self.size,) + self.shape[dim + 1:]
        self.row_numel = math.prod(self.chunk_shape)

    def length(self, r: int) -> int:
        return max(0, min(self.size, self.n - r * self.size))

    def chunk(self, t: torch.Tensor, r: int) -> torch.Tensor:
        """Rank r's chunk of t (a view; empty for a rank past the end: fewer rows than ranks)."""
        return t.reshape(self.shape).narrow(self.dim, min(r * self.size, self.n), self.length(r))

    def _as_chunks(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (parts, row_numel) seen as (parts, *chunk_shape)."""
        return rows.view((self.parts,) + self.chunk_shape)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """t (shape) as (parts, *chunk_shape), zero-padded when the chunks are uneven."""
        t = t.reshape(self.shape)
        if self.size * self.parts != self.n:
            pad = list(self.shape)
            pad[self.dim] = self.size * self.parts - self.n
            t = torch.cat([t, t.new_zeros(pad)], self.dim)
        return t.unflatten(self.dim, (self.parts, self.size)).movedim(self.dim, 0)

    def copy_to_rows(self, t: torch.Tensor, rows: torch.Tensor) -> None:
        self._as_chunks(rows).copy_(self._split(t))

    def add_to_rows(self, t: torch.Tensor, rows: torch.Tensor) -> None:
        self._as_chunks(rows).add_(self._split(t))

    def copy_from_rows(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """The whole tensor back from all parts' rows (after an all-gather)."""
        full = self._as_chunks(rows).movedim(0, self.dim).flatten(self.dim, self.dim + 1)
        out.view(self.shape).copy_(full.narrow(self.dim, 0, self.n))

    def own(self, row: torch.Tensor, r: int) -> torch.Tensor:
        """Rank r's chunk inside its own row (row_numel,) (a view, without padding)."""
        return row.view(self.chunk_shape).narrow(self.dim, 0, self.length(r))


class _Slot:
    """One parameter's place in a bucket: its region starts at ``offset`` in every row, its used
    flag is at ``flag`` (after all the regions)."""

    def __init__(self, param: nn.Parameter, layout: ShardLayout, offset: int, flag: int):
        self.param, self.layout, self.offset, self.flag = param, layout, offset, flag

    def region(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[..., self.offset:self.offset + self.layout.row_numel]


class _Bucket:
    def __init__(self, params: list[nn.Parameter], layouts: list[ShardLayout], mesh: DeviceMesh,
                 parts: int, dtype: torch.dtype, device: torch.device):
        self.mesh, self.parts, self.dtype, self.device = mesh, parts, dtype, device
        self.group, self.rank = mesh.get_group(), mesh.get_local_rank()
        offsets = [0]
        for layout in layouts:
            offsets.append(offsets[-1] + layout.row_numel)
        self.grad_numel = offsets[-1]
        self.slots = [_Slot(p, lay, off, self.grad_numel + i)
                      for i, (p, lay, off) in enumerate(zip(params, layouts, offsets))]
        self.row = self.grad_numel + len(params)
        self.buffer: torch.Tensor | None = None   # (parts * row,): gradients in, reduced in place
        self.output: torch.Tensor | None = None   # (row,): this rank's reduced row (reduce-scatter)
        self.work: dist.Work | None = None
        self.ready = 0                            # parameters whose hook ran in this backward
        self.fresh = True                         # the next accumulation starts from zeros

    @property
    def nbytes(self) -> int:
        """Bytes one reduction of this bucket works on (its whole buffer)."""
        return self.parts * self.row * self.dtype.itemsize

    def rows(self, zero: bool = False) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.zeros(self.parts * self.row, dtype=self.dtype, device=self.device)
        elif zero:
            self.buffer.zero_()
        return self.buffer.view(self.parts, self.row)

    def reduced_row(self) -> torch.Tensor:
        return self.output if self.parts > 1 else self.buffer.view(self.parts, self.row)[0]


class GradSync:
    """The data-parallel state of one model (``model.grad_sync``); see the module docstring.

    ``holders`` maps each parameter to the tensor its optimizer steps (ZeRO shard and/or fp32
    master), or is None for replicated data parallelism with gradients on the parameters.
    ``sharded``: reduce-scatter each bucket over the mesh (ZeRO 1-2) instead of all-reducing it.
    ``keep_buffers``: keep full-size buckets allocated between steps (ZeRO 1, and replicated DP
    where ``p.grad`` lives in them); otherwise they are freed once reduced (ZeRO 2).
    """

    def __init__(self, params: list[nn.Parameter], default_mesh: DeviceMesh, bucket_bytes: int, *,
                 shard_dims: dict[int, int] | None = None, sharded: bool = False,
                 reduce_dtype: torch.dtype | None = None, holders: dict | None = None,
                 keep_buffers: bool = True):
        self.params = params
        self.default_mesh, self.bucket_bytes = default_mesh, bucket_bytes
        self.shard_dims = shard_dims or {}
        self.sharded, self.reduce_dtype, self.holders = sharded, reduce_dtype, holders
        self.keep_buffers = keep_buffers
        self.enabled = True                   # False inside no_sync()
        # For tests and debugging: (bucket, parameters still without a gradient in this
        # backward) for each bucket launched in the last backward (> 0: overlapped backward).
        self.launch_log: list[tuple[int, int]] = []
        self.buckets: list[_Bucket] = []
        self._trainable: tuple[bool, ...] = ()
        self._task: int | None = None         # the autograd graph task being synced
        self._next = 0                        # buckets launched so far in this backward
        self._delivered = 0                   # of which reduced and delivered
        self._pending = 0
        self._rebuild()
        # Nothing to do for replicas of one rank (tp only), unless gradients go to holders.
        if holders is not None or any(data_parallel_mesh(p, default_mesh).size() > 1 for p in params):
            for p in params:
                _register_hook(p, self._on_grad_ready, before=_clear_elsewhere if holders is not None else None)

    # ---------------------------------------------------------------- buckets

    def layout(self, p: nn.Parameter, parts: int) -> ShardLayout:
        local = _local(p)
        return ShardLayout(local.shape, self.shard_dims.get(id(p), 0) if local.dim() else 0, parts)

    def _rebuild(self) -> None:
        """Bucket the parameters that require a gradient now."""
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
        self._trainable = tuple(p.requires_grad for p in self.params)
        open_buckets: dict = {}   # (mesh, dtype) -> index of the bucket being filled
        groups: list[list] = []   # [mesh, dtype, parameters, bytes], in launch order
        for p in reversed(self.params):
            if not p.requires_grad:
                continue
            mesh = data_parallel_mesh(p, self.default_mesh)
            dtype = self.reduce_dtype or p.dtype
            nbytes = _local(p).numel() * dtype.itemsize
            i = open_buckets.get((mesh, dtype))
            if i is None or (groups[i][3] and groups[i][3] + nbytes > self.bucket_bytes):
                i = open_buckets[(mesh, dtype)] = len(groups)
                groups.append([mesh, dtype, [], 0])
            groups[i][2].append(p)
            groups[i][3] += nbytes
        self.buckets = []
        for mesh, dtype, ps, _ in groups:
            parts = mesh.size() if self.sharded else 1
            self.buckets.append(_Bucket(ps, [self.layout(p, parts) for p in ps], mesh, parts, dtype,
                                        _local(ps[0]).device))
        self._slot_of = {id(s.param): (b, s) for b in self.buckets for s in b.slots}

    # ---------------------------------------------------------------- backward

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if self.holders is None and not self.enabled:
            return                            # no_sync: gradients accumulate in p.grad
        self._enter_backward()
        found = self._slot_of.get(id(p))
        if found is None:                     # requires_grad turned on during this backward
            return
        bucket, slot = found
        if self.holders is not None:
            self._accumulate(bucket, slot)
        if self.enabled:
            self._pending -= 1
            bucket.ready += 1
            self._launch_ready()

    def _enter_backward(self) -> None:
        task = torch._C._current_graph_task_id()
        if task == self._task:
            return
        if self._task is not None:            # the last backward raised before it ended
            self._abandon()
        self._task = task
        if self._trainable != tuple(p.requires_grad for p in self.params):
            self._rebuild()                   # a parameter was frozen or unfrozen since
        if self.enabled:
            self._pending = sum(len(b.slots) for b in self.buckets)
            self.launch_log.clear()
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _accumulate(self, bucket: _Bucket, slot: _Slot) -> None:
        """Add p.grad into its bucket (in the reduction dtype), mark it used, free it."""
        p = slot.param
        rows = bucket.rows(zero=bucket.fresh)
        bucket.fresh = False
        slot.layout.add_to_rows(_local(p.grad), slot.region(rows))
        rows[:, slot.flag] = 1
        p.grad = None

    def _launch_ready(self, force: bool = False) -> None:
        """Launch buckets in index order, each once every bucket before it is launched."""
        while self._next < len(self.buckets) and (
                force or self.buckets[self._next].ready == len(self.buckets[self._next].slots)):
            self._launch(self.buckets[self._next])
            self.launch_log.append((self._next, self._pending))
            self._next += 1
            if not self.keep_buffers:         # ZeRO 2: at most 2 full-size buckets in flight
                while self._next - self._delivered > MAX_IN_FLIGHT:
                    self._wait_and_deliver()

    def _wait_and_deliver(self) -> None:
        bucket = self.buckets[self._delivered]
        if bucket.work is not None:
            bucket.work.wait()
        self._deliver(bucket)
        self._delivered += 1

    def _launch(self, bucket: _Bucket) -> None:
        if self.holders is None:
            rows = bucket.rows()
            for slot in bucket.slots:
                p, region = slot.param, slot.region(rows)[0]
                if p.grad is None:            # not used on this rank (since the last zero_grad)
                    region.zero_()
                    rows[0, slot.flag] = 0
                    continue
                grad = _local(p.grad)
                if grad.data_ptr() != region.data_ptr():
                    region.copy_(grad.reshape(-1))
                    p.grad = as_like(region.view_as(grad), p)   # from now on, a view of the bucket
                rows[0, slot.flag] = 1
        else:
            rows = bucket.rows(zero=bucket.fresh)   # fresh: no parameter of it was used here
            bucket.fresh = False
        # gloo has no AVG: pre-divide, then sum. By the default mesh's size even for a parameter on
        # another mesh: each rank's loss is that share of the global loss (see the module docstring).
        rows[:, :bucket.grad_numel].div_(self.default_mesh.size())
        if bucket.mesh.size() == 1:           # nothing to sum with (parts is 1: the row is the result)
            return
        if bucket.parts == 1:
            bucket.work = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True)
        else:
            bucket.output = torch.empty(bucket.row, dtype=bucket.dtype, device=bucket.device)
            bucket.work = compat.reduce_scatter_into(bucket.output, bucket.buffer, group=bucket.group,
                                                       async_op=True)

    def reduce_accumulated(self) -> None:
        """Reduce now, outside any backward, what backwards run under no_sync() accumulated: the
        end of a synced backward, called by hand. Pipeline parallelism runs each microbatch's
        backward separately (each covers one stage), so it reduces once after the schedule's last."""
        if self.holders is None and self.default_mesh.size() == 1 and all(
                data_parallel_mesh(p, self.default_mesh).size() == 1 for p in self.params):
            return                            # nothing to average: the gradients are on p.grad
        self._finish()

    def _finish(self) -> None:
        """End of a synced backward: launch what is left, wait, deliver the averaged gradients."""
        try:
            self._launch_ready(force=True)
            while self._delivered < len(self.buckets):
                self._wait_and_deliver()
        finally:
            self._reset()

    def _deliver(self, bucket: _Bucket) -> None:
        row = bucket.reduced_row()
        used = (row[bucket.grad_numel:] > 0).tolist()   # one device-to-host copy per bucket
        for slot, is_used in zip(bucket.slots, used):
            p = slot.param
            if not is_used:                   # no rank used it: grad stays None
                continue
            if self.holders is None:
                if p.grad is None:            # used on other ranks only
                    p.grad = as_like(slot.region(row).view_as(_local(p)), p)
                continue
            holder = self.holders[p]
            grad = as_like(slot.layout.own(slot.region(row), bucket.rank if bucket.parts > 1 else 0), holder)
            if holder.grad is None:
                holder.grad = grad
            else:                             # a second synced backward before the step
                holder.grad += grad
            p.grad = GradientElsewhere(p)
        if self.holders is not None:
            bucket.fresh = True
            bucket.output = None
            if not self.keep_buffers:
                bucket.buffer = None          # the reduced gradients live in holder.grad

    def _abandon(self) -> None:
        """A backward raised before its end callback: finish its in-flight reductions (every rank
        that raised at the same point launched the same ones) and forget it."""
        try:
            for bucket in self.buckets:
                if bucket.work is not None:
                    bucket.work.wait()
        finally:
            self._reset()

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.work, bucket.ready = None, 0
        self._next, self._delivered, self._task = 0, 0, None

    def zero_grad(self) -> None:
        """Forget gradients accumulated in the buckets (holders mode): the next backward starts
        from zeros. Called by the model's and the sharded optimizer's zero_grad()."""
        for p in self.params:
            _clear_elsewhere(p)
        for bucket in self.buckets:
            bucket.fresh = True
            if not self.keep_buffers:
                bucket.buffer = None


class GradientElsewhere(torch.Tensor):
    """``p.grad`` of a parameter whose averaged gradient was delivered to the tensor its optimizer
    steps (``zero.optimizer_param(p)``: its ZeRO shard and/or fp32 master). It has p's shape and
    dtype and no data: any op on it raises, saying where the gradient is, so that code reading
    ``p.grad`` (torch's clip_grad_norm_, an optimizer not handed to shard_optimizer) fails instead
    of finding no gradient and silently doing nothing. zero_grad() and the next backward clear it."""

    @staticmethod
    def __new__(cls, p: nn.Parameter):
        return torch.Tensor._make_wrapper_subclass(cls, p.shape, dtype=p.dtype, device=_local(p).device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            f"{func}: this parameter's gradient is not in p.grad: under ZeRO-1/2 or bf16 master weights it "
            f"is delivered to the tensor the optimizer steps, tinymeg.parallel.zero.optimizer_param(p).grad. "
            f"Clip with tinymeg.train.clip_grad_norm_(model.parameters(), max_norm) (or torch's on the "
            f"optimizer's parameters), and build the optimizer through tm.shard_optimizer")

    def __repr__(self) -> str:
        return f"GradientElsewhere(shape={tuple(self.shape)})"


def _clear_elsewhere(p: nn.Parameter, grad=None) -> None:
    """Drop p's GradientElsewhere, before a backward accumulates into p.grad (a tensor hook)."""
    if isinstance(p.grad, GradientElsewhere):
        p.grad = None


def _register_hook(p: nn.Parameter, hook, before=None) -> None:
    """Post-accumulate-grad hook on p (and ``before(p, grad)``, a hook before the gradient is
    accumulated), even if p is frozen now: they fire once p is unfrozen."""
    frozen = not p.requires_grad
    if frozen:
        p.requires_grad_(True)    # torch refuses hooks on tensors that do not require grad
    try:
        p.register_post_accumulate_grad_hook(hook)
        if before is not None:
            p.register_hook(lambda grad, p=p: before(p, grad))
    finally:
        if frozen:
            p.requires_grad_(False)
