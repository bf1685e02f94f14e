"""Optimizer, learning-rate schedule and global-norm gradient clipping."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from ..compat import StridedShard
from ..models.moe import moe_layers
from ..nn.layers import local as _local
from ..parallel.zero import optimizer_param, shard_optimizer


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas=(0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with two groups: matrices and embeddings decay (``"decays": True``), biases and
    norms do not. Under ZeRO
    1-2 or mixed precision it steps this rank's shards / fp32 masters (``shard_optimizer``).

    MoE layers' parameters get two groups of their own (their experts' biases are stacked
    into matrices, so biases are told apart by name): under expert parallelism they live on
    the ep mesh, and one foreach kernel cannot mix them with the other parameters. The groups
    depend on the model, not the mesh, so a checkpoint's optimizer state loads on any mesh."""
    in_moe = {id(p) for m in moe_layers(model) for p in m.parameters()}
    groups = {(moe, decay): [] for moe in (False, True) for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[id(p) in in_moe, p.dim() >= 2 and not name.endswith("bias")].append(p)
    optimizer = torch.optim.AdamW([{"params": params, "weight_decay": weight_decay if decay else 0.0, "decays": decay}
                                   for (moe, decay), params in groups.items() if params or not moe],
                                  lr=lr, betas=betas, eps=eps,
                                  foreach=True)  # torch defaults to a per-tensor loop on CPU: slow with DTensors
    return shard_optimizer(model, optimizer)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Give build_optimizer's decaying groups this weight decay. Loading a checkpoint restores
    the groups as the saving run had them; the run's own setting applies after it (as the LR
    does: the trainer sets it every step)."""
    for group in optimizer.param_groups:
        if group.get("decays"):
            group["weight_decay"] = weight_decay


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
def clip_grad_norm_(params, max_norm: float, group: dist.ProcessGroup | None = None,
                    shared=()) -> torch.Tensor:
    """Clip gradients by their global L2 norm and return that norm (before clipping).

    The norm is the unsharded model's. A parameter's gradient is read where data parallelism
    left it (``optimizer_param``: its dp shard or fp32 master under ZeRO/mixed precision, the
    parameter itself otherwise). Squares of a sharded gradient are summed over every mesh dim
    that shards it (tp, dp, or both: each rank holds different elements); replicated ones are
    counted once. Gradients are averaged over dp before this, so whether a gradient exists is
    the same on every rank, and so are the collectives below.
    Under pipeline parallelism each stage holds other parameters: ``group`` (the pp group) sums
    the stages' squares, and ``shared`` are parameters another stage holds too (the tied
    embedding's second copy): clipped, but counted there only (``model.grad_norm_args()``).
    """
    counted_elsewhere = {id(p) for p in shared}
    params = list(dict.fromkeys(params))
    grads, counted = [], []
    for p in params:
        if (g := optimizer_param(p).grad) is not None:
            grads.append(g)
            counted.append(id(p) not in counted_elsewhere)
    if not grads and group is None:
        return torch.zeros(())
    # (a pipeline stage without gradients, all its parameters frozen, still joins the pp all-reduce)
    device = _local(grads[0] if grads else params[0]).device
    sums: dict[tuple, torch.Tensor] = {}  # the groups that shard a gradient -> sum of its squares
    for g, count in zip(grads, counted):
        if not count:
            continue
        groups = tuple(g.device_mesh.get_group(i) for i, pl in enumerate(g.placements)
                       if isinstance(pl, (Shard, StridedShard))) if isinstance(g, DTensor) else ()
        sums[groups] = sums.get(groups, torch.zeros((), dtype=torch.float32, device=device)) \
            + _local(g).float().pow(2).sum()
    total = torch.zeros((), dtype=torch.float32, device=device)
    for groups, sq in sums.items():
        for shard_group in groups:
            dist.all_reduce(sq, group=shard_group)
        total = total + sq
    if group is not None:  # the pp group: the other stages' squares
        dist.all_reduce(total, group=group)
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_([_local(g) for g in grads], scale.to(_local(grads[0]).dtype))
    return norm
