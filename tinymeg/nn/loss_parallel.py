"""Loss-parallel cross-entropy: the LM head's logits stay sharded over the vocabulary.

Each TP rank holds rows [vocab_start, vocab_start + V/tp) of the head's weight and computes
only those logits, (N, V/tp). The loss needs three numbers per token from all shards (the
max, the sum of exp and the target's logit): they are combined with two all-reduces of
N-sized tensors (a MAX, then a SUM of the rescaled sum-exp and target logit stacked), built
from the same pieces as tinymeg::linear_cross_entropy (chunk_stats, chunk_grad_). The
gradients are computed in the same pass: d logits = softmax - onehot on the local shard,
whence this rank's slice of the weight gradient and a partial gradient of the hidden
states, which the caller's copy_to_tp / gather_seq reduces over TP in backward (the
all-reduce of the head's input gradient that TP has anyway). No rank ever holds (N, V).

Dtypes and shapes as in the fused op: the matmuls run on the whole local shard of the padded
weight (padded columns masked with -inf) in the inputs' dtype, cast to the autocast dtype under
autocast; the softmax statistics and d logits in float32.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..ops import precision
from ..ops.cross_entropy import chunk_grad_, chunk_stats, float_logits
from .functional import all_reduce


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, vocab_size, ignore_index, mesh):
        # Rows of this shard that are real tokens: padding rows (past vocab_size) take no part.
        real = max(0, min(weight.shape[0], vocab_size - vocab_start))
        if real:
            logits = float_logits(hidden @ weight.T, real)               # (N, V/tp): 1/tp of the logits
            row_max, sum_exp, target_logit = chunk_stats(logits, targets, vocab_start)
        else:  # a shard made only of padding
            row_max = torch.full(targets.shape, float("-inf"), device=hidden.device)
            sum_exp = target_logit = torch.zeros(targets.shape, device=hidden.device)
        global_max = all_reduce(row_max, mesh, "max")
        local = torch.stack([sum_exp * (row_max - global_max).exp(), target_logit])
        sum_exp, target_logit = all_reduce(local, mesh)
        lse = global_max + sum_exp.log()
        valid = targets != ignore_index
        row_scale = valid.float() / valid.sum().clamp(min=1)             # mean over counted targets
        loss = ((lse - target_logit) * row_scale).sum()

        if real:
            dlogits = chunk_grad_(logits, lse, targets, row_scale, vocab_start).to(hidden.dtype)
            grad_hidden = dlogits @ weight                               # partial: this shard's share
            grad_weight = dlogits.T @ hidden                             # 0 in the padded rows
        else:
            grad_hidden, grad_weight = torch.zeros_like(hidden), torch.zeros_like(weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None, None


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 vocab_start: int, vocab_size: int, mesh: DeviceMesh,
                                 ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of hidden (..., C) against a vocab-sharded head: weight is this
    rank's (V/tp, C) slice, starting at vocab id vocab_start; hidden must be the same on
    every TP rank. Targets equal to ignore_index count for nothing (all ignored: 0)."""
    hidden, weight = precision.lower(hidden, weight)  # under autocast: a matmul's dtype, as F.linear
    with precision.autocast_off(hidden.device.type):  # the function chose its dtypes: float32 statistics
        return _VocabParallelCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                targets.reshape(-1), vocab_start, vocab_size, ignore_index, mesh)
