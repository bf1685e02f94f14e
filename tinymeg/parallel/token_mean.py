"""The loss of a step is the mean over the counted targets of its whole batch, however it is split.

A step's global batch is split over the data-parallel ranks (cp, tp and pp ranks of one dp rank
hold the same sequences), the accumulation micro-steps and the pipeline microbatches, and each
forward computes the mean over its own counted targets (not -1). Averaging those means, as DDP
does, weighs every forward alike instead of every token: where ignored targets fall unevenly,
dp=2 and cp=2 (or 1 and 4 microbatches) give different losses and gradients for the same batch.

``token_mean(model, ctx, targets)`` counts the targets of the step before it runs (this rank's
micro-steps, then one all-reduce of one number over dp: nothing per micro-step) and sets the
model's ``loss_tokens``: inside it each forward's loss is its share of the batch's token mean
(``tinymeg.models.base.token_share``; context parallelism takes the share of its ranks' chunks
together). Averaging as usual then gives the one-process loss and gradients of the whole batch:
``(loss / grad_accum).backward()`` on every rank, DP's mean over dp x cp, the pipeline's
1/microbatches, and the mean over dp of the losses for the log. Where nothing is ignored every
share equals the forward's mean, bit for bit. MoE balancing losses are not shared out: they are
statistics of each micro-step's global batch (tinymeg.models.moe).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..context import ParallelContext


@contextlib.contextmanager
def token_mean(model: nn.Module, ctx: ParallelContext, targets: Sequence[torch.Tensor]):
    """Within: ``model``'s losses are shares of the token mean of the step whose micro-steps have
    ``targets`` on this rank (one tensor per micro-step, as passed to the model or train_step).
    Call it on every rank, around the whole step (every micro-step's forward and backward)."""
    tokens = getattr(model, "loss_tokens", None)
    if tokens is None:
        raise TypeError(f"{type(model).__name__} has no loss_tokens buffer: token_mean shares out the loss of "
                        f"tinymeg's models (tinymeg.models.CausalLM); a model that computes its own loss "
                        f"averages it itself")
    if not targets:
        raise ValueError("token_mean needs the targets of at least one micro-step")
    total = torch.stack([(t != -1).sum() for t in targets]).sum().to(tokens.device)
    if ctx.dp_size > 1:
        dist.all_reduce(total, group=ctx.mesh["dp"].get_group())
    with torch.no_grad():
        tokens.copy_(torch.stack([total, total.new_tensor(ctx.dp_size * len(targets))]))
    try:
        yield
    finally:
        with torch.no_grad():
            tokens.zero_()
