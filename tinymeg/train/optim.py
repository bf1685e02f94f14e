"""Optimizer, learning-rate schedule and global-norm gradient clipping."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate

from ..models.moe import moe_layers
from ..nn.layers import local as _local


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas=(0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with two groups: matrices and embeddings decay, biases and norms do not.

    MoE layers' parameters get two groups of their own (their experts' biases are stacked
    into matrices, so biases are told apart by name): under expert parallelism they live on
    the ep mesh, and one foreach kernel cannot mix them with the other parameters. The groups
    depend on the model, not the mesh, so a checkpoint's optimizer state loads on any mesh."""
    in_moe = {id(p) for m in moe_layers(model) for p in m.parameters()}
    groups = {(moe, decay): [] for moe in (False, True) for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[id(p) in in_moe, p.dim() >= 2 and not name.endswith("bias")].append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": weight_decay if decay else 0.0}
                              for (moe, decay), params in groups.items() if params or not moe],
                             lr=lr, betas=betas, eps=eps,
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
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip gradients by their global L2 norm and return that norm (before clipping).

    The norm is the unsharded model's: squares of sharded gradients are summed over their
    mesh (each rank holds different elements), replicated ones are counted once. DP
    replicas hold identical gradients after the all-reduce, so no dp reduction is needed.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    replicated = torch.zeros((), dtype=torch.float32, device=_local(grads[0]).device)
    sharded: dict = {}  # mesh -> sum of squares of this rank's shards
    for g in grads:
        sq = _local(g).float().pow(2).sum()
        if isinstance(g, DTensor) and any(not isinstance(pl, Replicate) for pl in g.placements):
            sharded[g.device_mesh] = sharded.get(g.device_mesh, 0) + sq
        else:
            replicated += sq
    total = replicated
    for mesh, sq in sharded.items():
        dist.all_reduce(sq, group=mesh.get_group())
        total = total + sq
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_([_local(g) for g in grads], scale.to(_local(grads[0]).dtype))
    return norm
