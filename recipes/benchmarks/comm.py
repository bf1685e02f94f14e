"""comm: collectives of one step, measured vs theoretical (torchrun)."""
from __future__ import annotations

import argparse
import os

import torch

import tinymeg as tm

from benchmarks.common import format_table, gpt2_small

HELP = "collectives of one step vs the theoretical minimum (torchrun)"


def run(args) -> None:
    from tinymeg.parallel.comm import comm_report, expected_gpt2_comm, format_comm_table
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    configs = [("tp-only", world, 1, False, False, 0), ("tp+sp", world, 1, True, False, 0),
               ("tp+sp+loss-parallel", world, 1, True, True, 0), ("dp-only", 1, world, False, False, 0)]
    configs += [(f"dp zero={z}", 1, world, False, False, z) for z in (1, 2, 3)]
    if world % 2 == 0 and world > 2:
        configs.append(("hybrid", 2, world // 2, False, False, 0))
        configs.append(("hybrid+sp", 2, world // 2, True, False, 0))
        configs += [(f"hybrid+sp zero={z}", 2, world // 2, True, False, z) for z in (1, 2, 3)]
    idx = torch.randint(0, 50257, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    summary = []
    for name, tp, dp, sp, lp, zero in configs:
        ctx = tm.ParallelContext(tp=tp, dp=dp)
        plan = {**tm.GPT2_TP_CONFIG, "sequence_parallel": sp, "loss_parallel": lp}
        model = tm.apply_hybrid_parallel(gpt2_small(args), ctx, plan, zero=zero) if tp > 1 else \
            tm.apply_data_parallel(gpt2_small(args), ctx, zero=zero)
        optimizer = tm.shard_optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        measured = comm_report(model, idx, idx, ctx, optimizer=optimizer, return_logits=False)  # + the step's
        expected = expected_gpt2_comm(model, args.batch, args.seq, ctx, sp, lp)
        table = format_comm_table(measured, expected)
        wire = [sum(k.wire_bytes * n for k, n in c.items()) for c in (measured, expected)]
        summary.append([name, f"tp={tp} dp={dp}", sum(measured.values()), f"{wire[0] / 2**20:.1f}",
                        f"{wire[1] / 2**20:.1f}", f"{wire[0] / wire[1]:.2f}"])
        if ctx.is_main:
            print(f"## {name} (tp={tp}, dp={dp})\n\n{table}\n", flush=True)
    if torch.distributed.get_rank() == 0:
        print(f"## summary: GPT-2 small width, {args.n_layer} layers, batch {args.batch} x {args.seq}, fp32\n")
        print(format_table(["config", "mesh", "collectives", "measured MiB/rank", "theory MiB/rank", "ratio"], summary))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-layer", type=int, default=2, help="GPT-2 small has 12; the counts scale per layer")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
