"""Pipeline parallelism over the mesh's ``pp`` dim: a model split by its blocks into stages.

``apply_pipeline_parallel(model, ctx, schedule="1f1b", microbatches=4)`` keeps, on each pp rank,
only the parts of a model its stages run, in place: the blocks of its stages, plus the
embeddings on the first stage and the final norm and the LM head on the last. It knows no model
class: it splits any ``tinymeg.models.CausalLM`` (GPT-2, Llama) by the parts the model names
(``EMBEDDINGS``, ``BLOCKS``, ``NORM``, ``HEAD``) and runs them by its ``embed`` and
``block_args`` (tinymeg/models/base.py); every other module (Llama's rotary frequencies) stays
on every stage. Every parameter keeps its original name (the blocks live in a ModuleDict keyed
by their index: ``transformer.h.5`` stays ``transformer.h.5``), so the state dict of each rank
is a slice of the unsharded one and a checkpoint saved with pp=2 loads with pp=1 or pp=4. TP, compile and DP then apply to each rank's
part as to any model: ``apply_tensor_parallel`` and ``apply_data_parallel`` after this call.

With ``stages_per_rank=V`` (interleaved 1F1B) the model is cut into ``pp * V`` stages, stage s
on pp rank ``s % pp`` (Megatron's and torch's looped placement), so a rank holds V chunks.

GPT-2 ties ``wte`` and ``lm_head`` (a Llama may): one parameter used on the first stage and on the
last. As in Megatron, both stages hold a copy (made equal at the split), and the two copies' gradients are
summed before every optimizer step, so they get the same update and stay equal: one logical
parameter. Only the first stage's copy counts in the global gradient norm.

The schedules are torch.distributed.pipelining's (``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B`` driving ``PipelineStage``s). Tried on gloo/CPU with tinymeg's TP
(activations between stages are plain local tensors, sequence-sharded under SP), DP and
torch.compile per stage, they give the unsharded losses, gradients and parameters (tested), so
no schedule is written here. What is ours: the split, the loss (each microbatch's share of the
token mean of the micro-batch, or of the step's batch inside ``tinymeg.parallel.token_mean``:
``token_share``, so that ignored targets count right however they fall between microbatches; its
gradient scaled by 1/(microbatches x grad_accum) on the way back, so accumulating over
``train_step`` calls is exact), one gradient reduction per optimizer step after the pipeline
flushes (DP all-reduce, then the tied sum), and the forward-only path (eval, sampling), a plain
stage-to-stage send/recv: its shapes change with every sampled token, which torch's stages,
built for one shape, do not allow.

Every other dim composes with it:

- **Context parallelism**: ``train_step`` and eval take each microbatch's tokens in this cp rank's
  layout (tinymeg.parallel.context_parallel) before the stages run; each stage computes its
  positions from the layout and runs ring attention; stages pass sequence shards. Each cp rank's
  chunks are a forward of their own in the token mean (their shares sum to the microbatch's).
- **Mixture of experts / EP**: only the last stage has the loss, so each MoE layer's aux losses
  ride on its output into backward (``_AuxLossGrad``, Megatron's MoEAuxLossAutoScaler), weighted
  as the microbatch's loss; their statistics are one forward's, a microbatch of every dp rank.
  EP's all-to-alls stay inside a stage.
- **ZeRO-3**: data parallelism makes each of this rank's stages an FSDP2 root (``_Stage``: its
  blocks and its end modules), and torch's PipelineStage reduce-scatters once after the last
  microbatch's backward (``_MeasuredStage.perform_reduce_grad``: not inside ``no_sync()``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..context import ParallelContext
from ..models.base import (CausalLM, call_block, check_sampling, lm_head_loss, logits_loss, sample_token,
                           token_share)
from ..models.hf_io import PretrainedPart
from ..models.moe import moe_layers
from ..nn.layers import local
from .context_parallel import check_seq_len, context_parallel_disabled, gather_sequence, mean_over_cp
from .tensor_parallel import sequence_parallel_size
from .zero import optimizer_param

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}


def stage_layers(n_layer: int, n_stages: int, split_points: list[int] | None = None,
                 uneven: bool = False) -> list[range]:
    """The blocks of each of n_stages stages: an even split, or one starting a stage at each of
    ``split_points`` (n_stages - 1 increasing block indices), or with ``uneven`` as even as
    possible (the first stages take one more). Every stage gets at least one block."""
    if split_points is not None:
        points = list(split_points)
        if len(points) != n_stages - 1:
            raise ValueError(f"split_points={points} must name {n_stages - 1} block indices where stages "
                             f"2..{n_stages} begin (pp x stages_per_rank = {n_stages} stages)")
        bounds = [0, *points, n_layer]
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"split_points={points} must increase strictly within 1..{n_layer - 1} "
                             f"(n_layer={n_layer}): every stage needs at least one block")
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]
    if n_layer < n_stages:
        raise ValueError(f"n_layer={n_layer} blocks cannot fill {n_stages} pipeline stages (pp x "
                         f"stages_per_rank): every stage needs at least one block. Use fewer stages")
    if n_layer % n_stages and not uneven:
        raise ValueError(f"n_layer={n_layer} blocks do not split evenly into {n_stages} pipeline stages "
                         f"(pp x stages_per_rank): choose n_layer divisible by {n_stages}, pass "
                         f"split_points, or ask for an uneven split (uneven=True, --pp-uneven)")
    q, r = divmod(n_layer, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + q + (s < r))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def check_pipeline(n_layer: int, pp: int, schedule: str, microbatches: int, stages_per_rank: int = 1,
                   split_points: list[int] | None = None, uneven: bool = False,
                   micro_batch: int | None = None) -> list[range]:
    """Check a pipeline's settings (no process group needed: the CLI calls it before starting);
    return the blocks of every stage. Each error names the value and the flag that fixes it."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: choose one of {list(SCHEDULES)}")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"pipeline microbatches must be an integer >= 1, got {microbatches!r}")
    if schedule == "interleaved-1f1b" and stages_per_rank < 2:
        raise ValueError(f"interleaved-1f1b runs several stages per rank, but stages_per_rank="
                         f"{stages_per_rank}: pass --pp-stages-per-rank 2 or more, or use 1f1b/gpipe")
    if schedule != "interleaved-1f1b" and stages_per_rank != 1:
        raise ValueError(f"{schedule} runs one stage per rank, but stages_per_rank={stages_per_rank}: "
                         f"use --pp-schedule interleaved-1f1b for several")
    if schedule == "1f1b" and microbatches < pp:
        raise ValueError(f"1f1b needs at least pp={pp} microbatches to fill the pipeline, got "
                         f"{microbatches}: raise --pp-microbatches (or use gpipe)")
    if schedule == "interleaved-1f1b" and microbatches % pp:
        raise ValueError(f"interleaved-1f1b runs microbatches in rounds of pp={pp}, got {microbatches} "
                         f"microbatches: choose --pp-microbatches a multiple of {pp}")
    if micro_batch is not None and micro_batch % microbatches:
        raise ValueError(f"{microbatches} pipeline microbatches do not divide the micro-batch of "
                         f"{micro_batch} sequences: choose --pp-microbatches dividing --micro-batch")
    return stage_layers(n_layer, pp * stages_per_rank, split_points, uneven)


class _Stage(nn.Module):
    """One pipeline stage as torch's PipelineStage runs it: (embeddings,) some blocks (, the final
    norm), as CausalLM.forward runs them. Its modules are the rank's model's own (not copies),
    taken when it is built: after TP, CP and EP, which replace some of them
    (PipelineParallelMixin._stages builds it when it is needed; under ZeRO-3, data parallelism
    builds it and shards it with FSDP2, as torchtitan shards each model chunk). The model is not
    its child, so the model's parameter names stay the unsharded ones. The LM head and the loss
    run in the schedule's loss function, on the last stage's output; the head is registered here
    (``ends``: every module the stage holds besides its blocks) so that every parameter of the rank
    belongs to exactly one stage (FSDP2 keeps a root's parameters gathered through the loss).

    Positions: the whole sequence's 0..T-1, or under context parallelism this cp rank's tokens'
    places in it (the load-balanced layout), so rotary angles and learned positions follow the
    tokens on every stage."""

    def __init__(self, model: CausalLM, layers: range, first: bool, last: bool):
        super().__init__()
        self.__dict__["model"] = model   # for embed and block_args: not a registered child
        self.first, self.last, self.block_size = first, last, model.config.block_size
        self.region = getattr(model, "tp_region", None)  # TP's activation state (tinymeg.nn.region)
        # a stage after the first receives its input on sequence shards under sequence parallelism
        self.seq_shards = 1 if first else sequence_parallel_size(model)
        # the first stage's embeddings, the last's norm and head, and wherever the split kept
        # them, the tied pair (apply_pipeline_parallel)
        ends = ((*model.EMBEDDINGS, model.HEAD) if first else ()) + ((model.NORM, model.HEAD, *model.EMBEDDINGS)
                                                                     if last else ())
        held = {n for n, _ in model.named_modules()}
        self.ends = nn.ModuleDict({n.replace(".", "_"): model.get_submodule(n) for n in dict.fromkeys(ends)
                                   if n in held})
        blocks = model.get_submodule(model.BLOCKS)
        self.blocks = nn.ModuleList(blocks[str(i)] for i in layers)
        self.norm = model.get_submodule(model.NORM) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region is not None:  # as the model's root does at every forward
            self.region.reset()
        n = x.size(1) * self.seq_shards  # this rank's tokens: the sequence, or its cp share
        cp = self.model._cp_state()
        if cp is not None:
            pos = cp.index(n * cp.size, x.device)
        else:  # clamped as CausalLM.generate's: its right padding may pass block_size (never attended to)
            pos = torch.arange(n, device=x.device).clamp(max=self.block_size - 1)
        if self.first:  # token ids -> hidden states
            x = self.model.embed(x, pos)
        args = self.model.block_args(pos)
        for block in self.blocks:
            x = call_block(block, x, args)
        return self.norm(x) if self.last else x


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``. The loss a microbatch
    reports stays its mean, while its gradient counts 1/(microbatches x grad_accum) of a step."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _AuxLossGrad(torch.autograd.Function):
    """Identity on a MoE layer's output; backward also gives the layer's aux loss (balancing and
    z-loss) the gradient it gets as a term of the loss, ``scale`` (Megatron-LM's
    MoEAuxLossAutoScaler). Only the last stage computes the loss, so each stage's aux losses reach
    its parameters this way, in its own backward, without crossing stages."""

    @staticmethod
    def forward(ctx, out, aux, scale):
        ctx.scale, ctx.aux_dtype = scale, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


def _attach_aux_loss(layer: nn.Module, out: torch.Tensor, state: "PipelineState") -> torch.Tensor | None:
    """A MoE layer's forward hook under pipeline parallelism: its aux loss, weighted as the
    microbatch's loss is (1/(microbatches x grad_accum) of a step), rides on its output."""
    if layer.aux_loss is None or not torch.is_grad_enabled():
        return None
    return _AuxLossGrad.apply(out, layer.aux_loss, state.grad_scale)


@dataclass
class PipelineState:
    """What a pipelined model knows about its pipeline (``model.pipeline``)."""
    ctx: ParallelContext
    schedule_name: str
    microbatches: int
    stages_per_rank: int
    layers: list[range]                       # blocks of every global stage
    stage_ids: list[int]                      # this rank's stages, in order
    group: dist.ProcessGroup                  # the pp group: this rank's stages' neighbours
    tied_group: dist.ProcessGroup | None      # first and last stage ranks (a tied embedding/head)
    compile: bool = False
    whole_num_params: int = 0                 # the unsplit model's num_params()
    sync: bool = True                         # False inside no_sync() when DP is not applied
    grad_scale: float = 1.0
    loss_tokens: torch.Tensor | None = None   # token_share's (total, forwards) for this train_step's microbatches
    schedule: object = None                   # built at the first train_step (after TP, DP)
    schedule_shape: tuple = ()
    stage_modules: list | None = None         # ZeRO-3: this rank's stages, FSDP2 roots (built by DP)
    aux_sum: torch.Tensor | float = 0.0       # MoE: this rank's aux losses over this train_step's forwards
    aux_loss: torch.Tensor | None = None      # MoE: the last train_step's aux loss (every stage's layers)
    expert_counts: dict = field(default_factory=dict)  # MoE: id(layer) -> token slots per expert, this step
    # Measurements of the last train_step, for tests and recipes/bench.py pp:
    peak_in_flight: int = 0                   # most microbatches held for backward at once
    measure: bool = False                     # also time this rank's compute (syncs CUDA: slower)
    compute_s: float = 0.0                    # seconds computing (fwd, loss, bwd); the rest is bubble
    _in_flight: int = field(default=0, repr=False)

    @property
    def n_stages(self) -> int:
        return len(self.layers)

    @property
    def last(self) -> bool:
        return self.ctx.pp_rank == self.ctx.pp_size - 1


class PipelineParallelMixin:
    """Mixed into the model's class by apply_pipeline_parallel (as DP's mixin is): the model keeps
    its type, its parameter names and its state_dict keys, and gains the pipeline's entry points.

    - ``train_step(x, y, grad_scale=1.0)``: forward and backward of the micro-batch (x, y), cut into
      microbatches and run by the schedule; returns the mean loss over its counted targets (inside
      ``token_mean``: its share of the step's), in float32, on every rank. Gradients are reduced
      (dp, tied embedding) unless inside ``no_sync()``.
    - ``model(idx, targets, return_logits)``: the model's forward, computed by every stage in turn;
      every rank gets what CausalLM.forward returns (eval uses this unchanged), without gradients.
    - ``generate(...)``: CausalLM.generate, every stage taking part; every rank gets the text.
    """
    pipeline: PipelineState

    # ---- what tensor parallelism asks a pipeline stage (tinymeg.parallel.tensor_parallel)

    @property
    def input_sequence_sharded(self) -> bool:
        """Under sequence parallelism, stages after the first receive their input already split."""
        return self.pipeline.ctx.pp_rank != 0

    @property
    def output_sequence_sharded(self) -> bool:
        """Under sequence parallelism, stages before the last send their output still split."""
        return not self.holds_lm_head

    @property
    def holds_lm_head(self) -> bool:
        return self.pipeline.ctx.pp_rank == self.pipeline.ctx.pp_size - 1

    def num_params(self) -> int:
        """The whole model's parameters (every stage's; the tied weight once), as CausalLM counts them."""
        return self.pipeline.whole_num_params

    @property
    def pretrained_part(self) -> PretrainedPart:
        """For save_pretrained (tinymeg.models.hf_io.write_pretrained): this stage's tensors are
        part pp_rank of the model, written by the stage's first rank, in files of their own."""
        ctx = self.pipeline.ctx
        return PretrainedPart(self.pipeline.group, ctx.pp_rank, ctx.pp_size,
                              writes=ctx.dp_rank == ctx.cp_rank == ctx.tp_rank == 0)

    # ---- training

    def train_step(self, x: torch.Tensor, y: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        st = self.pipeline
        if x.size(0) % st.microbatches:
            raise ValueError(f"{st.microbatches} pipeline microbatches do not divide the micro-batch of "
                             f"{x.size(0)} sequences: choose --pp-microbatches dividing --micro-batch")
        if x.size(1) > self.config.block_size:
            raise ValueError(f"sequence length {x.size(1)} exceeds block_size {self.config.block_size}")
        # Each microbatch's loss is its share of the token mean: of the step's batch inside token_mean
        # (loss_tokens set), else of (x, y); either way split into `microbatches` more forwards, and
        # under context parallelism into cp more: each cp rank's chunks count as a forward of their own
        # (its share, summed over the cp ranks, is the microbatch's; DP averages over dp x cp).
        cp = self._cp_state()
        own = torch.stack([(y != -1).sum(), torch.ones((), dtype=torch.long, device=y.device)])
        tokens = torch.where(self.loss_tokens[1] > 0, self.loss_tokens, own.to(self.loss_tokens.device))
        st.loss_tokens = tokens * tokens.new_tensor([1, st.microbatches * (cp.size if cp else 1)])
        if cp is not None:  # this rank's tokens of the layout, every stage on its sequence shard
            index = self._cp_index(x.size(1), x.device)
            x, y = x.index_select(1, index), y.index_select(1, index)
        schedule = self._schedule_for(tuple(x.shape))
        st.grad_scale = grad_scale / st.microbatches
        st.peak_in_flight = st._in_flight = 0
        st.compute_s, st.aux_sum = 0.0, 0.0
        st.expert_counts.clear()
        losses: list[torch.Tensor] = []
        sync = self._sync_enabled()
        with self._no_dp_sync():  # one reduction after the flush, not one per microbatch
            # the tokens go in at stage 0 only: the others receive activations (torch 2.11 refuses
            # input args on a stage that receives)
            schedule.step(*((x,) if 0 in st.stage_ids else ()), target=y, losses=losses, return_outputs=False)
        if sync:
            self.reduce_gradients()
        return self._step_loss(losses)

    def _step_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The loss of a train_step on every rank (float32): the mean of the microbatches' shares
        (the last stage's; under CP summed over the cp ranks' shares, each a forward of its own)
        plus the MoE layers' aux losses, each stage adding its own layers'."""
        st = self.pipeline
        cp = self._cp_state()
        forwards = st.microbatches * (cp.size if cp else 1)
        ce = torch.stack([l.detach().float() for l in losses]).sum() / forwards if st.last else None
        total = torch.zeros((), dtype=torch.float32, device=st.ctx.device) if ce is None else ce
        if cp is not None:
            dist.all_reduce(total, group=cp.mesh.get_group())
        aux = torch.as_tensor(st.aux_sum, dtype=torch.float32, device=total.device) / st.microbatches
        parts = torch.stack([total, aux])
        dist.all_reduce(parts, group=st.group)   # the stages' parts: the last's cross-entropy, everyone's aux
        st.aux_loss = parts[1]
        return parts.sum()

    def reduce_gradients(self) -> None:
        """After the last microbatch of an optimizer step: gradients averaged over dp x cp
        (tinymeg.parallel.grad_sync: all-reduced, or reduce-scattered into ZeRO 1-2's shards),
        then the tied embedding's copies summed over the first and last stage (both stages' dp
        ranks hold the same shard of it, so ZeRO's shards are summed alike)."""
        sync = getattr(self, "grad_sync", None)
        if sync is not None:
            sync.reduce_accumulated()
        tied = self.pipeline.tied_group
        if tied is not None and self._head.weight.requires_grad:  # frozen: no gradient, no update
            held = optimizer_param(self._head.weight)  # the tied parameter, or its ZeRO shard
            if held.grad is None:
                held.grad = torch.zeros_like(held)
            dist.all_reduce(local(held.grad), group=tied)

    def grad_norm_args(self) -> dict:
        """Keyword arguments for tinymeg.train.optim.clip_grad_norm_: the norm is summed over the
        stages, and the last stage's copy of the tied embedding is clipped but counted once."""
        st = self.pipeline
        shared = [self._head.weight] if st.tied_group is not None and st.last else []
        return {"group": st.group, "shared": shared}

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients without reducing them (DP's no_sync replaces this once DP is applied)."""
        previous, self.pipeline.sync = self.pipeline.sync, False
        try:
            yield
        finally:
            self.pipeline.sync = previous

    def _sync_enabled(self) -> bool:
        sync = getattr(self, "grad_sync", None)
        return sync.enabled if sync is not None else self.pipeline.sync

    def _no_dp_sync(self):
        sync = getattr(self, "grad_sync", None)
        return contextlib.nullcontext() if sync is None else self.no_sync()  # DP's

    def _schedule_for(self, shape: tuple):
        """torch's stages infer their activation shapes once: build them for this batch shape
        (again if it changes), after TP, compile and DP were applied to the stages' modules."""
        st = self.pipeline
        if st.schedule is not None and st.schedule_shape == shape:
            return st.schedule
        stages = []
        for s, stage in zip(st.stage_ids, self._stages()):
            module = torch.compile(stage, fullgraph=True) if st.compile else stage
            stages.append(_MeasuredStage(module, s, st.n_stages, st.ctx.device, group=st.group, state=st))
        schedule_cls = SCHEDULES[st.schedule_name]
        one = stages[0] if st.stages_per_rank == 1 else stages
        st.schedule = schedule_cls(one, st.microbatches, loss_fn=self._microbatch_loss, scale_grads=False)
        st.schedule_shape = shape
        return st.schedule

    def _microbatch_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with _timed(self.pipeline):
            loss = lm_head_loss(self._head, hidden, targets, self.config.vocab_size)
            loss = token_share(loss, (targets != -1).sum(), self.pipeline.loss_tokens)
        return _ScaleGrad.apply(loss, self.pipeline.grad_scale)

    # ---- forward only: eval and sampling

    @torch.no_grad()
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True):
        """CausalLM.forward, stage after stage; every rank returns (logits or None, loss or None).
        For eval and sampling: no autograd graph is kept (the activations cross ranks by plain
        send/recv), so a backward through it fails instead of computing part of the gradients.
        Train with train_step."""
        if not return_logits and targets is None:
            raise ValueError("return_logits=False returns only the loss, so it needs targets")
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {self.config.block_size}")
        st, B, T = self.pipeline, *idx.shape
        cp = self._cp_state()
        if cp is not None:  # every stage on this rank's tokens of the layout (ring attention)
            index = self._cp_index(T, idx.device)
            hidden = self._forward_stages(idx.index_select(1, index))
        else:
            hidden = self._forward_stages(idx)
        logits = loss = None
        if return_logits:
            if st.last:
                logits = self._head(hidden)[..., : self.config.vocab_size]
                if cp is not None:  # back into sequence order, whole on every cp rank
                    logits = gather_sequence(logits, cp)
            logits = self._from_last_stage(logits, (B, T, self.config.vocab_size), self._act_dtype())
        if targets is not None:
            if st.last and return_logits:
                loss = logits_loss(logits, targets)
            elif st.last and cp is not None:  # the mean over every cp rank's counted targets
                mine = targets.index_select(1, index)
                loss = mean_over_cp(lm_head_loss(self._head, hidden, mine, self.config.vocab_size),
                                    (mine != -1).sum(), cp.mesh)
            elif st.last:
                loss = lm_head_loss(self._head, hidden, targets, self.config.vocab_size)
            loss = self._from_last_stage(loss, (), torch.float32)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 context_multiple: int = 1, kv_cache: bool = False) -> torch.Tensor:
        """CausalLM.generate with the last stage sampling: it draws each token exactly as the
        unsharded model does (same logits, same generator) and sends it to the other stages, so
        every rank returns the same text. Only the last stage's ranks use ``generator``.
        Without a KV cache (``kv_cache`` is accepted for CausalLM's signature and ignored):
        each token recomputes the context, as ``CausalLM.generate(kv_cache=False)`` does,
        right-padded to ``context_multiple`` as there (never cropped: that drops a token)."""
        if idx.size(1) < 1:
            raise ValueError("generate needs a prompt of at least one token")
        check_sampling(max_new_tokens, temperature, top_k)  # on every stage, before any of them waits
        with context_parallel_disabled(self):  # every cp rank holds its stages whole: each samples alone
            return self._generate(idx, max_new_tokens, temperature, top_k, generator, context_multiple)

    def _generate(self, idx, max_new_tokens, temperature, top_k, generator, context_multiple):
        st = self.pipeline
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            n = context.size(1)
            hidden = self._forward_stages(F.pad(context, (0, -n % context_multiple)))
            token = None
            if st.last:  # CausalLM.generate's sampling step, at the last real token
                logits = self._head(hidden)[:, n - 1, : self.config.vocab_size]
                token = sample_token(logits, temperature, top_k, generator)
            idx = torch.cat([idx, self._from_last_stage(token, (idx.size(0), 1), idx.dtype)], dim=1)
        return idx

    def _forward_stages(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Run every stage in order on the whole batch, each rank its own stages, activations sent
        to the next stage's rank. Returns the last stage's output there, None elsewhere."""
        st = self.pipeline
        x = None
        for s, stage in zip(st.stage_ids, self._stages()):
            x = idx if s == 0 else self._recv_activation((s - 1) % st.ctx.pp_size)
            x = stage(x)
            if s < st.n_stages - 1:
                self._send_activation(x, (s + 1) % st.ctx.pp_size)
        return x if st.last else None

    @property
    def _head(self) -> nn.Module:
        """The LM head (the last stage's; the first stage's too when it is tied to an embedding)."""
        return self.get_submodule(self.HEAD)

    def _stages(self) -> list[_Stage]:
        st = self.pipeline
        if st.stage_modules is not None:   # ZeRO-3: the FSDP2 roots data parallelism built
            return st.stage_modules
        return [_Stage(self, st.layers[s], first=s == 0, last=s == st.n_stages - 1) for s in st.stage_ids]

    def _cp_state(self):
        """Context parallelism's state when it splits the sequences, else None."""
        cp = getattr(self, "context_parallel", None)
        return cp if cp is not None and cp.enabled else None

    def _cp_index(self, seq_len: int, device) -> torch.Tensor:
        """The positions this cp rank holds of sequences of seq_len tokens (checked: the layout
        cuts them into 2 x cp chunks, and sequence parallelism each rank's share again)."""
        cp = self.context_parallel
        check_seq_len(seq_len, cp.size, cp.tp_seq)
        return cp.index(seq_len, device)

    def _send_activation(self, x: torch.Tensor, group_dst: int) -> None:
        group = self.pipeline.group
        dist.send(torch.tensor(x.shape, dtype=torch.int64, device=x.device), group=group, group_dst=group_dst)
        dist.send(x.contiguous(), group=group, group_dst=group_dst)

    def _recv_activation(self, group_src: int) -> torch.Tensor:
        group, device = self.pipeline.group, self.pipeline.ctx.device
        shape = torch.empty(3, dtype=torch.int64, device=device)  # (B, T or T/tp under SP, C)
        dist.recv(shape, group=group, group_src=group_src)
        x = torch.empty(*shape.tolist(), dtype=self._act_dtype(), device=device)
        dist.recv(x, group=group, group_src=group_src)
        return x

    def _from_last_stage(self, t: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """t, which the last stage's ranks hold (None elsewhere), on every rank of the pipeline, as a
        tensor of this shape and dtype: every rank's buffer agrees, whatever dtype the last stage's
        ops gave t (a loss is float32 from one op and bf16 from another)."""
        st = self.pipeline
        t = t.to(dtype).contiguous() if st.last else torch.empty(shape, dtype=dtype, device=st.ctx.device)
        dist.broadcast(t, group=st.group, group_src=st.ctx.pp_size - 1)
        return t

    def _act_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class _MeasuredStage(PipelineStage):
    """torch's PipelineStage, counting the microbatches whose activations it holds for backward
    (the schedules' memory: GPipe holds all of them, 1F1B at most pp) and, when asked, timing its
    compute (the schedules' bubble is the rest of the step)."""

    def __init__(self, *args, state: PipelineState, **kwargs):
        super().__init__(*args, **kwargs)
        self._state = state
        self._moe = moe_layers(self.submod)

    def forward_one_chunk(self, *args, **kwargs):
        with _timed(self._state):
            out = super().forward_one_chunk(*args, **kwargs)
        for layer in self._moe:   # what the step logs: its layers' aux losses and routing
            if layer.aux_loss is not None:
                self._state.aux_sum = self._state.aux_sum + layer.aux_loss.detach()
                counts = self._state.expert_counts
                counts[id(layer)] = counts.get(id(layer), 0) + layer.tokens_per_expert
        if self.has_backward:
            self._state._in_flight += 1
            self._state.peak_in_flight = max(self._state.peak_in_flight, self._state._in_flight)
        return out

    def backward_one_chunk(self, *args, **kwargs):
        with _timed(self._state):
            out = super().backward_one_chunk(*args, **kwargs)
        self._state._in_flight -= 1
        return out

    def perform_reduce_grad(self, grad_scale_factor: int):
        """After the last microbatch: FSDP2 (ZeRO-3) reduce-scatters the stage's gradients, unless
        this train_step is one of a step's accumulation micro-steps (inside ``no_sync()``): they
        then stay unreduced until the step's last one, so a step reduces once."""
        if self._state.sync:
            super().perform_reduce_grad(grad_scale_factor)


@contextlib.contextmanager
def _timed(state: PipelineState):
    if not state.measure:
        yield
        return
    cuda = state.ctx.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(state.ctx.device)
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(state.ctx.device)
    state.compute_s += time.perf_counter() - t0


_tied_groups: dict = {}


def _tied_group(ctx: ParallelContext) -> dist.ProcessGroup | None:
    """The group of this rank and its twin on the other end of the pipeline (same dp, cp, tp
    coordinates, first and last stage), which hold the two copies of the tied embedding. Every
    rank creates every pair (a collective), once per mesh."""
    ranks = ctx.mesh.mesh                                   # (pp, dp, cp, tp) -> global rank
    pairs = torch.stack([ranks[0].flatten(), ranks[-1].flatten()], dim=1).tolist()
    key = (id(dist.group.WORLD), tuple(map(tuple, pairs)))
    if key not in _tied_groups:
        _tied_groups[key] = dist.new_subgroups_by_enumeration(pairs, timeout=ctx.timeout)[0]
    return _tied_groups[key]


def apply_pipeline_parallel(model: CausalLM, ctx: ParallelContext, schedule: str = "1f1b",
                            microbatches: int | None = None, stages_per_rank: int = 1,
                            split_points: list[int] | None = None, uneven: bool = False,
                            compile: bool = False) -> CausalLM:
    """Keep, on this rank, the stages of ``model`` that ``ctx.pp_rank`` runs, in place; return it.

    ``schedule``: ``gpipe``, ``1f1b`` or ``interleaved-1f1b`` (``stages_per_rank`` > 1 chunks per
    rank). ``microbatches`` (default: pp) split each micro-batch a ``train_step`` gets.
    ``split_points``: the block indices where stages 2.. begin (default: an even split, which
    must divide the blocks unless ``uneven``). ``compile``: torch.compile each stage, when the
    schedule is built at the first train_step (after TP and DP, as the order of application says).
    Call it on every rank with the same arguments, before apply_tensor_parallel/apply_data_parallel.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"apply_pipeline_parallel splits a model by the parts it names (embeddings, blocks, "
                        f"final norm, head: tinymeg.models.CausalLM, as GPT2Model and Llama are), got "
                        f"{type(model).__name__}: adapt a transformers Llama, Qwen2 or Mistral with "
                        f"tm.models.from_transformers(model)")
    if isinstance(model, PipelineParallelMixin):
        raise ValueError("pipeline parallelism was already applied to this model; apply it once")
    if any(isinstance(p, DTensor) for p in model.parameters()) or hasattr(model, "grad_sync"):
        raise ValueError("apply_pipeline_parallel must come first, on a plain model: split the stages, "
                         "then apply tensor and data parallelism to each rank's part")
    pp = ctx.pp_size
    microbatches = pp if microbatches is None else microbatches
    blocks = model.get_submodule(model.BLOCKS)
    layers = check_pipeline(len(blocks), pp, schedule, microbatches, stages_per_rank, split_points, uneven)
    n_stages = len(layers)
    stage_ids = list(range(ctx.pp_rank, n_stages, pp))
    first, last = ctx.pp_rank == 0, ctx.pp_rank == pp - 1
    head = model.get_submodule(model.HEAD)
    # the embedding the head shares its weight with (GPT-2's wte; a tied Llama's embed_tokens), if any
    tied = next((n for n in model.EMBEDDINGS if getattr(model.get_submodule(n), "weight", None) is head.weight), None)
    whole_num_params = model.num_params()

    # Keep this rank's blocks under their original indices; drop the rest.
    _set_submodule(model, model.BLOCKS, nn.ModuleDict({str(i): blocks[i] for s in stage_ids for i in layers[s]}))
    # The tied embedding/head pair stays whole wherever one of them is used, so both stages hold
    # the same modules (and TP shards them alike); unused there, it costs no extra memory.
    if not first:
        for name in model.EMBEDDINGS:
            if not (last and name == tied):
                _set_submodule(model, name, None)
    if not last:
        _set_submodule(model, model.NORM, None)
        if not (first and tied):
            _set_submodule(model, model.HEAD, None)

    tied_group = _tied_group(ctx) if tied and pp > 1 else None
    if tied_group is not None and (first or last):
        with torch.no_grad():  # the last stage's copy starts as the first stage's
            dist.broadcast(head.weight, group=tied_group, group_src=0)

    model.pipeline = state = PipelineState(ctx, schedule, microbatches, stages_per_rank, layers, stage_ids,
                                           ctx.mesh["pp"].get_group(), tied_group if (first or last) else None,
                                           compile=compile, whole_num_params=whole_num_params)
    for layer in moe_layers(model):  # each stage's balancing losses reach its gradients in backward
        layer.register_forward_hook(lambda module, args, out: _attach_aux_loss(module, out, state))
    model.__class__ = type(f"Pipelined{type(model).__name__}", (PipelineParallelMixin, type(model)), {})
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module | None) -> None:
    """Replace the submodule called name; None removes it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if module is None:
        delattr(parent, child)
    else:
        setattr(parent, child, module)
