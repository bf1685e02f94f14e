"""What the trainer logs about the routing of a mixture of experts (tinymeg/models/moe.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.moe import moe_layers


class RoutingLog:
    """What the trainer logs about routing, over the training forwards of one optimizer step:
    ``aux_loss`` (mean over forwards of the aux losses added to the loss) and
    ``expert_frac_max`` / ``expert_frac_min``, the largest and smallest share of a layer's token
    slots that one expert received (1/E each when balanced; over all layers)."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        self._reset()

    def _reset(self):
        self.forwards, self.aux = 0, 0.0
        self.counts = [torch.zeros(m.n_experts, dtype=torch.float64) for m in self.layers]

    def add(self) -> None:
        """Call after each training forward."""
        self.forwards += 1
        self.aux += float(sum(m.aux_loss.detach() for m in self.layers))
        for total, m in zip(self.counts, self.layers):
            total += m.tokens_per_expert.double().cpu()

    def summary(self) -> dict[str, float]:
        fractions = torch.stack([c / c.sum() for c in self.counts])
        out = {"aux_loss": self.aux / max(1, self.forwards),
               "expert_frac_max": fractions.max().item(), "expert_frac_min": fractions.min().item()}
        self._reset()
        return out
