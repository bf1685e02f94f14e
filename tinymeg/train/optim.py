"""Optimizer, learning-rate schedule and global-norm gradient clipping."""
from __future__ import annotations

import math
from typing import Callable

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


def compile_step(optimizer: torch.optim.Optimizer, **compile_kwargs) -> Callable[[], None]:
    """optimizer.step compiled by torch.compile: inductor fuses the foreach AdamW update into a
    few loops over all parameters (the main job's CPU step: about 5% faster than eager foreach).

    The schedule changes the learning rate every step, and a float lr is a constant to the
    compiler (a recompile per step), so each group's lr goes in as a 0-d tensor filled before the
    call (AdamW's foreach path takes a tensor lr with capturable=True). Between calls every group
    holds its float lr and flags as before: the trainer, checkpoints and state_dict see no change."""
    step = torch.compile(optimizer.step, **compile_kwargs)
    lr_tensors: list[torch.Tensor] = []

    def run() -> None:
        groups = optimizer.param_groups
        while len(lr_tensors) < len(groups):
            lr_tensors.append(torch.zeros((), device=_local(groups[len(lr_tensors)]["params"][0]).device))
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        for g, t in zip(groups, lr_tensors):
            t.fill_(g["lr"])
            g["lr"], g["capturable"] = t, True
        try:
            step()
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, capturable
    return run


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
