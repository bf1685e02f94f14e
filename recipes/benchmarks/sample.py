"""sample: generation with and without the KV cache (torchrun for TP)."""
from __future__ import annotations

import argparse
import os

import torch

import tinymeg as tm

from benchmarks.common import format_table, time_side_by_side

HELP = "generation with and without the KV cache (torchrun for TP)"


def run(args) -> None:
    """The trainer's end sample (the main job's model, --tokens tokens after a newline) timed with
    and without the KV cache, under the launch's TP size (and SP), with every rank generating."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    ctx = tm.ParallelContext(tp=world)
    torch.manual_seed(0)
    model = tm.models.GPT2Model(tm.models.GPTConfig(block_size=args.context, vocab_size=65, n_layer=args.n_layer,
                                                    n_head=args.n_head, n_embd=args.n_embd))
    if world > 1:
        model = tm.apply_tensor_parallel(model, ctx, {**tm.GPT2_TP_CONFIG, "sequence_parallel": args.sp})
    model.eval()
    multiple = world if args.sp else 1
    prompt = torch.zeros(1, 1, dtype=torch.long, device=ctx.device)

    def sample(kv_cache):
        gen = torch.Generator(device=ctx.device).manual_seed(0)
        return lambda: model.generate(prompt, args.tokens, temperature=0.8, top_k=50, generator=gen,
                                      context_multiple=multiple, kv_cache=kv_cache)
    times = time_side_by_side({"no cache": sample(False), "KV cache": sample(True)}, ctx.device,
                              repeats=args.repeats, warmup=1)
    if ctx.is_main:
        base = times["no cache"]
        rows = [[name, f"{t:.2f}", f"{1000 * t / args.tokens:.1f}", f"{t / base:.2f}"] for name, t in times.items()]
        print(f"# {args.tokens} tokens, {args.n_layer} layers x {args.n_embd} wide, context {args.context}, "
              f"tp={world}{' + SP' if args.sp else ''}, {ctx.device}, median of {args.repeats}\n")
        print(format_table(["generation", "s", "ms/token", "x no cache"], rows))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--context", type=int, default=64, help="block size (the main job: --seq-len 64)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--sp", action="store_true", help="sequence parallel (inputs padded to a multiple of tp)")
    p.add_argument("--repeats", type=int, default=3)
