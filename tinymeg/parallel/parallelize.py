"""``tm.parallelize``: every parallel dim applied to a plain model, in the one right order.

A recipe builds the plain single-device model and calls ``parallelize(model, ctx)``; the mesh
(``ctx``) says which dims are on. The order matters and lives only here:

1. **pipeline** (pp): split the model into stages first, so every later step sees only this
   stage's layers (``pipeline=dict(schedule=, microbatches=, ...)``: apply_pipeline_parallel's
   options). Under pp, compile is per stage (when the schedule is built; ZeRO-3: per block), and
   ZeRO-3 shards each stage as an FSDP2 root of its own.
2. **tensor** (tp, + sequence and loss parallel): swap Linears/Embeddings for sharded ones; the
   parameters become DTensors on the tp mesh.
3. **context** (cp): swap attention's core for ring attention and split the sequence; it reads
   the TP model (sequence parallelism splits each cp rank's tokens again over tp).
4. **experts** (ep): shard the experts over the ep ranks carved out of dp.
5. **activation checkpointing** (``ac="full"`` or ``"selective"``): each block, now holding its
   final (sharded) layers, keeps less for backward and recomputes the rest
   (``apply_activation_checkpointing``); compile then traces the checkpoints, and FSDP2 shards the
   checkpointed blocks.
6. **compile**: ``torch.compile`` the forward in place (``fullgraph=True``), after the modules
   are final and before DP hooks into the parameters (ZeRO-3: after DP, block by block, since
   FSDP2's hooks run between compiled blocks).
7. **data** (dp, and cp for the weights; ZeRO stage ``zero``, mixed precision ``param_dtype``):
   last, because it hooks the gradients of the final parameters and averages them over dp x cp.
   Always applied (``no_sync`` then exists on every mesh); with one data-parallel rank it
   communicates nothing.
"""
from __future__ import annotations

import torch.nn as nn

from ..context import ParallelContext
from .activation_checkpoint import apply_activation_checkpointing, check_ac_mode
from .context_parallel import apply_context_parallel
from .data_parallel import DEFAULT_BUCKET_MB, apply_data_parallel, compile_model
from ..models.moe import moe_layers
from .expert_parallel import apply_expert_parallel, unprepared_moe_layers
from .pipeline_parallel import apply_pipeline_parallel
from .plans import for_model
from .tensor_parallel import apply_tensor_parallel


def parallelize(model: nn.Module, ctx: ParallelContext, plan: dict | None = None, *,
                sequence_parallel: bool = False, loss_parallel: bool = False,
                bucket_mb: float = DEFAULT_BUCKET_MB, zero: int = 0, param_dtype=None, compile: bool = False,
                cp_block: str = "auto",
                pipeline: dict | None = None, ac: str = "none") -> nn.Module:
    """Apply every dim of ``ctx`` that is on to ``model`` (in place) and return it.

    ``plan``: the tensor-parallel plan (either form of ``apply_tensor_parallel``; default
    the shipped plan for the model, ``tm.plans.for_model``: tinymeg's GPT-2 and Llama,
    transformers' Llama, Qwen2, Mistral, GPT-2); ``sequence_parallel`` / ``loss_parallel`` switch those on in it (both need tp > 1
    and are ignored at tp = 1, where there is nothing to shard). ``bucket_mb``, ``zero``,
    ``param_dtype``: see ``apply_data_parallel``. ``compile``: ``torch.compile(fullgraph=True)`` the model's forward in place.
    ``cp_block``: see ``apply_context_parallel``. ``pipeline``: the
    keyword arguments of ``apply_pipeline_parallel`` (schedule, microbatches, stages_per_rank,
    split_points, uneven) when pp > 1; train a pipelined model with ``model.train_step``.
    ``ac``: activation checkpointing, "none", "full" or "selective" (see ``apply_activation_checkpointing``).
    """
    check_ac_mode(ac)  # before anything changes
    # 1. Pipeline parallelism: this rank keeps its stages' layers.
    if ctx.pp_size > 1:  # compile: per stage when the schedule is built; ZeRO-3: per block, below
        model = apply_pipeline_parallel(model, ctx, **(pipeline or {}), compile=compile and zero != 3)
    elif pipeline:
        raise ValueError(f"pipeline options {sorted(pipeline)} given, but the mesh has pp=1: pass a "
                         f"ParallelContext with pp > 1, or leave pipeline out")
    # 2. Tensor parallelism (+ sequence parallel, loss parallel).
    if ctx.tp_size > 1:  # at tp=1 plain tensors are cheaper than 1-rank DTensors
        tp_config = dict(for_model(model) if plan is None else plan)
        tp_config["sequence_parallel"] = sequence_parallel or tp_config.get("sequence_parallel", False)
        tp_config["loss_parallel"] = loss_parallel or tp_config.get("loss_parallel", False)
        model = apply_tensor_parallel(model, ctx, tp_config, sync_replicas=False)  # step 7 broadcasts
    # 3. Context parallelism.
    if ctx.cp_size > 1:
        model = apply_context_parallel(model, ctx, cp_block)
    # 4. Expert parallelism (and, on any mesh, the MoE layers' global balancing statistics).
    if unprepared_moe_layers(model):
        model = apply_expert_parallel(model, ctx)
    elif ctx.ep_size > 1 and not moe_layers(model):
        raise ValueError(f"ep={ctx.ep_size} shards experts, but {type(model).__name__} has no MoE layers: "
                         f"build it with experts (n_experts=E in its config) or leave ep out")
    # 5. Activation checkpointing, block by block.
    model = apply_activation_checkpointing(model, ac)
    # 6. Compile, in place: the module keeps its identity, class and state_dict keys.
    if compile and zero != 3 and ctx.pp_size == 1:
        model.compile(fullgraph=True)
    # 7. Data parallelism over dp x cp, last.
    model = apply_data_parallel(model, ctx, bucket_mb, zero=zero, param_dtype=param_dtype)
    if compile and zero == 3:
        compile_model(model)  # each FSDP block's forward, in place
    return model

