"""Optimizer, learning-rate schedule and global-norm gradient clipping."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate

from ..nn.layers import local as _local


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas=(0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with two groups: matrices and embeddings decay, biases and norms do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps,
                             foreach=True)  # torch defaults to a per-tensor loop on CPU: slow with DTensors


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, group: dist.ProcessGroup | None = None,
                    shared=()) -> torch.Tensor:
    """Clip gradients by their global L2 norm and return that norm (before clipping).

    The norm is the unsharded model's: squares of sharded gradients are summed over their
    mesh (each rank holds different elements), replicated ones are counted once. DP
    replicas hold identical gradients after the all-reduce, so no dp reduction is needed.
    Under pipeline parallelism each stage holds other parameters: ``group`` (the pp group) sums
    the stages' squares, and ``shared`` are parameters another stage holds too (the tied
    embedding's second copy): clipped, but counted there only (``model.grad_norm_args()``).
    """
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    counted_elsewhere = {id(p) for p in shared}
    replicated = torch.zeros((), dtype=torch.float32, device=_local(grads[0]).device)
    sharded: dict = {}  # mesh -> sum of squares of this rank's shards
    for p, g in zip(params, grads):
        if id(p) in counted_elsewhere:
            continue
        sq = _local(g).float().pow(2).sum()
        if isinstance(g, DTensor) and any(not isinstance(pl, Replicate) for pl in g.placements):
            sharded[g.device_mesh] = sharded.get(g.device_mesh, 0) + sq
        else:
            replicated += sq
    total = replicated
    for mesh, sq in sharded.items():
        dist.all_reduce(sq, group=mesh.get_group())
        total = total + sq
    if group is not None:
        dist.all_reduce(total, group=group)
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_([_local(g) for g in grads], scale.to(_local(grads[0]).dtype))
    return norm
