"""tinymeg benchmarks. Each prints tables of times and ratios measured side by side in one run
(a ratio from one run on one machine is meaningful; an absolute time from another is not).

    python recipes/bench.py ops                 # the fused ops, the autotuner, memory, compile
    python recipes/bench.py ops --batch 8 --seq 1024 --dtype bfloat16   (on a GPU)
    torchrun --nproc_per_node=4 recipes/bench.py comm   # collectives per step vs the theory
    torchrun --nproc_per_node=2 recipes/bench.py tp     # tinymeg TP vs torch's parallelize_module
    torchrun --nproc_per_node=4 recipes/bench.py pp     # pipeline schedules: bubble, step time, memory

Subcommands live in SUBCOMMANDS (name -> (add_arguments, run, help)).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import tinymeg as tm
from tinymeg.ops import cross_entropy, gelu, norm
from tinymeg.ops.autotune import RuntimeAutoTuner


# ---- helpers shared by subcommands ----

def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:.0f}"
    return str(c)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(fns: dict, device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of one call of each fn. Calls are interleaved (a, b, c, a, b, c, ...), so
    that a machine whose load changes during the run slows every candidate alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before it.

    CUDA: the allocator's own peak. CPU has no allocator statistics, so torch.profiler's memory
    profile is used: it records every tensor allocation and free during fn() (the timeline
    that ``export_memory_timeline`` plots), and the peak of the running sum is returned."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, nbytes in prof._memory_profile().timeline:
        live += nbytes if action == Action.CREATE else -nbytes if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


# ---- ops ----

def _op_cases(B, T, C, V, vocab, dtype, device):
    """(op, shape label, candidates, args, default, untuned) at GPT-2 shapes, forward and backward."""
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, w, b = randn(B, T, C), randn(C), randn(C)
    _, mean, rstd = norm.forward_ref(x, w, b, 1e-5)
    h, b4 = randn(B, T, 4 * C), randn(4 * C)
    hidden, weight = randn(B * T, C), randn(V, C, scale=0.02)
    targets = torch.randint(0, vocab, (B * T,), generator=g, device=device)
    _, gh, gw = cross_entropy.forward_chunked(hidden, weight, targets, vocab, -1, "mean", True)
    ln, lce = f"{tuple(x.shape)}", f"N={B * T} C={C} V={V}"
    yield "layer_norm", ln, norm.candidates(norm.FORWARD, x), (x, w, b, 1e-5), norm.DEFAULT_FORWARD, ()
    yield ("layer_norm_backward", ln, norm.candidates(norm.BACKWARD, x), (x, x, w, mean, rstd),
           norm.DEFAULT_BACKWARD, ())
    yield "bias_gelu", f"{tuple(h.shape)}", gelu.candidates(gelu.FORWARD, h), (h, b4), gelu.DEFAULT_FORWARD, ()
    yield ("bias_gelu_backward", f"{tuple(h.shape)}", gelu.candidates(gelu.BACKWARD, h), (h, h, b4),
           gelu.DEFAULT_BACKWARD, ())
    yield ("linear_cross_entropy", lce, cross_entropy.candidates(cross_entropy.FORWARD, hidden),
           (hidden, weight, targets, vocab, -1, "mean", True), cross_entropy.DEFAULT_FORWARD,
           cross_entropy.UNTUNED)
    yield ("linear_cross_entropy_backward", lce, cross_entropy.candidates(cross_entropy.BACKWARD, hidden),
           (torch.tensor(0.5, device=device), gh, gw), cross_entropy.DEFAULT_BACKWARD, ())


def bench_op_implementations(args, device, dtype) -> str:
    names = ["ref", "fast", "chunked", "triton"]
    rows = []
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: the pick is decided now
        cases = _op_cases(args.batch, args.seq, args.n_embd, args.padded_vocab, args.vocab, dtype, device)
        for op, shape, cands, op_args, default, untuned in cases:
            heavy = op == "linear_cross_entropy" and device.type == "cpu"  # ~1 s a call: fewer repeats
            repeats = max(1, args.repeats // 3) if heavy else args.repeats
            tuner = RuntimeAutoTuner(warmup_iterations=1, measure_iterations=2 if heavy else args.tune_iterations,
                                     enabled=True, cache_dir=cache)
            fns = {k: (lambda f=f: f(*op_args)) for k, f in cands.items()}
            ms = {k: 1e3 * t for k, t in time_side_by_side(fns, device, repeats).items()}
            pick = tuner.choose(op, cands, op_args, default, untuned)
            best = min(t for k, t in ms.items() if k not in untuned)  # among what the tuner may pick
            rows.append([op, shape, *(ms.get(n) for n in names), pick, ms[pick] / best, ms[default] / best])
    headers = ["op", "shape", *(f"{n} ms" for n in names), "tuner pick", "pick/best", "default/best"]
    return (format_table(headers, rows) + "\n(best: the fastest implementation the tuner may pick; the loss's ref "
            "holds the whole logits, so it is timed here but never picked)")


def bench_loss_memory(args, device, dtype) -> str:
    """Peak memory of one forward + backward of the LM loss: fused vs logits + F.cross_entropy."""
    N, C, V, vocab = args.batch * args.seq, args.n_embd, args.padded_vocab, args.vocab
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(N, C, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, C, generator=g, device=device) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (N,), generator=g, device=device)

    def naive():
        logits = (hidden @ weight.T)[:, :vocab]
        F.cross_entropy(logits.float(), targets, ignore_index=-1).backward()

    def fused():
        tm.ops.linear_cross_entropy(hidden, weight, targets, vocab).backward()

    rows, peaks = [], {}
    for name, fn in (("logits + F.cross_entropy", naive), ("tinymeg linear_cross_entropy", fused)):
        hidden.grad = weight.grad = None
        peaks[name] = peak_memory(fn, device)
        rows.append([name, peaks[name] / 2**20, peaks[name] / peaks["logits + F.cross_entropy"]])
    logits_mb = N * vocab * 4 / 2**20
    return (format_table(["loss (forward + backward)", "peak MiB", "vs logits"], rows)
            + f"\n(N={N} tokens, V={V} rows, vocab={vocab}, {str(dtype).removeprefix('torch.')}: "
              f"the float32 logits alone are {logits_mb:.0f} MiB; the weight's gradient is "
              f"{V * C * weight.element_size() / 2**20:.0f} MiB)")


def bench_train_step(args, device, dtype) -> str:
    """Eager vs compiled training step (forward, backward, AdamW) of a small GPT-2."""
    cfg = tm.models.GPTConfig(block_size=args.train_seq, vocab_size=65, n_layer=args.train_layers,
                              n_head=4, n_embd=args.train_embd)
    torch.manual_seed(0)
    model = tm.models.GPT2Model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device).manual_seed(0)
    idx = torch.randint(0, 65, (args.train_batch, args.train_seq), generator=g, device=device)
    targets = torch.randint(0, 65, idx.shape, generator=g, device=device)

    def step(fn, return_logits):
        def run():
            opt.zero_grad(set_to_none=True)
            fn(idx, targets, return_logits=return_logits)[1].backward()
            opt.step()
        return run

    compiled = torch.compile(model, fullgraph=True)
    t0 = time.perf_counter()
    step(compiled, False)()  # compiles (forward and backward graphs)
    compile_s = time.perf_counter() - t0
    variants = [("eager, logits + F.cross_entropy", model, True), ("eager, fused loss", model, False),
                ("compiled (fullgraph), fused loss", compiled, False)]
    fns = {name: step(fn, rl) for name, fn, rl in variants}
    ms = {name: 1e3 * t for name, t in time_side_by_side(fns, device, args.repeats, warmup=2).items()}
    base = ms[variants[0][0]]
    rows = [[name, t, base / t] for name, t in ms.items()]
    return (format_table(["training step", "ms", "speedup vs eager"], rows)
            + f"\n(GPT-2 {args.train_layers} layers, width {args.train_embd}, batch {args.train_batch} x "
              f"{args.train_seq} tokens, float32; compiling took {compile_s:.1f} s)")


def run_ops(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.padded_vocab = tm.models.GPTConfig(vocab_size=args.vocab).padded_vocab_size
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"# tinymeg ops bench on {device}{threads}, {args.dtype}, torch {torch.__version__}\n")
    started = time.perf_counter()
    print("## every implementation (median ms), the autotuner's pick, pick/best\n")
    print(bench_op_implementations(args, device, dtype), "\n", flush=True)
    print("## peak memory of the LM loss\n")
    print(bench_loss_memory(args, device, dtype), "\n", flush=True)
    print("## training step\n")
    print(bench_train_step(args, device, dtype), flush=True)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


def add_ops_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--n-embd", type=int, default=768, help="GPT-2 small: 768")
    p.add_argument("--vocab", type=int, default=50257, help="padded to a multiple of 64 for the weight")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 is steadier on a machine shared with other jobs")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per implementation (median)")
    p.add_argument("--tune-iterations", type=int, default=10,
                   help="the tuner's measure_iterations (2 for the loss on a CPU)")
    p.add_argument("--train-layers", type=int, default=4)
    p.add_argument("--train-embd", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-seq", type=int, default=64)


# ---- comm: collectives of one step, measured vs theoretical (torchrun) ----

def _gpt2(args) -> tm.models.GPT2Model:
    torch.manual_seed(0)
    return tm.models.GPT2Model(tm.models.GPTConfig.gpt2_small(n_layer=args.n_layer, block_size=args.seq))


def run_comm(args) -> None:
    from tinymeg.parallel.comm import comm_report, expected_gpt2_comm, format_comm_table
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    configs = [("tp-only", world, 1, False, False), ("tp+sp", world, 1, True, False),
               ("tp+sp+loss-parallel", world, 1, True, True), ("dp-only", 1, world, False, False)]
    if world % 2 == 0 and world > 2:
        configs.append(("hybrid", 2, world // 2, False, False))
        configs.append(("hybrid+sp", 2, world // 2, True, False))
    idx = torch.randint(0, 50257, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    summary = []
    for name, tp, dp, sp, lp in configs:
        ctx = tm.ParallelContext(tp=tp, dp=dp)
        plan = {**tm.GPT2_TP_CONFIG, "sequence_parallel": sp, "loss_parallel": lp}
        model = tm.apply_hybrid_parallel(_gpt2(args), ctx, plan) if tp > 1 else tm.apply_data_parallel(_gpt2(args), ctx)
        measured = comm_report(model, idx, idx, ctx, return_logits=False)
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


def add_comm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-layer", type=int, default=2, help="GPT-2 small has 12; the counts scale per layer")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)


# ---- tp: tinymeg's TP against PyTorch's parallelize_module, same model and mesh (torchrun) ----

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


def run_tp(args) -> None:
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
        model = build(_gpt2(args))
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


def add_tp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)


# ---- pp: pipeline schedules, measured bubble vs theory, step time, activation memory (torchrun) ----

def bubble_theory(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> float:
    """Idle fraction of a rank in the ideal schedule (equal stages, free communication)."""
    v = stages_per_rank if schedule == "interleaved-1f1b" else 1
    return (pp - 1) / (v * microbatches + pp - 1)


def run_pp(args) -> None:
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
        model = tm.apply_pipeline_parallel(tm.models.GPT2Model(cfg).to(ctx.device), ctx, schedule,
                                           args.microbatches, v)
        models[schedule] = tm.apply_data_parallel(model, ctx)  # dp=1: the trainer's model, no comm

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


def add_pp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-layer", type=int, default=8, help="divisible by pp x stages-per-rank")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--microbatch-size", type=int, default=2, help="sequences per microbatch")
    p.add_argument("--stages-per-rank", type=int, default=2, help="V of interleaved-1f1b")
    p.add_argument("--repeats", type=int, default=5)


SUBCOMMANDS = {
    "ops": (add_ops_arguments, run_ops, "fused ops: every implementation, the tuner's pick, memory, compile"),
    "comm": (add_comm_arguments, run_comm, "collectives of one step vs the theoretical minimum (torchrun)"),
    "tp": (add_tp_arguments, run_tp, "tinymeg TP vs PyTorch's parallelize_module, same model and mesh (torchrun)"),
    "pp": (add_pp_arguments, run_pp, "pipeline schedules: bubble measured vs theory, step time, memory (torchrun)"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
