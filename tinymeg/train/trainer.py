"""The training loop shared by every recipe.

A run, in order, one function each (a new parallelism adds its part in one place):

1. ``check_config`` (checks.py): a config that cannot run is an error before any rank works.
2. ``mesh_sizes(cfg)``: the mesh dims the flags ask for; ``build_context`` makes the mesh.
3. ``build_model``: the plain model, then parallelized in DESIGN.md's order.
4. ``train_step`` for each step, ``evaluate`` every ``eval_every`` steps, checkpoints
   (checkpoint.py), a JSONL line per step.
5. ``generate_sample`` at the end; rank 0 prints a banner first and a summary last (report.py).

Steps are counted as optimizer steps done: step 1 is the first; the console, the JSONL log
(``"step"``) and checkpoint names (``step_000100`` = after 100 steps) all use that number.
"""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..context import ParallelContext, resolve_sizes
from ..data import TokenizerUnavailable, eval_batch, get_batch, load_corpus
from ..models import MODELS, CausalLM
from ..models.hf_io import init_from_pretrained
from ..ops import synchronized
from ..parallel import compile_model, parallelize, token_mean
from ..parallel.zero import memory_mb
from . import report
from .checkpoint import Checkpointer, maybe_inject_fault
from .checks import (ConfigError, PeerError, check_config, pipeline_args, rank_from_env, run_checked,
                     world_size_from_env)
from .metrics import MetricLog
from .optim import build_optimizer, clip_grad_norm_, compile_step, lr_at
from .routing import RoutingLog


@dataclass
class TrainConfig:
    tp: int = 1
    dp: int = -1                   # -1: the ranks the other dims leave (world / (tp x cp))
    cp: int = 1                    # context parallel: each sequence split over cp ranks
    ep: int = 1                    # expert parallel: experts sharded over ep of the dp ranks
    pp: int = 1                    # pipeline stages (tinymeg/parallel/pipeline_parallel.py)
    pp_schedule: str = "1f1b"      # gpipe | 1f1b | interleaved-1f1b
    pp_microbatches: int = 0       # each micro-batch is cut into this many; 0: pp
    pp_stages_per_rank: int = 1    # virtual stages per rank: > 1 only for interleaved-1f1b
    pp_split_points: str | None = None  # "2,5": the blocks where stages 2.. begin; None: even
    pp_uneven: bool = False        # allow an even-as-possible split when pp x V does not divide n_layer
    model: str = "gpt2"            # gpt2 | llama (tinymeg.models.MODELS)
    steps: int = 200
    micro_batch: int = 8
    grad_accum: int = 1
    seq_len: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int = 0             # llama: key/value heads (grouped-query attention); 0: n_head
    ffn_hidden: int = 0            # llama: the SwiGLU MLP's width; 0: Llama's rule (about 8/3 n_embd)
    rope_theta: float = 10000.0    # llama: rotary's base
    tie_embeddings: bool = False   # llama: the LM head shares the embedding's weight (GPT-2's always does)
    dropout: float = 0.0
    n_experts: int = 0             # > 0: every block's MLP is a mixture of n_experts experts
    top_k: int = 2                 # experts per token (with n_experts > 0)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int | None = None      # None: checks.default_warmup (20 steps, or a tenth of the steps if fewer)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    eval_every: int = 100          # 0: evaluate only at the end
    eval_iters: int = 10           # the val set: eval_iters x global_batch fixed sequences
    data: str | None = None        # None: the shipped Shakespeare
    tokenizer: str = "char"
    log_jsonl: str | None = None
    tensorboard: str | None = None # a TensorBoard log directory (needs the tensorboard package)
    compile: bool = False
    device: str = "auto"           # auto | cpu | cuda
    sample_tokens: int = 200       # 0: no sample at the end
    bucket_mb: float = 25.0
    zero: int = 0                  # ZeRO stage over dp: 0 replicated, 1 optimizer states, 2 + grads, 3 + params
    dtype: str = "fp32"            # fp32 | bf16 (bf16 compute, fp32 master weights/states/grad reduction)
    sequence_parallel: bool = False  # tp > 1: shard activations on the sequence outside TP regions
    loss_parallel: bool = False      # tp > 1: keep the logits vocab-sharded in the loss
    ac: str = "none"               # activation checkpointing: none | full | selective
    progress: bool = True          # tqdm bar on rank 0 (the banner, eval lines and summary print anyway)
    timeout_s: float = 600.0       # collective timeout: a dead peer is an error after this long
    peak_tflops: float = 0.0       # one device's peak, for MFU; 0: a GPU table, or measured on CPU
    # Checkpoints (tinymeg/train/checkpoint.py): saved every ckpt_every steps and at the end.
    ckpt_dir: str | None = None
    ckpt_every: int = 0            # 0: only at the end (when ckpt_dir is set)
    keep_last: int = 0             # keep the newest K checkpoints; 0: keep all
    resume: bool = False           # from ckpt_dir's latest, which must exist
    auto_resume: bool = False      # from ckpt_dir's latest if any (crash recovery)
    resume_from: str | None = None # a checkpoint, or a ckpt dir (its latest)
    init_from: str | None = None   # start from a Hugging Face directory of --model's kind (its shape, not n_layer...)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, whatever the mesh."""
        if self.dp < 1:
            raise ValueError("dp=-1 is resolved from the world size by check_config (train does it)")
        return self.dp * self.micro_batch * self.grad_accum


def mesh_sizes(cfg: TrainConfig) -> dict[str, int]:
    """The mesh dims the config asks for (dp=-1: the ranks the others leave). A parallelism
    with its own flag adds its dim here."""
    return {"pp": cfg.pp, "dp": cfg.dp, "ep": cfg.ep, "cp": cfg.cp, "tp": cfg.tp}


def build_context(cfg: TrainConfig) -> ParallelContext:
    device_type = None if cfg.device == "auto" else cfg.device
    return ParallelContext(mesh_sizes(cfg), device_type=device_type, timeout=cfg.timeout_s)


# Flags that only Llama has (checks.check_config refuses them for GPT-2), with their defaults.
LLAMA_FIELDS = {"n_kv_head": 0, "ffn_hidden": 0, "rope_theta": 10000.0, "tie_embeddings": False}


def model_config(cfg: TrainConfig, vocab_size: int):
    """The config of the model ``cfg.model`` names (GPTConfig, LlamaConfig), from the flags."""
    common = dict(block_size=cfg.seq_len, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_embd=cfg.n_embd, dropout=cfg.dropout, n_experts=cfg.n_experts, top_k=cfg.top_k)
    own = {k: getattr(cfg, k) for k in LLAMA_FIELDS} if cfg.model == "llama" else {}
    return MODELS[cfg.model][1](**common, **own)


def build_model(cfg: TrainConfig, vocab_size: int, ctx: ParallelContext) -> CausalLM:
    """The same seed on every rank builds the same model; then ``tm.parallelize`` applies
    every dim that is on, in DESIGN.md's order (TP + SP/loss parallel, CP, EP, activation
    checkpointing, DP/ZeRO)."""
    torch.manual_seed(cfg.seed)
    model_class = MODELS[cfg.model][0]
    if cfg.init_from:  # published weights: a dense model (checks refuse --n-experts with it)
        model = init_from_pretrained(model_class, cfg.init_from, vocab_size, cfg.seq_len, cfg.dropout)
    else:
        model = model_class(model_config(cfg, vocab_size))
    return parallelize(model.to(ctx.device), ctx, sequence_parallel=cfg.sequence_parallel,
                       loss_parallel=cfg.loss_parallel, bucket_mb=cfg.bucket_mb, zero=cfg.zero,
                       param_dtype=cfg.dtype, compile=cfg.compile and cfg.pp > 1,  # pp: per stage
                       pipeline=pipeline_args(cfg) if cfg.pp > 1 else None, ac=cfg.ac)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux: process RSS


def train_step(step: int, model, step_fn, optimizer, tokens: torch.Tensor, cfg: TrainConfig,
               ctx: ParallelContext, routing: RoutingLog | None = None,
               optimizer_step=None) -> tuple[float, torch.Tensor | None, float, dict]:
    """One optimizer step (0-based ``step``) on the global batch of ``step``: returns the
    mean train loss over the global batch, the gradient norm before clipping, the LR, and
    what else the JSONL records (memory held after the step; MoE routing statistics).
    ``optimizer_step``: optimizer.step, or its compiled form (``compile_step``)."""
    lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, total=cfg.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)  # also clears what a step that raised left behind
    microbatches = model.pipeline.microbatches if ctx.pp_size > 1 else 1  # pp: each forward's rows together
    batches = [get_batch(tokens, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=cfg.seed, step=step,
                         micro_step=micro, grad_accum=cfg.grad_accum, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                         microbatches=microbatches)
               for micro in range(cfg.grad_accum)]
    loss = forward_backward(model, batches, ctx, step_fn, routing)
    norm_args = model.grad_norm_args() if ctx.pp_size > 1 else {}  # pp: summed over the stages
    grad_norm = clip_grad_norm_(model.parameters(), cfg.grad_clip, **norm_args) if cfg.grad_clip > 0 else None
    (optimizer_step or optimizer.step)()
    extras = memory_mb(model, optimizer)  # after the step, before zero_grad frees the gradients
    optimizer.zero_grad(set_to_none=True)
    if routing is not None:
        extras.update(routing.summary())
    return loss, grad_norm, lr, extras


def forward_backward(model, batches: list[tuple[torch.Tensor, torch.Tensor]], ctx: ParallelContext,
                     step_fn=None, routing: RoutingLog | None = None) -> float:
    """Forward and backward of one optimizer step's micro-batches (this rank's (x, y) pairs, one per
    accumulation micro-step), gradients reduced once, after the last. Returns the step's loss, the
    same on every rank: the mean over the counted targets of the global batch (``token_mean``:
    whatever the mesh, the micro-steps and the pipeline's microbatches), plus the MoE balancing
    losses' mean over the micro-steps. ``step_fn``: the model's (compiled) forward."""
    step_fn = step_fn or model
    accum = len(batches)
    loss_sum = torch.zeros((), device=ctx.device)
    with token_mean(model, ctx, [y for _, y in batches]):
        for micro, (x, y) in enumerate(batches):
            x, y = x.to(ctx.device), y.to(ctx.device)
            with contextlib.nullcontext() if micro == accum - 1 else model.no_sync():  # one reduction per step
                if ctx.pp_size > 1:  # pipeline: the schedule runs every microbatch's forward and backward
                    loss = model.train_step(x, y, grad_scale=1 / accum)
                else:
                    loss = step_fn(x, y, return_logits=False)[1]
                    (loss / accum).backward()
            loss_sum += loss.detach()
            if routing is not None:
                routing.add()
    return _dp_mean(loss_sum / accum, ctx)


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, cfg: TrainConfig, ctx: ParallelContext) -> float:
    """Mean loss over the validation set: ``eval_iters x global_batch`` sequences at fixed,
    evenly spaced offsets of ``tokens`` (data.eval_batch). The same sequences whatever the
    mesh, micro-batch and accumulation, so the val loss is split-independent like the train
    loss: each dp rank takes its share of the rows, in micro-batches."""
    n = cfg.eval_iters * cfg.global_batch
    x, y = eval_batch(tokens, seq_len=cfg.seq_len, n_seqs=n)
    mine = slice(ctx.dp_rank * n // ctx.dp_size, (ctx.dp_rank + 1) * n // ctx.dp_size)
    total = torch.zeros((), device=ctx.device)
    was_training = model.training
    model.eval()
    try:
        for xb, yb in zip(x[mine].split(cfg.micro_batch), y[mine].split(cfg.micro_batch)):
            loss = model(xb.to(ctx.device), yb.to(ctx.device), return_logits=False)[1]
            total += loss * len(xb)  # every sequence has seq_len targets: weight by rows
    finally:
        model.train(was_training)
    return _dp_sum(total, ctx) / n


def _dp_sum(value: torch.Tensor, ctx: ParallelContext) -> float:
    if ctx.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, group=ctx.mesh["dp"].get_group())
    return value.item()


def _dp_mean(value: torch.Tensor, ctx: ParallelContext) -> float:
    return _dp_sum(value, ctx) / ctx.dp_size


def _synchronized(ctx: ParallelContext):
    """ops.synchronized() (rank 0 tunes kernels for all), where every rank runs the same ops: not
    under pipeline parallelism, whose stages run different layers (each rank keeps the defaults)."""
    return synchronized() if ctx.pp_size == 1 else contextlib.nullcontext()


def _say(ctx: ParallelContext | None, message: str) -> None:
    """Print on rank 0 (above the progress bar, if there is one)."""
    if ctx.is_main if ctx is not None else rank_from_env() == 0:
        tqdm.write(message)


def train(cfg: TrainConfig, ctx: ParallelContext | None = None) -> dict:
    """Train as cfg says (resuming from a checkpoint if cfg says so). Returns the losses of the
    steps run here, their JSONL records, the last val loss, throughput, the sample, the model
    and the optimizer."""
    world = ctx.world_size if ctx is not None else world_size_from_env()
    cfg = check_config(cfg, world, mesh_sizes(cfg))
    wall_start = time.perf_counter()
    asked = " x ".join(f"{d}={s}" for d, s in mesh_sizes(cfg).items() if s != 1)
    _say(ctx, f"tinymeg: {report.processes(world)}{', ' + asked if asked else ''}: setting up the mesh, the data and "
              f"the model...")
    ctx = ctx or build_context(cfg)
    want = resolve_sizes(mesh_sizes(cfg), ctx.world_size)
    if any(ctx.sizes[d] != size for d, size in want.items()):
        raise ConfigError(f"the config asks for {want} but the context has {ctx.sizes}: build the "
                          f"ParallelContext from the same sizes (trainer.build_context(cfg))")

    corpus = run_checked(ctx, lambda: load_corpus(cfg.data, cfg.tokenizer))
    model = build_model(cfg, corpus.vocab_size, ctx)
    torch.manual_seed(cfg.seed + 1 + ctx.dp_rank)  # dropout: same on tp ranks, differs across dp
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    # pp: the stages compile their forward; their optimizer step stays eager (untested compiled)
    optimizer_step = compile_step(optimizer) if cfg.compile and ctx.pp_size == 1 else optimizer.step
    ckpt = Checkpointer(cfg, ctx, model, optimizer, corpus.tokenizer)
    start_step = ckpt.restore()  # 0, or the step of the checkpoint resumed from
    peak = report.peak_flops(ctx.device, torch.bfloat16 if cfg.dtype == "bf16" else torch.float32, cfg.peak_tflops)
    _say(ctx, report.banner(cfg, ctx, model, corpus, peak=peak, start_step=start_step,
                            resumed_from=ckpt.resumed_from))
    step_fn = compile_model(model) if cfg.compile and ctx.pp_size == 1 else model  # ZeRO-3: per block; pp: per stage
    if cfg.compile and start_step < cfg.steps:
        _say(ctx, "compiling the model (torch.compile, fullgraph): the first step takes a while...")

    records, losses, val_loss, train_s = [], [], None, 0.0
    log = MetricLog(cfg.log_jsonl, cfg.tensorboard, ctx.is_main)
    routing = RoutingLog(model) if cfg.n_experts else None  # aux_loss, expert token fractions
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               disable=not (ctx.is_main and cfg.progress), dynamic_ncols=True)
    try:
        for step in bar:
            maybe_inject_fault(step, ctx)  # TINYMEG_FAULT_AT_STEP, for crash-recovery tests
            done = step + 1                # steps are numbered by optimizer steps done
            t0 = time.perf_counter()
            # the first step tunes kernels: every rank runs the same ops, so rank 0 decides for all
            with _synchronized(ctx) if step == start_step else contextlib.nullcontext():
                train_loss, grad_norm, lr, extras = train_step(step, model, step_fn, optimizer, corpus.train,
                                                               cfg, ctx, routing, optimizer_step)
            dt = time.perf_counter() - t0
            train_s += dt
            if cfg.compile and step == start_step:
                _say(ctx, f"compiled; the first step took {dt:.1f} s")
            losses.append(train_loss)
            record = {"step": done, "loss": train_loss, "lr": lr,
                      "tokens_per_s": cfg.global_batch * cfg.seq_len / dt, "ms_per_step": 1000 * dt,
                      "peak_mem_mb": _peak_memory_mb(ctx.device), **extras}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm.item()
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                with _synchronized(ctx):  # new shapes may be tuned: decided once, on rank 0
                    val_loss = record["val_loss"] = evaluate(model, corpus.val, cfg, ctx)
                _say(ctx, f"step {done}/{cfg.steps}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                          f"lr {lr:.3g}, {record['tokens_per_s']:,.0f} tokens/s")
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", ms=f"{1000 * dt:.0f}")
            records.append(record)
            log.write(record)
            ckpt.after_step(done)  # every ckpt_every steps and at the end
    finally:
        bar.close()
        log.close()
    if start_step >= cfg.steps:
        _say(ctx, f"nothing to train: the checkpoint is at step {start_step} and --steps is {cfg.steps}")
    sample = generate_sample(model, corpus.tokenizer, cfg, ctx) if cfg.sample_tokens else None
    if sample is not None:
        _say(ctx, f"--- sample ---\n{sample}\n--------------")
    wall = time.perf_counter() - wall_start
    _say(ctx, report.summary(cfg, ctx, model, steps_run=len(losses), wall_s=wall, train_s=train_s,
                             last_loss=losses[-1] if losses else None, val_loss=val_loss, peak=peak,
                             checkpoint=ckpt.last_saved))
    return {"losses": losses, "records": records, "start_step": start_step, "val_loss": val_loss,
            "wall_s": wall, "tokens_per_s": cfg.global_batch * cfg.seq_len * len(losses) / max(train_s, 1e-9),
            "sample": sample, "config": asdict(cfg), "model": model, "optimizer": optimizer}


@torch.no_grad()
def generate_sample(model, tokenizer, cfg: TrainConfig, ctx: ParallelContext) -> str | None:
    """Sample cfg.sample_tokens after a newline, with the KV cache. Every rank runs the model
    (TP needs them all) with the same generator: the text is the same everywhere. Under
    sequence parallelism the model's inputs are right-padded to a multiple of tp (exact).
    Without the tokenizer's files (GPT-2 BPE on a machine without network) it says so in one
    line and returns None: the run has trained; only its sample is skipped."""
    if tokenizer is None:
        return None
    try:  # every rank agrees, so that none starts generating alone
        newline = run_checked(ctx, lambda: tokenizer.encode("\n"))
    except TokenizerUnavailable as e:
        _say(ctx, f"no sample: {e}")
        return None
    except PeerError as e:  # this rank has the files, another has not
        _say(ctx, f"no sample: another rank could not load the tokenizer ({e})")
        return None
    prompt = torch.tensor([newline], device=ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    try:
        with _synchronized(ctx):  # generation's shapes are new: tuned once, on rank 0, for all
            out = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=50, generator=gen,
                                 context_multiple=ctx.tp_size if cfg.sequence_parallel else 1)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0].tolist())
