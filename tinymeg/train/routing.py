"""What the trainer logs about the routing of a mixture of experts (tinymeg/models/moe.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.moe import moe_layers


class RoutingLog:
    """What the trainer logs about routing, over the training forwards of one optimizer step:
    ``aux_loss`` (mean over forwards of the aux losses added to the loss) and
    ``expert_frac_max`` / ``expert_frac_min``, the largest and smallest share of a layer's token
    slots that one expert received (1/E each when balanced; over all layers).

    Under pipeline parallelism each rank holds its stages' layers: a ``train_step`` runs several
    forwards (its microbatches), whose aux losses (every stage's) and token counts the pipeline
    keeps (``model.pipeline``), and the shares are combined over the stages."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        self.pipeline = getattr(model, "pipeline", None)
        self._reset()

    def _reset(self):
        self.forwards, self.aux = 0, 0.0
        self.counts = [torch.zeros(m.n_experts, dtype=torch.float64) for m in self.layers]

    def add(self) -> None:
        """Call after each training forward (under pipeline parallelism: each train_step)."""
        self.forwards += 1
        if self.pipeline is not None:
            self.aux += float(self.pipeline.aux_loss)
            counts = [self.pipeline.expert_counts[id(m)] for m in self.layers]
        else:
            self.aux += float(sum(m.aux_loss.detach() for m in self.layers))
            counts = [m.tokens_per_expert for m in self.layers]
        for total, c in zip(self.counts, counts):
            total += c.double().cpu()

    def summary(self) -> dict[str, float]:
        fractions = torch.cat([c / c.sum() for c in self.counts]) if self.counts else torch.zeros(0)
        top, bottom = (fractions.max().item(), fractions.min().item()) if len(fractions) else (0.0, 1.0)
        if self.pipeline is not None:  # over every stage's layers
            extremes = torch.tensor([top, -bottom], dtype=torch.float64, device=self.pipeline.ctx.device)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.pipeline.group)
            top, bottom = extremes[0].item(), -extremes[1].item()
        out = {"aux_loss": self.aux / max(1, self.forwards), "expert_frac_max": top, "expert_frac_min": bottom}
        self._reset()
        return out
