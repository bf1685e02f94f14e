"""The training loop shared by every recipe: build, parallelize, train, evaluate, sample."""
from __future__ import annotations

import contextlib
import json
import resource
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..context import ParallelContext
from ..data import get_batch, load_corpus
from ..models import GPT2Model, GPTConfig
from ..ops import synchronized
from ..parallel import GPT2_TP_CONFIG, apply_data_parallel, apply_tensor_parallel
from ..parallel.pipeline_parallel import apply_pipeline_parallel
from .checkpoint import Checkpointer, maybe_inject_fault
from .optim import build_optimizer, clip_grad_norm_, lr_at


@dataclass
class TrainConfig:
    tp: int = 1
    dp: int = 1
    pp: int = 1                    # pipeline stages (tinymeg/parallel/pipeline_parallel.py)
    pp_schedule: str = "1f1b"      # gpipe | 1f1b | interleaved-1f1b
    pp_microbatches: int = 0       # each micro-batch is cut into this many; 0: pp
    pp_stages_per_rank: int = 1    # virtual stages per rank: > 1 only for interleaved-1f1b
    pp_split_points: str | None = None  # "2,5": the blocks where stages 2.. begin; None: even
    pp_uneven: bool = False        # allow an even-as-possible split when pp x V does not divide n_layer
    steps: int = 200
    micro_batch: int = 8
    grad_accum: int = 1
    seq_len: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    eval_every: int = 100          # 0: evaluate only at the end
    eval_iters: int = 10
    data: str | None = None        # None: the shipped Shakespeare
    tokenizer: str = "char"
    log_jsonl: str | None = None
    compile: bool = False
    device: str = "auto"           # auto | cpu | cuda
    sample_tokens: int = 200       # 0: no sample at the end
    bucket_mb: float = 25.0
    sequence_parallel: bool = False  # tp > 1: shard activations on the sequence outside TP regions
    loss_parallel: bool = False      # tp > 1: keep the logits vocab-sharded in the loss
    progress: bool = True          # tqdm bar on rank 0
    timeout_s: float = 600.0       # collective timeout: a dead peer is an error after this long
    # Checkpoints (tinymeg/train/checkpoint.py): saved every ckpt_every steps and at the end.
    ckpt_dir: str | None = None
    ckpt_every: int = 0            # 0: only at the end (when ckpt_dir is set)
    keep_last: int = 0             # keep the newest K checkpoints; 0: keep all
    resume: bool = False           # from ckpt_dir's latest, which must exist
    auto_resume: bool = False      # from ckpt_dir's latest if any (crash recovery)
    resume_from: str | None = None # a checkpoint, or a ckpt dir (its latest)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, whatever the mesh."""
        return self.dp * self.micro_batch * self.grad_accum


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux: process RSS


def build_model(cfg: TrainConfig, vocab_size: int, ctx: ParallelContext) -> GPT2Model:
    """The same seed on every rank builds the same model; then shard it over the mesh."""
    torch.manual_seed(cfg.seed)
    model = GPT2Model(GPTConfig(block_size=cfg.seq_len, vocab_size=vocab_size, n_layer=cfg.n_layer,
                                n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)).to(ctx.device)
    if ctx.pp_size > 1:  # split the stages first: TP, compile and DP then apply to this rank's part
        model = apply_pipeline_parallel(model, ctx, **pipeline_args(cfg), compile=cfg.compile)
    if ctx.tp_size > 1:  # at tp=1 plain tensors are cheaper than 1-rank DTensors
        model = apply_tensor_parallel(model, ctx, {**GPT2_TP_CONFIG, "sequence_parallel": cfg.sequence_parallel,
                                                   "loss_parallel": cfg.loss_parallel})
    return apply_data_parallel(model, ctx, cfg.bucket_mb)


def pipeline_args(cfg: TrainConfig) -> dict:
    """apply_pipeline_parallel's arguments (the CLI checks them before anything starts)."""
    try:
        points = [int(p) for p in cfg.pp_split_points.split(",")] if cfg.pp_split_points else None
    except ValueError:
        raise ValueError(f"--pp-split-points {cfg.pp_split_points!r} must be block indices separated "
                         f"by commas, e.g. 2,5") from None
    return dict(schedule=cfg.pp_schedule, microbatches=cfg.pp_microbatches or cfg.pp,
                stages_per_rank=cfg.pp_stages_per_rank, split_points=points, uneven=cfg.pp_uneven)


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, cfg: TrainConfig, ctx: ParallelContext) -> float:
    """Mean loss over eval_iters fixed batches of `tokens`, averaged over dp ranks."""
    model.eval()
    total = torch.zeros((), device=ctx.device)
    for i in range(cfg.eval_iters):
        x, y = get_batch(tokens, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=cfg.seed + 1,
                         step=i, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
        total += model(x.to(ctx.device), y.to(ctx.device), return_logits=False)[1]
    model.train()
    return _dp_mean(total / cfg.eval_iters, ctx)


def _dp_mean(value: torch.Tensor, ctx: ParallelContext) -> float:
    if ctx.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, group=ctx.mesh["dp"].get_group())
        value /= ctx.dp_size
    return value.item()


def train(cfg: TrainConfig, ctx: ParallelContext | None = None) -> dict:
    """Train as cfg says (resuming from a checkpoint if cfg says so). Returns the losses of the
    steps run here (from ``start_step``), the last val loss, throughput, the model and optimizer."""
    device_type = None if cfg.device == "auto" else cfg.device
    ctx = ctx or ParallelContext(pp=cfg.pp, tp=cfg.tp, dp=cfg.dp, device_type=device_type, timeout=cfg.timeout_s)
    if (ctx.pp_size, ctx.tp_size, ctx.dp_size) != (cfg.pp, cfg.tp, cfg.dp):
        raise ValueError(f"config asks for pp={cfg.pp} tp={cfg.tp} dp={cfg.dp} but the context has "
                         f"pp={ctx.pp_size} tp={ctx.tp_size} dp={ctx.dp_size}")
    corpus = load_corpus(cfg.data, cfg.tokenizer)
    model = build_model(cfg, corpus.vocab_size, ctx)
    torch.manual_seed(cfg.seed + 1 + ctx.dp_rank)  # dropout: same on tp ranks, differs across dp
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    step_fn = torch.compile(model, fullgraph=True) if cfg.compile and ctx.pp_size == 1 else model  # pp: per stage
    ckpt = Checkpointer(cfg, ctx, model, optimizer, corpus.tokenizer)
    start_step = ckpt.restore()  # 0, or the step of the checkpoint resumed from

    log = open(cfg.log_jsonl, "a") if cfg.log_jsonl and ctx.is_main else None
    tokens_per_step = cfg.global_batch * cfg.seq_len
    losses, val_loss, start = [], None, time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               disable=not (ctx.is_main and cfg.progress), dynamic_ncols=True)
    for step in bar:
        maybe_inject_fault(step, ctx)  # TINYMEG_FAULT_AT_STEP, for crash-recovery tests
        t0 = time.perf_counter()
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, total=cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=ctx.device)
        for micro in range(cfg.grad_accum):
            x, y = get_batch(corpus.train, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=cfg.seed,
                             step=step, micro_step=micro, grad_accum=cfg.grad_accum,
                             dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
            last = micro == cfg.grad_accum - 1
            # one gradient all-reduce per step; the first step tunes kernels, the same on all ranks
            # (not under pp: the stages run different kernels, so they keep the defaults)
            with (contextlib.nullcontext() if last else model.no_sync(),
                  synchronized() if step == start_step and ctx.pp_size == 1 else contextlib.nullcontext()):
                if ctx.pp_size > 1:  # the schedule runs the forward and backward of every microbatch
                    loss = model.train_step(x.to(ctx.device), y.to(ctx.device), grad_scale=1 / cfg.grad_accum)
                else:
                    loss = step_fn(x.to(ctx.device), y.to(ctx.device), return_logits=False)[1]
                    (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        norm_args = model.grad_norm_args() if ctx.pp_size > 1 else {}  # pp: summed over the stages
        grad_norm = clip_grad_norm_(model.parameters(), cfg.grad_clip, **norm_args) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = _dp_mean(loss_sum / cfg.grad_accum, ctx)
        losses.append(train_loss)
        dt = time.perf_counter() - t0

        record = {"step": step, "loss": train_loss, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                  "ms_per_step": 1000 * dt, "peak_mem_mb": _peak_memory_mb(ctx.device)}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm.item()
        last_step = step == cfg.steps - 1
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last_step:
            val_loss = record["val_loss"] = evaluate(model, corpus.val, cfg, ctx)
            if ctx.is_main and cfg.progress:
                bar.write(f"step {step + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", ms=f"{1000 * dt:.0f}")
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        ckpt.after_step(step + 1)  # every ckpt_every steps and at the end
    wall = time.perf_counter() - start
    if log:
        log.close()

    sample = generate_sample(model, corpus.tokenizer, cfg, ctx) if cfg.sample_tokens else None
    if sample is not None and ctx.is_main and cfg.progress:
        print(f"--- sample ---\n{sample}\n--------------")
    return {"losses": losses, "start_step": start_step, "val_loss": val_loss, "wall_s": wall,
            "tokens_per_s": tokens_per_step * (cfg.steps - start_step) / wall, "sample": sample,
            "config": asdict(cfg), "model": model, "optimizer": optimizer}


def generate_sample(model, tokenizer, cfg: TrainConfig, ctx: ParallelContext) -> str | None:
    """Every rank runs the model (TP needs them all) with the same generator; the text is
    the same everywhere."""
    if tokenizer is None:
        return None
    model.eval()
    multiple = ctx.tp_size if cfg.sequence_parallel else 1  # SP splits the context over tp ranks
    prompt = torch.tensor([tokenizer.encode("\n") * multiple], device=ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    out = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=50, generator=gen,
                         context_multiple=multiple)
    model.train()
    return tokenizer.decode(out[0].tolist())
