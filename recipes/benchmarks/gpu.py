"""gpu: is tinymeg faster than plain PyTorch on this GPU? GPT-2 small, one GPU, mixed precision.

tinymeg's GPT2Model against the same GPT-2 written in plain PyTorch (PlainGPT: nn.Linear,
nn.LayerNorm, F.gelu, SDPA, F.cross_entropy on the logits), the same weights and batch, a
training step each (forward, backward, fused AdamW), in four modes: under torch.autocast(bf16)
(fp32 parameters) or with the model in bf16, eager or compiled (fullgraph=True). Per mode: median
ms/step of interleaved steps, tokens/s, MFU, peak memory of a step, the first step's loss of each
(the same weights and batch: they agree to bf16 rounding), and tinymeg / plain. Then the autotuner's
picks (a fresh cache: decided in this run) and the top kernels of one mode from torch.profiler.

    python recipes/bench.py gpu                    # GPT-2 small, T=1024, batch 16: a few minutes on an H100/H200
    python recipes/bench.py gpu --size tiny        # the same code on any device, CPU included: a smoke test
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import tinymeg as tm
from tinymeg.train.report import flops_per_token, peak_flops

from benchmarks.common import format_table, peak_memory, sync, time_side_by_side
from benchmarks.e2e import PlainGPT

HELP = "GPT-2 small on one GPU: tinymeg vs plain PyTorch, autocast and bf16, eager and compiled, MFU"

SIZES = {  # name: (GPTConfig, batch)
    "gpt2": (lambda: tm.models.GPTConfig.gpt2_small(), 16),
    "tiny": (lambda: tm.models.GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=64), 2),
}
MODES = {  # name: (precision form, compiled)
    "autocast-eager": ("autocast", False), "autocast-compiled": ("autocast", True),
    "bf16-eager": ("bf16", False), "bf16-compiled": ("bf16", True),
}


def _pair(cfg, device, form):
    """tinymeg's GPT-2 and PlainGPT with the same weights; in bf16 for the bf16 form."""
    torch.manual_seed(0)
    ours = tm.models.GPT2Model(cfg)
    plain = PlainGPT(cfg)
    plain.load_state_dict(ours.state_dict())
    dtype = torch.bfloat16 if form == "bf16" else torch.float32
    return ours.to(device, dtype), plain.to(device, dtype)


def _training_step(model, loss_fn, form: str, compiled: bool, device: torch.device):
    """step() -> loss: forward (under autocast(bf16) in that form), backward, fused AdamW."""
    forward = torch.compile(model, fullgraph=True) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=form == "autocast"):
            loss = loss_fn(forward)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _top_kernels(step, device, rows: int) -> str:
    """The ops (GPU: kernels) taking the most time over two steps, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def _tuner_picks(tuner) -> list[list]:
    rows = []
    for key, choice in sorted(tuner.choices.items()):
        op, _, shapes = key.split("|", 2)
        times = tuner.timings.get(key, {})
        timed = ", ".join(f"{k} {1e3 * t:.3g}" for k, t in sorted(times.items(), key=lambda kv: kv[1]))
        rows.append([op, shapes[:60], choice, timed or "(not timed)"])
    return rows


def run(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.size == "gpt2" and device.type != "cuda":
        raise SystemExit("error: bench gpu measures GPT-2 small on a CUDA GPU, and there is none here: run it on "
                         "a GPU machine, or `python recipes/bench.py gpu --size tiny` for a smoke test of the "
                         "same code on this device (its numbers mean nothing)")
    os.environ.setdefault("TINYMEG_CACHE_DIR", tempfile.mkdtemp())   # a fresh tuner cache: picks made now
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    make_cfg, batch = SIZES[args.size]
    cfg = make_cfg()
    batch = args.batch or batch
    T = cfg.block_size
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (batch, T), generator=g).to(device)
    targets = torch.randint(0, cfg.vocab_size, (batch, T), generator=g).to(device)
    peak, peak_from = peak_flops(device, torch.bfloat16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# bench gpu: GPT-2 {args.size} ({cfg.n_layer} layers, width {cfg.n_embd}, vocabulary "
          f"{cfg.vocab_size} padded to {cfg.padded_vocab_size}), batch {batch} x {T}, fused AdamW, {name}, "
          f"torch {torch.__version__}; median of {args.repeats} interleaved steps\n", flush=True)
    started = time.perf_counter()
    flops = None
    rows, profiled = [], None
    for mode in args.modes:
        form, compiled = MODES[mode]
        torch._dynamo.reset()
        ours, plain = _pair(cfg, device, form)
        flops = flops or flops_per_token(ours, T)
        steps = {"tinymeg": _training_step(ours, lambda m: m(idx, targets, return_logits=False)[1], form,
                                           compiled, device),
                 "plain": _training_step(plain, lambda m: m(idx, targets), form, compiled, device)}
        t0 = time.perf_counter()
        first = {who: step().item() for who, step in steps.items()}   # the same weights: comparable
        for _ in range(args.warmup - 1):
            for step in steps.values():
                step()
        warm_s = time.perf_counter() - t0
        mib = {who: peak_memory(step, device) / 2**20 for who, step in steps.items()}
        ms = {who: 1e3 * t for who, t in time_side_by_side(steps, device, args.repeats, warmup=0).items()}
        tok_s = {who: batch * T / (t / 1e3) for who, t in ms.items()}
        mfu = {who: 100 * flops * tok_s[who] / peak if peak else None for who in ms}
        rows.append([mode, ms["tinymeg"], ms["plain"], ms["tinymeg"] / ms["plain"], tok_s["tinymeg"],
                     tok_s["plain"], mfu["tinymeg"], mfu["plain"], mib["tinymeg"], mib["plain"], first["tinymeg"],
                     first["plain"], abs(first["tinymeg"] - first["plain"]) / abs(first["plain"]), f"{warm_s:.0f}"])
        print(f"- {mode}: tinymeg {ms['tinymeg']:.1f} ms, plain {ms['plain']:.1f} ms, "
              f"ratio {ms['tinymeg'] / ms['plain']:.2f} (warm-up {warm_s:.0f} s)", flush=True)
        if mode == args.profile:
            profiled = {who: _top_kernels(step, device, args.kernels) for who, step in steps.items()}
        del ours, plain, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(format_table(["mode", "tinymeg ms", "plain ms", "tinymeg/plain", "tinymeg tok/s", "plain tok/s",
                        "tinymeg MFU %", "plain MFU %", "tinymeg peak MiB", "plain peak MiB", "tinymeg loss",
                        "plain loss", "loss rel diff", "warm-up s"], rows))
    print(f"\n(MFU: {flops / 1e6:.3g} MFLOP per token (6 N + 12 L T C) x tokens/s / {peak / 1e12:.3g} TFLOP/s "
          f"({peak_from}); peak MiB: allocated during a step above the weights and optimizer states; "
          f"loss: the first step's, same weights and batch)\n")
    print("## the autotuner's picks (op, shapes, pick, ms per candidate)\n")
    print(format_table(["op", "shapes", "pick", "timed ms"], _tuner_picks(tm.ops.get_default_tuner())))
    if profiled:
        for who, table in profiled.items():
            print(f"\n## top kernels, {args.profile}, {who} (two steps)\n\n{table}")
    print(f"(total {time.perf_counter() - started:.0f} s)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="gpt2", choices=list(SIZES),
                   help="gpt2: GPT-2 small, T=1024, batch 16 (CUDA only); tiny: a smoke test on any device")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the size's)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE",
                   help=f"any of {list(MODES)}")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per model and mode (median)")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (the first compiles and tunes)")
    p.add_argument("--profile", default="bf16-compiled", help="the mode whose top kernels are printed")
    p.add_argument("--kernels", type=int, default=8, help="rows of each profile table")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
