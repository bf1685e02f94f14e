"""tp: tinymeg's TP against PyTorch's parallelize_module, same model and mesh (torchrun)."""
from __future__ import annotations

import argparse
import os

import torch

import tinymeg as tm

from benchmarks.common import format_table, gpt2_small, time_side_by_side

HELP = "tinymeg TP vs PyTorch's parallelize_module, same model and mesh (torchrun)"


def native_tensor_parallel(model: tm.models.GPT2Model, mesh) -> tm.models.GPT2Model:
    """PyTorch's own TP with the plan equivalent to tinymeg's: Colwise c_attn/c_fc, Rowwise
    c_proj, a vocab-parallel wte (Rowwise on an Embedding) and a Colwise lm_head whose logits
    are replicated. Two differences, neither changing FLOPs or bytes: Colwise shards the fused
    q|k|v by plain rows (so its heads are mixed up: fine for timing, wrong for training), and
    the lm_head/wte tie is broken by the separate sharding of the two modules."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    plan = {"transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(model.transformer.h)):
        plan |= {f"transformer.h.{i}.attn.c_attn": ColwiseParallel(), f"transformer.h.{i}.attn.c_proj": RowwiseParallel(),
                 f"transformer.h.{i}.mlp.c_fc": ColwiseParallel(), f"transformer.h.{i}.mlp.c_proj": RowwiseParallel()}
    return parallelize_module(model, mesh, plan)


def run(args) -> None:
    from tinymeg.parallel.comm import CommCounter
    world = int(os.environ.get("WORLD_SIZE", 1))
    ctx = tm.ParallelContext(tp=world)
    idx = torch.randint(0, 50257, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    sp = {**tm.GPT2_TP_CONFIG, "sequence_parallel": True}
    variants = {  # name: (build, forward kwargs)
        "tinymeg TP": (lambda m: tm.apply_tensor_parallel(m, ctx), {}),
        "tinymeg TP+SP": (lambda m: tm.apply_tensor_parallel(m, ctx, sp), {}),
        "tinymeg TP+SP+loss-parallel": (lambda m: tm.apply_tensor_parallel(m, ctx, {**sp, "loss_parallel": True}),
                                        {"return_logits": False}),
        "native parallelize_module": (lambda m: native_tensor_parallel(m, ctx.mesh["tp"]), {}),
    }
    steps, comm = {}, {}
    for name, (build, kwargs) in variants.items():
        model = build(gpt2_small(args))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt, kwargs=kwargs):
            model(idx, idx, **kwargs)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        counter = CommCounter({ctx.mesh["tp"].get_group().group_name: "tp"})
        with counter:
            loss = model(idx, idx, **kwargs)[1]
            counter.phase = "backward"
            loss.backward()
        opt.zero_grad(set_to_none=True)
        comm[name] = (len(counter.records), sum(r.wire_bytes for r in counter.records))
        steps[name] = step
    times = time_side_by_side(steps, ctx.device, repeats=args.repeats, warmup=1)
    if ctx.is_main:
        native = times["native parallelize_module"]
        rows = [[name, f"{1000 * t:.1f}", f"{t / native:.2f}", comm[name][0], f"{comm[name][1] / 2**20:.1f}"]
                for name, t in times.items()]
        print(f"# one training step (fwd + bwd + AdamW), GPT-2 small width, {args.n_layer} layers, "
              f"batch {args.batch} x {args.seq}, tp={world}, {ctx.device}, median of {args.repeats}\n")
        print(format_table(["variant", "ms/step", "x native", "collectives", "MiB sent/rank"], rows))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
