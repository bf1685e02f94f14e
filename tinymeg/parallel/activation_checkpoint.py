"""Activation checkpointing: keep less of each block's forward for backward, recompute the rest.

``apply_activation_checkpointing(model, mode)`` (``tm.parallelize(..., ac=mode)``) changes every
transformer block of a model in place; ``mode`` is one of:

- ``"none"``: nothing changes; backward uses what the forward kept (the fastest, the most memory).
- ``"full"``: a block keeps only its input; backward runs the block's whole forward again first
  (torch.utils.checkpoint, non-reentrant). Activation memory falls to about one block's worth plus
  one input per block, for about one more forward of every block per step.
- ``"selective"``: the same, but a per-op policy (``torch.utils.checkpoint``'s selective checkpoint
  API, as torchtitan's per-op SAC) keeps the outputs that are dear to recompute and recomputes the
  cheap ones: see ``SAVED_OPS`` and ``policy``.

**Which modules are blocks.** Those a tinymeg model names (``BLOCKS``, its protocol: GPT-2's
and Llama's, whole or a pipeline stage's part); in any other model the elements of its outermost
ModuleLists of modules with parameters (a transformers model's decoder layers): nothing about the
class is assumed. A block keeps its name, class (a subclass of it) and state_dict keys:
checkpoints, TP plans and FSDP2 see the same model. (A transformers model's ``config.use_cache``
is turned off, as transformers' own gradient checkpointing does in training: a KV cache filled by
the forward would change what the recomputation attends to.)

**Replayed exactly.** The recomputation must give the values the forward gave:
- random numbers (dropout, tinymeg's per-TP-rank ParallelDropout) come from the RNG state each
  block's forward started with, which torch.utils.checkpoint restores before recomputing;
- a tensor-parallel model's activation state (``tinymeg.nn.region``: is the stream on sequence
  shards, are we inside a column/row pair) is Python state that its layers read and move as
  they run; the block's forward records it on entry and its recomputation starts from it again;
- the autotuner decides a path on its first call and its recomputation looks that choice up
  (``tinymeg.ops.paths`` times its candidates outside any checkpoint);
- a MoE layer's routing: ``full`` recomputes it from the same input with the same ops, so the
  same experts (each rank alone; a different routing would change the all-to-all's shapes,
  which the checkpoint's shape check reports as an error); ``selective`` keeps the router's
  choices (``topk``) and every collective's output, so nothing is re-routed and no rank
  communicates again in backward.

Order in ``tm.parallelize``: after TP, CP and EP (the blocks are final and hold their sharded
layers), before compile and DP/ZeRO (FSDP2 shards the checkpointed blocks and gathers their
parameters again for the recomputation, as in torchtitan).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..ops import grouped_mm  # noqa: F401 - registers tinymeg::grouped_mm, named in SAVED_OPS
from .context_parallel import ring_attention_op  # noqa: F401 - registers tinymeg::ring_attention
from .tensor_parallel import holds_blocks

AC_MODES = ("none", "full", "selective")

_aten, _c10d, _tinymeg = torch.ops.aten, torch.ops._c10d_functional, torch.ops.tinymeg

# What selective checkpointing keeps: the outputs of the ops that cost most to redo.
# Linear layers' products (and the experts' grouped one): kept, except those back to the
# residual stream's width (see ``policy``).
# Each maps to the position of its right-hand matrix, whose last dim is the product's width
# (read from the inputs: torch 2.11's policy context has no op_output).
PRODUCTS = {_aten.mm.default: 1, _aten.addmm.default: 2, _tinymeg.grouped_mm.default: 1}
SAVED_OPS = {
    # batched matmuls (attention's math path)
    _aten.bmm.default, _aten.baddbmm.default,
    # fused attention (out, log-sum-exp): each kernel PyTorch's SDPA may pick, and the ring
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _tinymeg.ring_attention.default,
    # a MoE layer's routing decision: never re-routed
    _aten.topk.default,
    # communication: the recomputation never talks to another rank
    _c10d.all_reduce.default, _c10d.all_gather_into_tensor.default, _c10d.reduce_scatter_tensor.default,
    _c10d.all_to_all_single.default,
}


def policy(width: int, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's choice for one op of a block whose input (the residual stream)
    is ``width`` wide: keep SAVED_OPS' outputs and the products of Linear layers, recompute the
    rest (norms, activations, softmax, dropout, residual adds, copies). A product as wide as the
    stream is recomputed too. Those are the output projections (attention's and the MLP's), whose
    outputs backward needs only to rebuild the stream (the block's last one not at all): keeping
    each would cost a stream's width of memory per token to save one matmul from an input that is
    kept anyway. (A query projection as wide as the stream, Llama's without TP, is recomputed by
    the same rule, for the same trade.)"""
    if op in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    if op in PRODUCTS and args[PRODUCTS[op]].size(-1) != width:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_full_checkpoint = functools.partial(checkpoint, use_reentrant=False)


def _selective_checkpoint(width: int):
    """checkpoint with the selective policy of a block of this width (a partial, which is how
    torch.compile takes a context_fn: read as a constant when traced)."""
    context = functools.partial(create_selective_checkpoint_contexts, functools.partial(policy, width))
    return functools.partial(checkpoint, use_reentrant=False, context_fn=context)


class CheckpointedBlock:
    """Mixed into a block's class: its forward runs under torch.utils.checkpoint (see the module
    docstring). Hooks on the block (FSDP2's, sequence parallelism's) run outside the checkpoint,
    once per forward; the TP activation state they set is replayed from ``ac_region``."""
    ac_mode: str
    ac_region: object | None  # the model's tinymeg.nn.region.Region, under tensor parallelism

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # eval, generation: nothing is kept for backward anyway
            return super().forward(*args, **kwargs)
        region = self.ac_region
        entry = region.state() if region is not None else None
        block_forward = super().forward

        def replayable(*args, **kwargs):
            if region is not None:  # the forward's own start, or the recomputation's (in backward)
                region.restore(entry)
            return block_forward(*args, **kwargs)

        run = _selective_checkpoint(_stream_width(args, kwargs)) if self.ac_mode == "selective" else _full_checkpoint
        return run(replayable, *args, **kwargs)


def _stream_width(args: tuple, kwargs: dict) -> int:
    """The residual stream's width: the last dim of the block's first tensor argument."""
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).size(-1)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a model: those its ``BLOCKS`` names (tinymeg's models say where their blocks
    are: tinymeg.models.base), else the elements of each outermost ModuleList (or digit-keyed
    ModuleDict: a pipeline stage's blocks) of modules with parameters (any other model)."""
    if getattr(model, "BLOCKS", None) is not None:
        return list(_members(model.get_submodule(model.BLOCKS)))
    blocks, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside) or not holds_blocks(module):
            continue
        members = [m for m in _members(module) if any(True for _ in m.parameters())]
        if members:
            blocks.extend(members)
            inside.append(name + ".")
    return blocks


def _members(holder: nn.Module):
    return holder.values() if isinstance(holder, nn.ModuleDict) else holder


def check_ac_mode(mode) -> None:
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(AC_MODES)}: "
                         f"use 'full' (each block keeps its input only), 'selective' (keeps matmul, "
                         f"attention and communication outputs) or 'none'")


_classes: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """Checkpointed{cls}: one class per block class, as fully_shard's FSDP{cls}."""
    if cls not in _classes:
        _classes[cls] = type(f"Checkpointed{cls.__name__}", (CheckpointedBlock, cls), {})
    return _classes[cls]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every transformer block of ``model`` in place (``mode``: "none", "full" or
    "selective"; see the module docstring) and return it."""
    check_ac_mode(mode)
    if mode == "none":
        return model
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"activation checkpointing found no blocks in {type(model).__name__}: it checkpoints "
                         f"the elements of the model's ModuleList of transformer blocks, and there is none")
    if any(isinstance(b, CheckpointedBlock) for b in blocks):
        raise ValueError("activation checkpointing was already applied to this model; apply it once")
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        # A transformers model would append each forward's keys and values to a KV cache, so the
        # recomputation would attend over the forward's too: off, as transformers' own gradient
        # checkpointing turns it off in training.
        config.use_cache = False
    region = getattr(model, "tp_region", None)
    for block in blocks:
        block.__class__ = _checkpointed_class(type(block))
        block.ac_mode, block.ac_region = mode, region
    return model
