"""What a run prints about itself on rank 0: the banner, the end summary, and MFU.

MFU (model FLOPs utilisation) = the FLOPs the model needs per second at the measured token
rate / the peak FLOPs of the devices. The model's FLOPs per token are PaLM's estimate:
``6 N`` for the weights (forward 2, backward 4 per parameter and token) plus ``12 L T C`` for
attention's scores and weighted sum; N counts every parameter but the position embeddings
(a lookup; the tied token embedding is the LM head's matmul). The peak is one
device's: from ``--peak-tflops``, else from the table below for known GPUs (dense, no
sparsity, NVIDIA's datasheets), else, on CPU, measured at start-up: the best of short timings
of a one-thread matmul, by CPU time (``core_matmul_flops``), times the threads of a rank.
"""
from __future__ import annotations

import functools
import time

import torch

# Dense peak TFLOP/s per GPU: bf16/fp16 tensor cores, tf32 tensor cores, plain fp32.
# Matched against torch.cuda.get_device_name() in this order (first substring that matches).
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9},     # SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "V100": {"bf16": 125.0, "tf32": 15.7, "fp32": 15.7},       # fp16 tensor cores; no tf32
    "T4": {"bf16": 65.0, "tf32": 8.1, "fp32": 8.1},            # fp16 tensor cores
}


def processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's estimate: the model's own count
    (GPT2Model/Llama.flops_per_token; global sizes, also under TP and PP)."""
    return model.flops_per_token(seq_len)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
               configured_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where that number comes from)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = ("bf16" if dtype in (torch.bfloat16, torch.float16)
                else "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32")
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peaks[kind] * 1e12, f"{name}, {kind} dense, datasheet"
        return 0.0, f"{name} is not in tinymeg's table: pass --peak-tflops for MFU"
    threads = torch.get_num_threads()
    return threads * core_matmul_flops(dtype), (
        f"measured: the best 1-thread {str(dtype).removeprefix('torch.')} matmul by CPU time"
        + (f", x {threads} threads" if threads > 1 else "") + " per rank")


@functools.lru_cache(maxsize=None)  # once per process: a pool of test ranks trains many times
def core_matmul_flops(dtype: torch.dtype, n: int = 256, trials: int = 20, calls: int = 3) -> float:
    """FLOP/s of one CPU core on an n x n matmul: the best of ``trials`` short timings, each
    by the thread's CPU time. Why: other processes (the run's other ranks, other jobs) take the
    core away at times; the CPU time does not count those, and a trial of a millisecond or so
    mostly fits between them. Timed by the wall clock over a longer span, the peak came out
    up to 30x too low on a loaded machine, and MFU above 100%."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm up
        best = 0.0
        for _ in range(trials):
            t0 = time.thread_time()
            for _ in range(calls):
                a @ b
            best = max(best, 2 * n ** 3 * calls / max(time.thread_time() - t0, 1e-9))
        return best
    finally:
        torch.set_num_threads(threads)


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def banner(cfg, ctx, model, corpus, *, peak: tuple[float, str], start_step: int, resumed_from: str | None) -> str:
    c = model.config
    data = "shipped Tiny Shakespeare" if cfg.data is None else cfg.data
    tok = type(corpus.tokenizer).__name__ if corpus.tokenizer is not None else "token ids"
    lines = [
        ("model", f"{'Llama' if cfg.model == 'llama' else 'GPT-2'}, {format_count(model.num_params())} parameters: "
                  f"{c.n_layer} layers, {c.n_head} heads"
                  + (f" ({c.kv_heads} key/value)" if getattr(c, "kv_heads", c.n_head) != c.n_head else "")
                  + f", width {c.n_embd}, context {c.block_size}, vocabulary {c.vocab_size}"
                  + (f" (padded to {c.padded_vocab_size})" if c.padded_vocab_size != c.vocab_size else "")
                  + (f"; weights from {cfg.init_from} (--init-from)" if cfg.init_from and not resumed_from else "")),
        ("mesh", (f"{ctx.describe()} on {processes(ctx.world_size)}" if ctx.world_size > 1 else "1 process")
                 + f", {ctx.device.type} "
                 f"({'nccl' if ctx.device.type == 'cuda' else 'gloo'})"
                 + "".join(f", {name}" for name, on in (
                     (f"ZeRO-{cfg.zero}", cfg.zero),
                     ("bf16 (fp32 master weights)", cfg.dtype == "bf16"),
                     ("sequence parallel", cfg.sequence_parallel),
                     ("loss parallel", cfg.loss_parallel),
                     ("torch.compile", cfg.compile),
                     (f"{cfg.ac} activation checkpointing", cfg.ac != "none")) if on)),
        ("batch", f"{cfg.global_batch} sequences per step = dp {cfg.dp} x micro-batch {cfg.micro_batch} x "
                  f"grad-accum {cfg.grad_accum}; {cfg.global_batch * cfg.seq_len:,} tokens per step"),
        ("data", f"{data}, {tok}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens; "
                 f"val loss on {cfg.eval_iters * cfg.global_batch} fixed sequences "
                 + (f"every {cfg.eval_every} steps" if cfg.eval_every else "at the end")),
        ("train", f"{cfg.steps} steps, AdamW lr {cfg.lr:g} (warmup {cfg.warmup}, cosine to {cfg.min_lr:g}), "
                  f"weight decay {cfg.weight_decay:g}, clip {cfg.grad_clip:g}, seed {cfg.seed}"),
        ("peak", f"{peak[0] / 1e12:.3g} TFLOP/s per device ({peak[1]}); "
                 f"{flops_per_token(model, cfg.seq_len) / 1e6:.3g} MFLOP per token"),
    ]
    out = [f"log: {cfg.log_jsonl}"] if cfg.log_jsonl else []
    if cfg.ckpt_dir:
        every = f"every {cfg.ckpt_every} steps and at the end" if cfg.ckpt_every else "at the end"
        out.append(f"checkpoints: {cfg.ckpt_dir} ({every}" + (f", keep {cfg.keep_last})" if cfg.keep_last else ")"))
    if out:
        lines.append(("output", "; ".join(out)))
    if resumed_from:
        lines.append(("resume", f"from {resumed_from} at step {start_step}"))
    return "\n".join(f"{k:>7} | {v}" for k, v in lines)


def summary(cfg, ctx, model, *, steps_run: int, wall_s: float, train_s: float, last_loss: float | None,
            val_loss: float | None, peak: tuple[float, str], checkpoint: str | None) -> str:
    tokens = steps_run * cfg.global_batch * cfg.seq_len
    tok_s = tokens / train_s if train_s > 0 else 0.0
    achieved = tok_s * flops_per_token(model, cfg.seq_len)
    mfu = (f"MFU {100 * achieved / (peak[0] * ctx.world_size):.2f}% of {ctx.world_size} x "
           f"{peak[0] / 1e12:.3g} TFLOP/s ({peak[1]})" if peak[0] > 0 else "MFU unknown (pass --peak-tflops)")
    lines = [("done", f"{steps_run} steps in {format_seconds(wall_s)} ({format_seconds(train_s)} in training "
                      f"steps): {tok_s:,.0f} tokens/s, {mfu}")]
    if last_loss is not None:
        lines.append(("loss", f"train {last_loss:.4f}" + (f", val {val_loss:.4f}" if val_loss is not None else "")
                              + f" at step {cfg.steps}"))
    out = [f"log {cfg.log_jsonl}"] if cfg.log_jsonl else []
    if checkpoint:
        out.append(f"checkpoint {checkpoint} (python recipes/sample.py {cfg.ckpt_dir})")
    if out:
        lines.append(("saved", "; ".join(out)))
    return "\n".join(f"{k:>7} | {v}" for k, v in lines)
