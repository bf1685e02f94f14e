"""memory: what each rank holds at ZeRO 0-3 (launches torchrun itself, once per dp size), and the
activation memory and step time of each activation checkpointing mode (one process)."""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import tinymeg as tm

from benchmarks.common import BENCH, activation_memory, format_table, peak_memory, time_side_by_side

HELP = "ZeRO 0-3: parameter, gradient, optimizer and peak memory per rank; activation checkpointing modes"


def _memory_worker(args) -> None:
    """Under torchrun: for each stage, a few training steps of the same model; rank 0 writes
    each stage's param/grad/optim MiB after the last step and its peak during that step."""
    import json
    from tinymeg.parallel.zero import memory_mb
    from tinymeg.train.optim import build_optimizer, clip_grad_norm_
    ctx = tm.ParallelContext(dp=-1)
    cfg = tm.models.GPTConfig(block_size=args.seq, vocab_size=65, n_layer=args.n_layer, n_head=4,
                              n_embd=args.n_embd)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 65, (args.micro_batch, args.seq), generator=g)
    rows = []
    for zero in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = tm.apply_data_parallel(tm.models.GPT2Model(cfg).to(ctx.device), ctx, args.bucket_mb,
                                       zero=zero, param_dtype=args.dtype)
        optimizer = build_optimizer(model, 1e-4, 0.1)
        held = {}

        def step():
            model(idx, idx, return_logits=False)[1].backward()
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            held.update(memory_mb(model, optimizer))   # after the step, before zero_grad
            optimizer.zero_grad(set_to_none=True)
        for _ in range(args.steps - 1):
            step()
        before = sum(memory_mb(model, optimizer).values()) * 2**20
        peak = (before + peak_memory(step, ctx.device)) / 2**20
        rows.append({"dp": ctx.dp_size, "zero": zero, **held, "peak_mb": peak})
        del model, optimizer
    if ctx.is_main:
        with open(args.out, "w") as f:
            json.dump(rows, f)


def run(args) -> None:
    if "RANK" in os.environ:
        return _memory_worker(args)
    if "zero" in args.tables:
        _zero_table(args)
    if "ac" in args.tables:
        _ac_table(args)


def _zero_table(args) -> None:
    import json
    import subprocess
    import sys
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dp in args.dp:
            out = os.path.join(tmp, f"dp{dp}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dp}",
                   BENCH, "memory", "--out", out, "--n-layer", str(args.n_layer),
                   "--n-embd", str(args.n_embd), "--seq", str(args.seq), "--micro-batch",
                   str(args.micro_batch), "--steps", str(args.steps), "--dtype", args.dtype,
                   "--bucket-mb", str(args.bucket_mb)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            with open(out) as f:
                rows += json.load(f)
    table = []
    for r in rows:
        base = next(b for b in rows if b["dp"] == r["dp"] and b["zero"] == 0)
        table.append([r["dp"], r["zero"], r["param_mb"], r["grad_mb"], r["optim_mb"], r["peak_mb"],
                      *(f"{r[k] / base[k]:.2f}" if base[k] else "-" for k in ("param_mb", "grad_mb", "optim_mb", "peak_mb"))])
    n_params = tm.models.GPT2Model(tm.models.GPTConfig(block_size=args.seq, vocab_size=65, n_layer=args.n_layer,
                                                       n_head=4, n_embd=args.n_embd)).num_params()
    print(f"# MiB per rank after a step (rank 0), GPT-2 {args.n_layer} layers, width {args.n_embd} "
          f"({n_params / 1e6:.1f}M parameters), AdamW, {args.dtype}, batch {args.micro_batch} x {args.seq} per rank, "
          f"{args.bucket_mb:g} MB buckets\n")
    print(format_table(["dp", "zero", "param MiB", "grad MiB", "optim MiB", "peak MiB",
                        "param/z0", "grad/z0", "optim/z0", "peak/z0"], table))
    print("\n(optim: AdamW's two moments, and the fp32 master weights under bf16; grad: the gradients "
          "and the data-parallel buckets that hold them; peak: what is live at the top of a training "
          "step, activations included)")


def _ac_table(args) -> None:
    """Each activation checkpointing mode on the same model and batch, one process, for GPT-2 and
    Llama at the same width: the activation memory of a training step (common.activation_memory)
    and the step time, both as ratios to ac="none". Steps timed side by side, interleaved."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # CPU: the process's CPU time (all its threads), which other processes' load barely moves
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    unit = "s" if device.type == "cuda" else "CPU s"
    idx = torch.randint(0, 65, (args.ac_batch, args.ac_seq), generator=torch.Generator().manual_seed(0)).to(device)
    rows, described = [], []
    for name in args.ac_models:
        model_cls, config_cls = tm.models.MODELS[name]
        shape = dict(block_size=args.ac_seq, vocab_size=65, n_layer=args.ac_n_layer, n_head=args.ac_n_embd // 64,
                     n_embd=args.ac_n_embd)
        cfg = config_cls(**shape, **({"n_kv_head": args.ac_n_embd // 256} if name == "llama" else {}))
        steps, activation_mb = {}, {}
        for mode in ("none", "full", "selective"):
            torch.manual_seed(0)
            model = tm.apply_activation_checkpointing(model_cls(cfg).to(device), mode)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def forward_backward(model=model):
                model(idx, idx, return_logits=False)[1].backward()

            def step(forward_backward=forward_backward, optimizer=optimizer):
                forward_backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
            activation_mb[mode] = activation_memory(forward_backward, optimizer, device) / 2**20
            steps[mode] = step
        times = time_side_by_side(steps, device, repeats=args.ac_repeats, clock=clock)
        rows += [[name, mode, activation_mb[mode], f"{activation_mb[mode] / activation_mb['none']:.2f}", times[mode],
                  f"{times[mode] / times['none']:.2f}"] for mode in steps]
        described.append(f"{name} {model.num_params() / 1e6:.1f}M parameters"
                         + (f" ({cfg.kv_heads} key/value heads, MLP {cfg.ffn_hidden_size})" if name == "llama" else ""))
        del steps, model, optimizer  # one model's three copies at a time
    print(f"\n# activation checkpointing: {args.ac_n_layer} layers, width {args.ac_n_embd}, {args.ac_n_embd // 64} "
          f"heads, vocabulary 65: {', '.join(described)}; fp32, batch {args.ac_batch} x {args.ac_seq}, one "
          f"process on {device.type} ({torch.get_num_threads()} threads)\n")
    print(format_table(["model", "ac", "activation MiB", "activation / none", f"step {unit}", "step / none"], rows))
    print(f"\n(activation: the peak of forward + backward above the parameters, gradients and AdamW states; "
          f"step: forward, backward and AdamW, median of interleaved runs, {unit})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tables", nargs="+", default=["zero", "ac"], choices=["zero", "ac"],
                   help="zero: ZeRO 0-3 per rank (torchrun at each --dp); ac: activation checkpointing modes")
    p.add_argument("--dp", type=int, nargs="+", default=[2, 4], help="data-parallel sizes (one torchrun each)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="training steps per stage; the last is measured")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--bucket-mb", type=float, default=2.0,
                   help="DP buckets (stages 0-2); small for this small model, as 25 MB is for GPT-2 small")
    p.add_argument("--ac-models", nargs="+", default=["gpt2", "llama"], choices=sorted(tm.models.MODELS),
                   help="the AC table's models")
    p.add_argument("--ac-n-layer", type=int, default=12, help="their layers")
    p.add_argument("--ac-n-embd", type=int, default=768,
                   help="their width (GPT-2 small's; heads of 64, Llama with a key/value head per 4)")
    p.add_argument("--ac-seq", type=int, default=256, help="their sequence length")
    p.add_argument("--ac-batch", type=int, default=2, help="their batch (sequences)")
    p.add_argument("--ac-repeats", type=int, default=3, help="timed steps per mode")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
