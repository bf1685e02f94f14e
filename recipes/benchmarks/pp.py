"""pp: pipeline schedules, measured bubble vs theory, step time, activation memory (torchrun)."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import tinymeg as tm

from benchmarks.common import format_table, peak_memory, time_side_by_side

HELP = "pipeline schedules: bubble measured vs theory, step time, memory (torchrun)"


def bubble_theory(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> float:
    """Idle fraction of a rank in the ideal schedule (equal stages, free communication)."""
    v = stages_per_rank if schedule == "interleaved-1f1b" else 1
    return (pp - 1) / (v * microbatches + pp - 1)


def run(args) -> None:
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", 1))
    ctx = tm.ParallelContext(pp=world)
    cfg = tm.models.GPTConfig(block_size=args.seq, vocab_size=65, n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd)
    batch = args.microbatches * args.microbatch_size
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 65, (batch, args.seq), generator=g).to(ctx.device) for _ in range(2))
    variants = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": args.stages_per_rank}
    models, stats = {}, {}
    for schedule, v in variants.items():
        torch.manual_seed(0)
        pipeline = dict(schedule=schedule, microbatches=args.microbatches, stages_per_rank=v)
        # as the trainer builds it (dp=1: data parallelism communicates nothing)
        models[schedule] = tm.parallelize(tm.models.GPT2Model(cfg).to(ctx.device), ctx, pipeline=pipeline)

        def step(model=models[schedule], schedule=schedule):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model.train_step(x, y)
            stats.setdefault(schedule, []).append((time.perf_counter() - t0, model.pipeline.compute_s))
        models[schedule].pipeline.measure = True
        models[schedule].step = step
    times = time_side_by_side({s: m.step for s, m in models.items()}, ctx.device, repeats=args.repeats, warmup=1)
    rows = []
    for schedule, v in variants.items():
        model = models[schedule]
        runs = stats[schedule][1:]  # the warmup step builds the schedule
        bubble = statistics.median(1 - busy / wall for wall, busy in runs)
        held = model.pipeline.peak_in_flight
        peak = peak_memory(lambda: model.train_step(x, y), ctx.device) / 2**20
        mine = torch.tensor([bubble, held, peak], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        every = torch.stack(every)
        theory = bubble_theory(schedule, world, args.microbatches, v)
        rows.append([schedule, args.microbatches, v, f"{1000 * times[schedule]:.0f}",
                     f"{times[schedule] / times['gpipe']:.2f}", f"{every[:, 0].mean():.3f}", f"{theory:.3f}",
                     " ".join(str(int(h)) for h in every[:, 1]), f"{every[0, 2]:.1f}"])
    if ctx.is_main:
        print(f"# one pipelined step (fwd + bwd of {args.microbatches} microbatches of {args.microbatch_size} x "
              f"{args.seq}), {args.n_layer} layers of width {args.n_embd}, pp={world}, {ctx.device}, median of "
              f"{args.repeats}\n# bubble = 1 - compute / step time, mean over ranks; held = microbatches "
              f"whose activations a rank holds at once (ranks 0..{world - 1}); peak MiB: rank 0, above the "
              f"parameters\n")
        print(format_table(["schedule", "microbatches", "V", "ms/step", "x gpipe", "bubble measured",
                            "bubble theory", "held per rank", "peak MiB rank 0"], rows))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-layer", type=int, default=8, help="divisible by pp x stages-per-rank")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--microbatch-size", type=int, default=2, help="sequences per microbatch")
    p.add_argument("--stages-per-rank", type=int, default=2, help="V of interleaved-1f1b")
    p.add_argument("--repeats", type=int, default=5)
