"""cp: context parallelism (and activation checkpointing) vs sequence length (torchrun)."""
from __future__ import annotations

import argparse
import os

import torch

import tinymeg as tm

from benchmarks.common import activation_memory, format_table, time_side_by_side

HELP = "context parallelism (x activation checkpointing): memory, step time, ring bytes vs sequence length (torchrun)"


def run(args) -> None:
    """For each cp that divides the world (the rest of the ranks are dp), each activation
    checkpointing mode of --ac and each sequence length: one rank's activation memory of a
    training step (the peak of forward + backward above parameters, gradients and optimizer
    states: common.activation_memory), the step time, and the bytes the ring sent against the
    theory. Every rank holds whole sequences at cp=1 and T/cp tokens of them at cp=c, so per-rank
    activation memory should fall ~1/cp; activation checkpointing divides it again."""
    from tinymeg.parallel.context_parallel import ring_stats
    world = int(os.environ.get("WORLD_SIZE", 1))
    seqs = [int(t) for t in args.seqs.split(",")]
    acs = args.ac.split(",")
    cps = [c for c in (1, 2, 4, 8) if world % c == 0 and all(t % (2 * c) == 0 for t in seqs)]
    model_cls, config_cls = tm.models.MODELS[args.model]
    cfg = config_cls(block_size=max(seqs), vocab_size=65, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd, **({"n_kv_head": args.n_head // 2} if args.model == "llama" else {}))
    steps, memory, ring = {}, {}, {}
    for cp in cps:
        ctx = tm.ParallelContext(cp=cp)
        for ac in acs:
            torch.manual_seed(0)
            model = tm.parallelize(model_cls(cfg), ctx, ac=ac)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
            for seq in seqs:
                idx = torch.randint(0, cfg.vocab_size, (args.batch, seq), generator=torch.Generator().manual_seed(0))

                def fwd_bwd(model=model, idx=idx):
                    model(idx, idx, return_logits=False)[1].backward()

                def step(fwd_bwd=fwd_bwd, opt=opt):
                    fwd_bwd()
                    opt.step()
                    opt.zero_grad(set_to_none=False)
                ring_stats().reset()
                fwd_bwd()
                head_dim = cfg.n_embd // cfg.n_head
                # fp32 k and v of one rank (grouped k/v heads are repeated to the query heads first)
                kv_bytes = 2 * args.batch * cfg.n_head * (seq // cp) * head_dim * 4
                # fwd: k,v; bwd: k,v and dk,dv; cp-1 hops each; full AC runs the forward's hops again
                theory = cfg.n_layer * (3 + (ac == "full")) * (cp - 1) * kv_bytes
                ring[cp, ac, seq] = (ring_stats().bytes, theory)
                memory[cp, ac, seq] = activation_memory(fwd_bwd, opt, ctx.device)
                steps[cp, ac, seq] = step
    times = time_side_by_side(steps, torch.device("cpu"), repeats=args.repeats, warmup=1)
    if int(os.environ.get("RANK", 0)) == 0:
        rows = []
        for (cp, ac, seq), t in times.items():
            sent, theory = ring[cp, ac, seq]
            act = memory[cp, ac, seq]
            rows.append([seq, cp, ac, f"{act / 2**20:.1f}", f"{act / memory[1, ac, seq]:.2f}",
                         f"{act / memory[cp, acs[0], seq]:.2f}", f"{1000 * t:.0f}", f"{t / times[1, ac, seq]:.2f}",
                         f"{sent / 2**20:.2f}", f"{sent / theory:.2f}" if theory else "-"])
        rows.sort(key=lambda r: (r[0], r[1], acs.index(r[2])))
        kv = f" ({cfg.kv_heads} key/value heads)" if args.model == "llama" else ""
        print(f"# context parallelism: {args.model} {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads{kv}, "
              f"batch {args.batch} per dp rank, fp32, {world} ranks (cp x dp), median of {args.repeats} steps\n")
        print(format_table(["seq", "cp", "ac", "activations MiB/rank", "x cp=1", f"x ac={acs[0]}", "ms/step",
                            "x cp=1", "ring MiB sent/rank", "ring / theory"], rows))
        print("\nactivations: the peak of forward + backward above the parameters, gradients and optimizer "
              "states (torch.profiler's memory timeline on CPU)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqs", default="512,1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1, help="sequences per dp rank")
    p.add_argument("--model", default="gpt2", choices=sorted(tm.models.MODELS), help="tinymeg's GPT-2 or Llama "
                   "(Llama: a key/value head per 2 query heads)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ac", default="none", help="comma-separated activation checkpointing modes, e.g. none,selective,full")
