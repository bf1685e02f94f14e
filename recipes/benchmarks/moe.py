"""moe: all-to-all bytes vs theory, dense vs MoE at equal active parameters, grouped vs looped (torchrun)."""
from __future__ import annotations

import argparse
import os

import torch

import tinymeg as tm

from benchmarks.common import format_table, time_side_by_side

HELP = "MoE: all-to-all bytes vs theory, dense vs MoE step, grouped vs looped experts (torchrun)"


def _moe_model(args, n_experts: int) -> tm.models.GPT2Model:
    """A GPT whose MoE layers have as many active MLP parameters per token as the dense one:
    top_k experts of width 4C/top_k each."""
    torch.manual_seed(0)
    return tm.models.GPT2Model(tm.models.GPTConfig(
        block_size=args.seq, vocab_size=65, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd,
        n_experts=n_experts, top_k=args.top_k, expert_hidden=4 * args.n_embd // args.top_k if n_experts else 0))


def _active_params(model) -> int:
    """Parameters a token uses: all but the experts it is not routed to."""
    cfg, total = model.config, model.num_params()
    if not cfg.n_experts:
        return total
    per_expert = 2 * cfg.n_embd * cfg.expert_hidden + cfg.expert_hidden + cfg.n_embd
    layers = sum(cfg.is_moe_block(i) for i in range(cfg.n_layer))
    return total - layers * (cfg.n_experts - cfg.top_k) * per_expert


def _with_impl(impl: str, fn):
    """fn run with tinymeg::grouped_mm forced to impl (loop: sort-and-split; grouped: torch._grouped_mm)."""
    def run():
        previous = os.environ.get("TINYMEG_OP_IMPL")
        os.environ["TINYMEG_OP_IMPL"] = f"grouped_mm={impl}"
        try:
            fn()
        finally:
            os.environ.pop("TINYMEG_OP_IMPL") if previous is None else os.environ.update(TINYMEG_OP_IMPL=previous)
    return run


def _moe_comm(model, idx, ctx, args) -> list[list]:
    """All-to-all input bytes of one forward + backward against tokens x k x width x 4, each way."""
    from tinymeg.parallel.comm import CommCounter
    counter = CommCounter({ctx.ep_mesh.get_group().group_name: "ep"})
    with counter:
        loss = model(idx, idx, return_logits=False)[1]
        counter.phase = "backward"
        loss.backward()
    model.zero_grad(set_to_none=True)
    cfg, n = model.config, idx.numel()
    layers = sum(cfg.is_moe_block(i) for i in range(cfg.n_layer))
    tokens = n * cfg.top_k * cfg.n_embd * 4
    rows = []
    for phase in ("forward", "backward"):
        a2a = [r for r in counter.records if r.kind == "all_to_all" and r.phase == phase]
        counts = [r for r in a2a if r.nbytes == cfg.n_experts * 8]  # the int64 token counts
        # A rank sends its n*k slots out, and sends back the rows its experts received: as many
        # on average over the ranks, not on each. So: the mean over ranks.
        moved = torch.tensor(float(sum(r.nbytes for r in a2a) - sum(r.nbytes for r in counts)))
        torch.distributed.all_reduce(moved)
        moved = moved.item() / ctx.world_size
        rows.append([f"tokens, {phase}", len(a2a) - len(counts), moved / 2**20, 2 * layers * tokens / 2**20,
                     moved / (2 * layers * tokens)])
        if phase == "forward":
            rows.append(["counts, forward", len(counts), sum(r.nbytes for r in counts) / 2**20,
                         layers * cfg.n_experts * 8 / 2**20, len(counts) / layers])
    return rows


def run(args) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    ep = args.ep or world
    ctx = tm.ParallelContext(dp=world, ep=ep)
    ctx1 = tm.ParallelContext(dp=world, ep=1) if ep > 1 else ctx
    g = torch.Generator().manual_seed(ctx.rank)
    idx = torch.randint(0, 65, (args.batch, args.seq), generator=g)

    def build(n_experts, on):
        model = tm.apply_data_parallel(tm.apply_expert_parallel(_moe_model(args, n_experts), on)
                                       if n_experts else _moe_model(args, 0), on)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)

        def step():
            model(idx, idx, return_logits=False)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, step

    dense, dense_step = build(0, ctx)
    moe1, moe1_step = build(args.n_experts, ctx1)
    moe, moe_step = build(args.n_experts, ctx)
    comm = _moe_comm(moe, idx, ctx, args)
    steps = {"dense MLP": dense_step, f"MoE ep=1, grouped": _with_impl("grouped", moe1_step),
             f"MoE ep={ep}, grouped": _with_impl("grouped", moe_step),
             f"MoE ep={ep}, looped": _with_impl("loop", moe_step)}
    ms = {k: 1e3 * t for k, t in time_side_by_side(steps, ctx.device, args.repeats, warmup=1).items()}

    # the experts alone, one process's worth of token slots: grouped matmul vs a loop over experts
    from tinymeg.models.moe import expert_mlp
    E, C, H, n = args.n_experts, args.n_embd, 4 * args.n_embd // args.top_k, args.batch * args.seq * args.top_k
    w = [torch.randn(E, C, H) * 0.02, torch.zeros(E, H), torch.randn(E, H, C) * 0.02, torch.zeros(E, C)]
    w = [t.requires_grad_() for t in w]
    x = torch.randn(n, C, requires_grad=True)
    counts = torch.bincount(torch.randint(0, E, (n,), generator=g), minlength=E)

    def experts():
        expert_mlp(x, counts, *w).backward(torch.ones(n, C))
    alone = {impl: 1e3 * t for impl, t in time_side_by_side(
        {impl: _with_impl(impl, experts) for impl in ("grouped", "loop")}, ctx.device, 3 * args.repeats).items()}

    if ctx.is_main:
        head = (f"GPT width {args.n_embd}, {args.n_layer} layers, batch {args.batch} x {args.seq} per rank, "
                f"{args.n_experts} experts top-{args.top_k} of width {4 * args.n_embd // args.top_k}, dp={world}, fp32")
        print(f"# MoE bench: {head}, {ctx.device}, median of {args.repeats}\n")
        print(f"## all-to-all input bytes per step (ep={ep}, mean over ranks) vs theory: tokens x k x "
              f"width x 4 bytes per layer and direction\n")
        print(format_table(["all-to-all", "count", "measured MiB", "theory MiB", "ratio"], comm), "\n")
        print("## training step (forward, backward, DP sync, AdamW)\n")
        base = ms["dense MLP"]
        rows = [[name, t, t / base, f"{_active_params(m) / 1e6:.2f}M", f"{m.num_params() / 1e6:.2f}M"]
                for (name, t), m in zip(ms.items(), (dense, moe1, moe, moe))]
        print(format_table(["variant", "ms/step", "x dense", "active params", "params"], rows), "\n")
        print(f"## the experts alone (forward + backward, {n} token slots, one process's worth)\n")
        print(format_table(["grouped_mm kernel", "ms", "x grouped"],
                           [[k, t, t / alone["grouped"]] for k, t in alone.items()]))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep", type=int, default=None, help="default: the world size")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
