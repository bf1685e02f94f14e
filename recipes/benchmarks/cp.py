"""cp: context parallelism vs sequence length (torchrun)."""
from __future__ import annotations

import argparse
import os

import torch

import tinymeg as tm

from benchmarks.common import format_table, peak_memory, saved_activation_bytes, time_side_by_side

HELP = "context parallelism: memory, step time, ring bytes vs sequence length (torchrun)"


def run(args) -> None:
    """For each cp that divides the world (the rest of the ranks are dp) and each sequence
    length: one rank's activation and peak memory of a forward + backward, the step time, and
    the bytes the ring sent against the theory. Every rank holds whole sequences at cp=1 and
    T/cp tokens of them at cp=c, so per-rank activation memory should fall ~1/cp."""
    from tinymeg.parallel.context_parallel import ring_stats
    world = int(os.environ.get("WORLD_SIZE", 1))
    seqs = [int(t) for t in args.seqs.split(",")]
    cps = [c for c in (1, 2, 4, 8) if world % c == 0 and all(t % (2 * c) == 0 for t in seqs)]
    cfg = tm.models.GPTConfig(block_size=max(seqs), vocab_size=65, n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd)
    steps, memory, ring = {}, {}, {}
    for cp in cps:
        ctx = tm.ParallelContext(cp=cp)
        torch.manual_seed(0)
        model = tm.parallelize(tm.models.GPT2Model(cfg), ctx)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        for seq in seqs:
            idx = torch.randint(0, cfg.vocab_size, (args.batch, seq), generator=torch.Generator().manual_seed(0))

            def fwd(model=model, idx=idx):
                return model(idx, idx, return_logits=False)[1]

            def fwd_bwd(fwd=fwd):
                fwd().backward()

            def step(fwd_bwd=fwd_bwd, opt=opt):
                fwd_bwd()
                opt.step()
                opt.zero_grad(set_to_none=True)
            ring_stats().reset()
            fwd_bwd()
            opt.zero_grad(set_to_none=True)
            head_dim = cfg.n_embd // cfg.n_head
            kv_bytes = 2 * args.batch * cfg.n_head * (seq // cp) * head_dim * 4    # fp32 k and v of one rank
            theory = cfg.n_layer * 3 * (cp - 1) * kv_bytes  # fwd: k,v; bwd: k,v and dk,dv; cp-1 hops each
            ring[cp, seq] = (ring_stats().bytes, theory)
            params = [tm.nn.local(p) for p in model.parameters()]
            activations = saved_activation_bytes(lambda: fwd().backward(), params)
            opt.zero_grad(set_to_none=True)
            memory[cp, seq] = (activations, peak_memory(fwd_bwd, ctx.device))
            opt.zero_grad(set_to_none=True)
            steps[cp, seq] = step
    times = time_side_by_side(steps, torch.device("cpu"), repeats=args.repeats, warmup=1)
    if int(os.environ.get("RANK", 0)) == 0:
        rows = []
        for (cp, seq), t in times.items():
            sent, theory = ring[cp, seq]
            (act, peak), (act1, peak1) = memory[cp, seq], memory[1, seq]
            rows.append([seq, cp, f"{act / 2**20:.1f}", f"{act / act1:.2f}", f"{peak / 2**20:.1f}",
                         f"{peak / peak1:.2f}", f"{1000 * t:.0f}", f"{t / times[1, seq]:.2f}",
                         f"{sent / 2**20:.2f}", f"{sent / theory:.2f}" if theory else "-"])
        rows.sort()
        print(f"# context parallelism: GPT-2 {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, "
              f"batch {args.batch} per dp rank, fp32, {world} ranks (cp x dp), median of {args.repeats} steps\n")
        print(format_table(["seq", "cp", "activations MiB/rank", "x cp=1", "peak MiB/rank (fwd+bwd)", "x cp=1",
                            "ms/step", "x cp=1", "ring MiB sent/rank", "ring / theory"], rows))
        print("\nactivations: bytes saved for backward (parameters excluded); peak: everything allocated "
              "during forward + backward (gradients included), torch.profiler's memory timeline on CPU")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqs", default="512,1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1, help="sequences per dp rank")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
