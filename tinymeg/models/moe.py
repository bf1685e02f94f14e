"""Mixture of experts for tinymeg's models (GPT-2, Llama), written as plain single-device code.

A MoE layer replaces a block's MLP. A router (a Linear to E logits, softmax in float32) picks
each token's top-k experts and weights them by their probabilities renormalised over the k
chosen; every token reaches all k of its experts (dropless: no capacity, nothing dropped). The
E expert MLPs are the model's own MLP: GPT-2's (``gelu_tanh(x W_fc + b_fc) W_proj + b_proj``) or
Llama's SwiGLU (``(silu(x W_gate) * x W_up) W_down``, gate|up stacked in one ``W_fc``), their
weights stacked on a leading expert dim, and computed at once on the tokens sorted by expert
(``tinymeg::grouped_mm``: one matmul per expert, whatever number of tokens each got).

Two auxiliary losses keep the router healthy; in training they are added to the model's loss:

- load balancing (Switch Transformer / GShard): ``E * sum_e f_e * P_e``, with ``f_e`` the
  fraction of the k*n routed token slots that went to expert e and ``P_e`` the mean router
  probability of expert e over the n tokens. 1 when perfectly balanced; weight
  ``config.aux_loss_weight``.
- router z-loss (ST-MoE): the mean over tokens of ``logsumexp(router logits)^2``, which keeps
  the logits small; weight ``config.z_loss_weight``.

Both are statistics of a batch, so they depend on which tokens the batch holds. They are defined
on the *global* batch of one forward (every data-parallel rank's tokens of one micro-step), so
that a loss does not depend on how the batch is split over ranks: the layer computes its
statistics as sums (``probs.sum(0)``, token counts, the sum of squared logsumexps, the number
of tokens) and hands them to ``reduce_stats`` before dividing. ``reduce_stats`` is None in one
process (the sums are already global); the parallel code (``tinymeg.parallel.expert_parallel``)
sets it to a sum over the ranks. With gradient accumulation each micro-step's forward is one
such batch, and the aux loss of an optimizer step is the mean over its micro-steps, like the
cross-entropy: one process reproduces a run of dp ranks by running micro-batches of dp x
micro_batch sequences with the same number of accumulation steps.

In eval mode the aux losses are not computed (the loss is the cross-entropy alone, comparable
with a dense model's).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import grouped_mm, swiglu

# The expert MLP's activation, on the first matmul's output h: GPT-2's GELU (tanh), or Llama's
# SwiGLU on h = gate | up (each half of h's width).
ACTIVATIONS = {"gelu": lambda h: F.gelu(h, approximate="tanh"),
               "swiglu": lambda h: swiglu(*h.chunk(2, dim=-1))}


def expert_mlp(x: torch.Tensor, counts: torch.Tensor, fc_weight: torch.Tensor,
               fc_bias: torch.Tensor | None, proj_weight: torch.Tensor,
               proj_bias: torch.Tensor | None, activation: str = "gelu") -> torch.Tensor:
    """The MLP of expert e on the rows of x that belong to it, for every e at once.

    x (M, C): rows sorted by expert; counts (G,): rows per expert (summing to M); weights
    stacked by expert: fc_weight (G, C, H) (SwiGLU: (G, C, 2H), gate | up), fc_bias (G, H),
    proj_weight (G, H, C), proj_bias (G, C); ``activation`` one of ACTIVATIONS."""
    offs = counts.cumsum(0).to(torch.int32)
    h = grouped_mm(x, fc_weight, offs)
    if fc_bias is not None or proj_bias is not None:
        # each row's expert: how many groups end at or before it
        expert = torch.searchsorted(offs, torch.arange(x.shape[0], device=x.device, dtype=torch.int32),
                                    right=True)
    if fc_bias is not None:
        h = h + fc_bias[expert]
    y = grouped_mm(ACTIVATIONS[activation](h), proj_weight, offs)
    return y if proj_bias is None else y + proj_bias[expert]


class GroupedExperts(nn.Module):
    """E expert MLPs with stacked weights: fc_weight (E, C, H) (SwiGLU: (E, C, 2H)), fc_bias
    (E, H), proj_weight (E, H, C), proj_bias (E, C) (named ``*_bias`` so that the optimizer does
    not decay them).

    ``forward(x, counts)``: x (M, C) rows sorted by expert, counts (E,) rows per expert -> (M, C).
    Expert parallelism replaces this forward by one that sends the rows to the ranks holding
    their experts (tinymeg.parallel.expert_parallel); the weights and their names stay."""

    def __init__(self, n_experts: int, n_embd: int, hidden: int, bias: bool, proj_std: float,
                 activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"expert activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.n_experts, self.activation = n_experts, activation
        fc_width = 2 * hidden if activation == "swiglu" else hidden
        self.fc_weight = nn.Parameter(torch.empty(n_experts, n_embd, fc_width))
        self.proj_weight = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        self.fc_bias = nn.Parameter(torch.zeros(n_experts, fc_width)) if bias else None
        self.proj_bias = nn.Parameter(torch.zeros(n_experts, n_embd)) if bias else None
        # GPT-2's init (tinymeg's Llama's too): like c_fc and c_proj (the residual projection scaled by depth)
        nn.init.normal_(self.fc_weight, mean=0.0, std=0.02)
        nn.init.normal_(self.proj_weight, mean=0.0, std=proj_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x, counts, self.fc_weight, self.fc_bias, self.proj_weight, self.proj_bias,
                          self.activation)

    def extra_repr(self) -> str:
        E, H, C = self.proj_weight.shape
        return f"experts={E}, n_embd={C}, hidden={H}, bias={self.fc_bias is not None}, {self.activation}"


class MoE(nn.Module):
    """A mixture-of-experts MLP: router, top-k of E experts, dropless, with balancing losses.
    ``config``: the model's (LMConfig: n_embd, n_layer, dropout, the MoE fields); ``hidden``,
    ``activation`` and ``bias``: the expert MLP's (the model's dense MLP's)."""

    def __init__(self, config, hidden: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        C, E = config.n_embd, config.n_experts
        self.n_experts, self.top_k = E, config.top_k
        self.aux_loss_weight, self.z_loss_weight = config.aux_loss_weight, config.z_loss_weight
        self.router = nn.Linear(C, E, bias=False)
        self.experts = GroupedExperts(E, C, hidden, bias, proj_std=0.02 / math.sqrt(2 * config.n_layer),
                                      activation=activation)
        self.dropout = nn.Dropout(config.dropout)
        # Sums the balancing statistics over every rank that holds other tokens of the batch
        # (set by tinymeg.parallel.expert_parallel; None: this process sees the whole batch).
        self.reduce_stats: Callable[[torch.Tensor], torch.Tensor] | None = None
        # After a training forward: this layer's weighted aux loss (part of the model's loss) and
        # the global number of token slots routed to each expert (detached, for logging).
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (n, C) -> router logits (n, E) in float32, probabilities (n, E), each token's chosen
        experts (n, k) and their weights (n, k), the probabilities renormalised over the k."""
        logits = self.router(x).float()  # float32 softmax and top-k: routing decisions are discrete
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return logits, probs, chosen, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs, chosen, weights = self.route(x)
        # Token slot s (= token s // k, its (s % k)-th choice) goes to expert chosen.flatten()[s].
        # Sort the slots by expert (stable: within an expert, in token order) and count them.
        slot_expert = chosen.flatten()
        order = slot_expert.argsort(stable=True)
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, slot_expert, torch.ones_like(slot_expert))
        y = self.experts(x[order // self.top_k], counts)      # (n*k, C), slots in expert order
        y = y[order.argsort()].view(-1, self.top_k, shape[-1])  # back to token order
        out = (y * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
        if self.training:
            self.aux_loss = self._aux_loss(logits, probs, counts)
        else:
            self.aux_loss = self.tokens_per_expert = None
        return self.dropout(out.view(shape))

    def _aux_loss(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Load-balancing and z losses, weighted, from sums over the global batch (see module doc)."""
        E, k = self.n_experts, self.top_k
        stats = torch.cat([probs.sum(0), torch.logsumexp(logits, dim=-1).square().sum().view(1),
                           counts.to(probs.dtype), probs.new_full((1,), logits.shape[0])])
        if self.reduce_stats is not None:
            stats = self.reduce_stats(stats)
        prob_sum, z_sum, count, n = stats.split([E, 1, E, 1])
        balance = E * (count * prob_sum).sum() / (n * n * k)   # E * sum_e (count_e / nk) (prob_sum_e / n)
        self.tokens_per_expert = count.detach()
        return self.aux_loss_weight * balance.squeeze() + self.z_loss_weight * (z_sum / n).squeeze()

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}"


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the MoE layers' aux losses from the last training forward."""
    return sum(m.aux_loss for m in moe_layers(model))
