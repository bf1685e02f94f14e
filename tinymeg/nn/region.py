"""Where a tensor-parallel model's activations are, tracked while its forward runs.

Between modules, the activations of a TP model are in one of these states:

| state                 | what each TP rank holds                    | gradients flowing back |
|-----------------------|--------------------------------------------|------------------------|
| residual              | the whole tensor, the same on every rank   | whole                  |
| residual, seq-sharded | its slice of the sequence (SP)             | partial                |
| gathered              | the whole tensor, gathered from SP slices  | partial                |
| sharded               | its slice of the features (heads) between  | partial                |
|                       | a column-parallel layer and its row layer  |                        |

Three decisions depend on it, for modules that tinymeg does not shard and so cannot know
from their class where they run:

- a replicated parameter's gradient is all-reduced over TP where gradients are partial
  (a norm on sequence shards, a per-head norm between q_proj and o_proj);
- a dropout draws a different mask on each rank where the ranks hold different data
  (sequence shards, heads) and the same mask where they hold the same data;
- a column-parallel layer all-gathers a seq-sharded input, copies a whole one (all-reduce
  of its gradient) or takes a gathered one as is; a row-parallel layer reduce-scatters back
  onto the sequence or all-reduces.

The parallel layers move the state as they run; the model's root resets it at every forward,
so an exception in the middle of one leaves nothing behind. It is plain Python state read
while tracing, so torch.compile specialises the graph on it (the same at every call).
"""
from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from .functional import copy_to_tp, gather_seq, reduce_from_tp, reduce_scatter_seq

RESIDUAL, GATHERED, SHARDED = "residual", "gathered", "sharded"


class Region:
    """The activation state of one tensor-parallel model (see the module docstring)."""

    def __init__(self, mesh: DeviceMesh, sequence_parallel: bool = False):
        self.mesh = mesh
        self.sequence_parallel = sequence_parallel  # does the model have an SP span at all
        self.reset()

    def reset(self) -> None:
        self.seq = False        # the residual stream is sequence-sharded (inside the SP span)
        self.where = RESIDUAL   # RESIDUAL, GATHERED or SHARDED
        self.opened_from = RESIDUAL  # where the current SHARDED region was entered from

    def state(self) -> tuple:
        """Where the activations are now: activation checkpointing replays a block's forward
        (in backward) from the state its first run started in."""
        return self.seq, self.where, self.opened_from

    def restore(self, state: tuple) -> None:
        self.seq, self.where, self.opened_from = state

    def ranks_differ(self) -> bool:
        """Do the TP ranks hold different data here (their tokens, or their heads)?"""
        return self.where == SHARDED or (self.where == RESIDUAL and self.seq)

    def partial_grads(self) -> bool:
        """Are the gradients flowing back into this point partial sums over the TP ranks?"""
        return self.where != RESIDUAL or self.seq

    # ---- transitions, called by the parallel layers and the SP hooks

    def enter_column(self, x, name: str, gather_output: bool):
        # Several column layers may take the same input (q, k, v): a column met inside a TP
        # region takes it as the one that opened the region did.
        source = self.opened_from if self.where == SHARDED else self.where
        if source == GATHERED:
            y = x                                   # gathered once for all the parent's column layers
        elif self.seq:
            y = gather_seq(x, self.mesh)
        else:
            y = copy_to_tp(x, self.mesh)
        if not gather_output:
            if self.where != SHARDED:
                self.opened_from = self.where
            self.where = SHARDED
        elif source == RESIDUAL:
            self.seq = False                        # a gathering head (lm_head) ends the SP span
        return y

    def leave_row(self, y, name: str):
        if self.where != SHARDED:
            raise RuntimeError(
                f"row-parallel layer {name!r} ran without a column-parallel layer before it, so its "
                f"input is not sharded on features. Pair it with the layer(s) that produce its input "
                f"(ColumnParallel), or take it out of the plan")
        self.where = RESIDUAL
        return reduce_scatter_seq(y, self.mesh) if self.seq else reduce_from_tp(y, self.mesh)

    def gather_for_block(self, x):
        """SP: the input of a module holding column-parallel layers (attention, MLP) is gathered
        once, so that the module sees the whole sequence (Hugging Face attention reads the
        length from its input) and its column layers take it as is."""
        if self.where == RESIDUAL and self.seq:
            self.where = GATHERED
            return gather_seq(x, self.mesh)
        return x
