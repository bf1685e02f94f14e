"""tinymeg benchmarks. Each prints tables of times and ratios measured side by side in one run
(a ratio from one run on one machine is meaningful; an absolute time from another is not).

    python recipes/bench.py ops                 # the fused ops, the autotuner, memory, compile
    python recipes/bench.py ops --batch 8 --seq 1024 --dtype bfloat16   (on a GPU)
    torchrun --nproc_per_node=4 recipes/bench.py comm   # collectives per step vs the theory
    torchrun --nproc_per_node=2 recipes/bench.py tp     # tinymeg TP vs torch's parallelize_module
    torchrun --nproc_per_node=4 recipes/bench.py cp     # context parallel: memory and time vs seq length
    torchrun --nproc_per_node=4 recipes/bench.py moe    # MoE: all-to-all bytes, dense vs MoE, grouped vs looped
    python recipes/bench.py memory              # ZeRO 0-3 at dp=2 and dp=4: memory per rank (launches torchrun)
    torchrun --nproc_per_node=2 recipes/bench.py sample # generation with and without the KV cache
    python recipes/bench.py e2e                 # a training step vs plain PyTorch and parallelize_module
    torchrun --nproc_per_node=4 recipes/bench.py pp     # pipeline schedules: bubble, step time, memory
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


def time_side_by_side(fns: dict, device: torch.device, repeats: int, warmup: int = 1,
                      clock=time.perf_counter) -> dict[str, float]:
    """Median seconds of one call of each fn. Calls are interleaved (a, b, c, a, b, c, ...), so
    that a machine whose load changes during the run slows every candidate alike. ``clock``:
    the wall clock, or e.g. time.thread_time (CPU time of one thread, which other processes'
    load barely moves: the autotuner's clock on a CPU with one torch thread)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before it.

    CUDA: the allocator's own peak. CPU has no allocator statistics, so torch.profiler's memory
    profile is used: it records every tensor allocation and free during fn() (the events behind
    ``export_memory_timeline``), and the peak of their running sum is returned. (Read directly from
    the event tree: the profiler's data-flow analysis on top of it trips on some collectives.)"""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:   # alloc_size < 0 for a free
            allocations.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, nbytes in sorted(allocations):
        live += nbytes
        peak = max(peak, live)
    return peak


def saved_activation_bytes(fn, exclude=()) -> int:
    """Bytes autograd keeps for backward while fn() runs its forward (each storage counted once;
    tensors in ``exclude``, e.g. the parameters, left out): the activation memory."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


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


def bench_op_implementations(args, device, dtype, clock=time.perf_counter) -> str:
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
            ms = {k: 1e3 * t for k, t in time_side_by_side(fns, device, repeats, clock=clock).items()}
            pick = tuner.choose(op, cands, op_args, default, untuned)
            best = min(t for k, t in ms.items() if k not in untuned)  # among what the tuner may pick
            rows.append([op, shape, *(ms.get(n) for n in names), pick, ms[pick] / best, ms[default] / best])
    headers = ["op", "shape", *(f"{n} ms" for n in names), "tuner pick", "pick/best", "default/best"]
    return (format_table(headers, rows) + "\n(best: the fastest implementation the tuner may pick; the loss's ref "
            "holds the whole logits, so it is timed here but never picked)")


def _path_cases(B, T, C, vocab, dtype, device):
    """(op, shape label, module, wrapper args) as a GPT-2 of this shape calls each op in training."""
    g = torch.Generator(device).manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype).requires_grad_()
    padded = tm.models.GPTConfig(vocab_size=vocab).padded_vocab_size
    targets = torch.randint(0, vocab, (B * T,), generator=g, device=device)
    yield "layer_norm", f"{(B, T, C)}", norm, (leaf(B, T, C), leaf(C), leaf(C), 1e-5)
    yield "bias_gelu", f"{(B, T, 4 * C)}", gelu, (leaf(B, T, 4 * C), leaf(4 * C))
    yield ("linear_cross_entropy", f"N={B * T} C={C} V={padded}", cross_entropy,
           (leaf(B * T, C), leaf(padded, C, scale=0.02), targets, vocab, -1, "mean"))


def bench_paths(args, device, dtype, clock) -> str:
    """Each op's plain path against its custom op, forward + backward as a training step runs
    them (the op's dispatch included), and the path the tuner picks, at the main job's shapes
    (per rank: micro-batch 8 x 64, width 128, tp=2 halves the MLP) and at GPT-2 small's."""
    from tinymeg.ops import paths
    shapes = [("main job", 8, 64, 128, 65), ("GPT-2 small", args.batch, args.seq, args.n_embd, args.vocab)]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        previous = tm.ops.set_default_tuner(RuntimeAutoTuner(enabled=True, cache_dir=cache))
        try:
            for label, B, T, C, vocab in shapes:
                for op, shape, module, op_args in _path_cases(B, T, C, vocab, dtype, device):
                    default = module.DEFAULT_PATH if op != "linear_cross_entropy" else module.default_path(B * T, vocab)
                    untuned = ("plain",) if default == "op" else ()  # the loss's plain path, where its logits are big
                    heavy = B * T * vocab > 1 << 24
                    fns = {k: (lambda f=f: paths.forward_backward(f)(*op_args)) for k, f in module.PATHS.items()}
                    ms = {k: 1e3 * t for k, t in time_side_by_side(
                        fns, device, max(1, args.repeats // 3) if heavy else args.repeats, clock=clock).items()}
                    pick = paths.choose(op, module.PATHS, op_args, default, untuned)
                    best = min(t for k, t in ms.items() if k not in untuned)
                    rows.append([label, op, shape, ms["plain"], ms["op"], pick, ms[pick] / best])
        finally:
            tm.ops.set_default_tuner(previous)
    return (format_table(["shapes", "op", "shape", "plain ms", "op ms", "tuner pick", "pick/best"], rows)
            + "\n(forward + backward; best: the faster of the paths the tuner may pick: the loss's plain path "
              "holds the whole logits, so past 2^23 of them it is timed here but never picked)")


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
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    print(f"(median ms by {clock.__name__}: the tuner's clock here)\n")
    print("## the plain path or the custom op: the tuner's pick, pick/best\n")
    print(bench_paths(args, device, dtype, clock), "\n", flush=True)
    print("## every kernel of the custom ops (median ms), the autotuner's pick, pick/best\n")
    print(bench_op_implementations(args, device, dtype, clock), "\n", flush=True)
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
        model = tm.apply_hybrid_parallel(_gpt2(args), ctx, plan, zero=zero) if tp > 1 else \
            tm.apply_data_parallel(_gpt2(args), ctx, zero=zero)
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


def add_pp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-layer", type=int, default=8, help="divisible by pp x stages-per-rank")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--microbatch-size", type=int, default=2, help="sequences per microbatch")
    p.add_argument("--stages-per-rank", type=int, default=2, help="V of interleaved-1f1b")
    p.add_argument("--repeats", type=int, default=5)



# ---- cp: context parallelism vs sequence length (torchrun) ----

def run_cp(args) -> None:
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


def add_cp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqs", default="512,1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1, help="sequences per dp rank")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)


# ---- moe: all-to-all bytes vs theory, dense vs MoE at equal active parameters, grouped vs looped (torchrun) ----

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


def run_moe(args) -> None:
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


def add_moe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep", type=int, default=None, help="default: the world size")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)


# ---- memory: what each rank holds at ZeRO 0-3 (launches torchrun itself, once per dp size) ----

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


def run_memory(args) -> None:
    import json
    import subprocess
    import sys
    if "RANK" in os.environ:
        return _memory_worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dp in args.dp:
            out = os.path.join(tmp, f"dp{dp}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dp}",
                   os.path.abspath(__file__), "memory", "--out", out, "--n-layer", str(args.n_layer),
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


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dp", type=int, nargs="+", default=[2, 4], help="data-parallel sizes (one torchrun each)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="training steps per stage; the last is measured")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--bucket-mb", type=float, default=2.0,
                   help="DP buckets (stages 0-2); small for this small model, as 25 MB is for GPT-2 small")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)


# ---- sample: generation with and without the KV cache (torchrun for TP) ----

def run_sample(args) -> None:
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


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--context", type=int, default=64, help="block size (the main job: --seq-len 64)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--sp", action="store_true", help="sequence parallel (inputs padded to a multiple of tp)")
    p.add_argument("--repeats", type=int, default=3)


# ---- e2e: one training step, tinymeg vs plain PyTorch, and tinymeg TP vs parallelize_module ----

class PlainGPT(torch.nn.Module):
    """GPT-2 as a PyTorch user writes it: nn.Embedding, nn.LayerNorm, nn.Linear, F.gelu,
    F.scaled_dot_product_attention, F.cross_entropy. tinymeg GPT2Model's module names and
    padded, tied embedding, so it loads that model's state_dict: the same weights, the same loss.
    Attention reads its head count from the projection's width, so parallelize_module can shard it."""

    def __init__(self, cfg: tm.models.GPTConfig):
        super().__init__()
        nn, C = torch.nn, cfg.n_embd
        self.vocab_size, self.head_dim = cfg.vocab_size, C // cfg.n_head
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, C), wpe=nn.Embedding(cfg.block_size, C),
            h=nn.ModuleList(nn.ModuleDict(dict(
                ln_1=nn.LayerNorm(C), ln_2=nn.LayerNorm(C),
                attn=nn.ModuleDict(dict(c_attn=nn.Linear(C, 3 * C), c_proj=nn.Linear(C, C))),
                mlp=nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C), c_proj=nn.Linear(4 * C, C)))))
                for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(C)))
        self.lm_head = nn.Linear(C, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def attention(self, attn, x):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in attn.c_attn(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attn.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, idx, targets):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in t.h:
            x = x + self.attention(block.attn, block.ln_1(x))
            x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x)), approximate="tanh"))
        logits = self.lm_head(t.ln_f(x))[..., :self.vocab_size]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


E2E_SIZES = {  # name: (GPTConfig fields, batch, seq)
    "main": (dict(n_layer=4, n_embd=128, n_head=4, vocab_size=65), 16, 64),           # the main job's model
    "w256": (dict(n_layer=4, n_embd=256, n_head=4, vocab_size=512), 4, 128),
    "gpt2-width": (dict(n_layer=2, n_embd=768, n_head=12, vocab_size=50257), 4, 128),  # GPT-2 small's width
}


def _e2e_models(name: str, seed: int = 0):
    """tinymeg's GPT-2 and PlainGPT with the same weights, and one batch."""
    fields, B, T = E2E_SIZES[name]
    cfg = tm.models.GPTConfig(block_size=T, **fields)
    torch.manual_seed(seed)
    model = tm.models.GPT2Model(cfg)
    plain = PlainGPT(cfg)
    plain.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return model, plain, idx, torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def _training_step(loss_fn, optimizer, compiled: bool = False):
    """fn() = one step: loss, backward, AdamW, zero_grad; compiled: the optimizer step compiled
    as the recipes' --compile does (tinymeg.train.optim.compile_step)."""
    from tinymeg.train.optim import compile_step
    opt_step = compile_step(optimizer) if compiled else optimizer.step

    def step():
        loss_fn().backward()
        opt_step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _time_wall_and_cpu(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median ms of one call of each fn, by the wall clock and by this thread's CPU time (which
    leaves out the time the OS gave to other processes: on a shared machine, most of the noise).
    Calls are interleaved (a, b, a, b, ...), as in time_side_by_side."""
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {k: (1e3 * statistics.median(wall[k]), 1e3 * statistics.median(cpu[k])) for k in fns}


def _warm(steps: dict, n: int = 2) -> tuple[float, dict]:
    """Run every step n times (compiles, and tunes the ops on every rank alike). A step that
    raises (e.g. inductor failing to compile it) is dropped from ``steps`` rather than ending the
    run; under torchrun every rank drops it if any rank failed. Returns (seconds, {key: exception})."""
    import torch.distributed as dist
    t0, failed = time.perf_counter(), {}
    for key in list(steps):
        try:
            with tm.ops.synchronized():
                steps[key]()
            for _ in range(n - 1):
                steps[key]()
        except Exception as e:  # noqa: BLE001 - reported in the table, the other variants still run
            failed[key] = e
        if dist.is_initialized():
            any_failed = torch.tensor([float(key in failed)])
            dist.all_reduce(any_failed, op=dist.ReduceOp.MAX)
            if any_failed.item() and key not in failed:
                failed[key] = RuntimeError("failed on another rank")
        if key in failed:
            del steps[key]
    return time.perf_counter() - t0, failed


def _root_cause(e: BaseException) -> BaseException:
    """The exception at the bottom of a chain (inductor wraps its errors in BackendCompilerFailed)."""
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None and inner is not e:
        e = inner
    return e


def _e2e_row(name: str, ms: dict, failed: dict, who: tuple[str, str]) -> list:
    """A table row from {(who, compiled): (wall ms, cpu ms)}: ms and ratios of each pair, eager and
    compiled; "failed: <Exception>" where a variant failed, "-" for ratios it leaves out."""
    def cell(key):
        return (f"failed: {type(_root_cause(failed[key])).__name__}" if key in failed else ms[key][0])

    def ratio(a, b, i):
        return ms[a][i] / ms[b][i] if a in ms and b in ms else None
    (t, o) = who
    row = [name]
    for compiled in (False, True):
        row += [cell((t, compiled)), cell((o, compiled)), ratio((t, compiled), (o, compiled), 0),
                ratio((t, compiled), (o, compiled), 1)]
    return row


def _print_failures(rows_failed: list[tuple[str, dict]]) -> None:
    """One short line of why for each variant that failed."""
    for name, failed in rows_failed:
        for (who, compiled), e in failed.items():
            root = _root_cause(e)
            why = (str(root).strip().splitlines() or [""])[0][:160]
            wrapped = f" (in {type(e).__name__})" if root is not e else ""
            print(f"- {name} {who} {'compiled' if compiled else 'eager'} failed: {type(root).__name__}{wrapped}: {why}")


def e2e_one_process(name: str, args) -> list:
    """One row: tinymeg vs plain, eager and compiled (the model with fullgraph=True, and the
    optimizer step), the same weights and batch."""
    from tinymeg.train.optim import build_optimizer
    torch._dynamo.reset()
    steps = {}
    for compiled in (False, True):
        model, plain, idx, targets = _e2e_models(name)
        for who, m, loss in (("tinymeg", model, lambda m: m(idx, targets, return_logits=False)[1]),
                             ("plain", plain, lambda m: m(idx, targets))):
            fn = torch.compile(m, fullgraph=True) if compiled else m
            opt = build_optimizer(m, 1e-4, 0.1)
            steps[who, compiled] = _training_step(lambda fn=fn, loss=loss: loss(fn), opt, compiled)
    warm_s, failed = _warm(steps)
    ms = _time_wall_and_cpu(steps, args.repeats_for(name))
    row = _e2e_row(name, ms, failed, ("tinymeg", "plain"))
    compiled_over_eager = [ms[w, True][i] / ms[w, False][i] if (w, True) in ms and (w, False) in ms else None
                           for w in ("tinymeg", "plain") for i in (0, 1)]
    return row + compiled_over_eager + [f"{warm_s:.0f}"], failed


def native_tensor_parallel_plain(model: PlainGPT, mesh) -> PlainGPT:
    """PyTorch's own TP on PlainGPT, with the plan equivalent to tinymeg's: Colwise c_attn/c_fc,
    Rowwise c_proj, a vocab-parallel wte (Rowwise on an Embedding) and a Colwise lm_head whose
    logits are replicated; the lm_head/wte tie is restored after sharding (both Shard(0)), so
    the optimizer steps the same parameters as tinymeg's. Colwise shards the fused q|k|v by plain
    rows (heads mixed up: same FLOPs and bytes, fine for timing, wrong for training)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    plan = {"transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(model.transformer.h)):
        plan |= {f"transformer.h.{i}.attn.c_attn": ColwiseParallel(), f"transformer.h.{i}.attn.c_proj": RowwiseParallel(),
                 f"transformer.h.{i}.mlp.c_fc": ColwiseParallel(), f"transformer.h.{i}.mlp.c_proj": RowwiseParallel()}
    model = parallelize_module(model, mesh, plan)
    model.lm_head.weight = model.transformer.wte.weight
    return model


def native_optimizer(model, lr: float = 1e-4, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """build_optimizer's AdamW for a model that parallelize_module left with both DTensor and
    plain parameters (the norms, wpe): a foreach step cannot mix them, so each kind gets its own
    groups (what a PyTorch user has to do), with the same decay rule."""
    from torch.distributed.tensor import DTensor
    groups = []
    for decay in (True, False):
        for dtensor in (True, False):
            ps = [p for p in model.parameters() if (p.dim() >= 2) == decay and isinstance(p, DTensor) == dtensor]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def e2e_tensor_parallel(name: str, args, ctx) -> list:
    """One row: tinymeg TP vs parallelize_module on PlainGPT, eager and compiled, tp = world."""
    from tinymeg.train.optim import build_optimizer
    torch._dynamo.reset()
    steps = {}
    for compiled in (False, True):
        model, plain, idx, targets = _e2e_models(name)
        model = tm.apply_tensor_parallel(model, ctx)
        plain = native_tensor_parallel_plain(plain, ctx.mesh["tp"])
        for who, m, loss in (("tinymeg", model, lambda m: m(idx, targets, return_logits=False)[1]),
                             ("native", plain, lambda m: m(idx, targets))):
            fn = torch.compile(m, fullgraph=True) if compiled else m
            opt = build_optimizer(m, 1e-4, 0.1) if who == "tinymeg" else native_optimizer(m)
            steps[who, compiled] = _training_step(lambda fn=fn, loss=loss: loss(fn), opt, compiled)
    warm_s, failed = _warm(steps)
    ms = _time_wall_and_cpu(steps, args.repeats_for(name))
    return _e2e_row(name, ms, failed, ("tinymeg", "native")) + [f"{warm_s:.0f}"], failed


E2E_HEADERS = ["size", "tinymeg ms", "plain ms", "tinymeg/plain", "(cpu)", "compiled: tinymeg ms",
               "plain ms", "tinymeg/plain", "(cpu)", "tinymeg compiled/eager", "(cpu)", "plain compiled/eager",
               "(cpu)", "warm-up s"]
E2E_TP_HEADERS = ["size", "tinymeg TP ms", "native ms", "tinymeg/native", "(cpu)", "compiled: tinymeg TP ms",
                  "native ms", "tinymeg/native", "(cpu)", "warm-up s"]


def run_e2e(args) -> None:
    torch.set_num_threads(1)  # steadier on a shared machine; torchrun does the same for its ranks
    # Each variant compiles as it would in a process of its own: with static shapes (not made
    # dynamic because another model or size compiled the same code before) and fresh caches.
    torch._dynamo.config.automatic_dynamic_shapes = False
    sizes = [s for s in E2E_SIZES if s in args.sizes]
    args.repeats_for = lambda name: args.repeats if name != "gpt2-width" else max(3, args.repeats // 4)
    os.environ.setdefault("TINYMEG_CACHE_DIR", tempfile.mkdtemp())  # a fresh cache: tuned in this run
    if args.part == "tp":  # the tp=2 half, under torchrun (launched by the one-process half)
        ctx = tm.ParallelContext(tp=int(os.environ["WORLD_SIZE"]))
        rows = [e2e_tensor_parallel(name, args, ctx) for name in sizes]
        if ctx.is_main:
            print(format_table(E2E_TP_HEADERS, [row for row, _ in rows]), flush=True)
            _print_failures([(row[0], failed) for row, failed in rows])
            print(f"(the ops' tuning took {tm.ops.get_default_tuner().tuning_s:.1f} s on rank 0, cold cache)")
        return
    started = time.perf_counter()
    print(f"# one training step (forward, backward, AdamW), fp32, CPU, 1 thread, torch {torch.__version__}; "
          f"median of {args.repeats} interleaved steps (gpt2-width: {args.repeats_for('gpt2-width')})\n")
    for name in sizes:
        fields, B, T = E2E_SIZES[name]
        print(f"- {name}: {fields['n_layer']} layers, width {fields['n_embd']}, {fields['n_head']} heads, "
              f"vocab {fields['vocab_size']}, batch {B} x {T}")
    print()
    print(f"## tinymeg's GPT-2 vs the same model in plain PyTorch, one process "
          f"(compiled: the model with fullgraph=True and the AdamW step, as --compile does)\n", flush=True)
    rows = [e2e_one_process(name, args) for name in sizes]
    print(format_table(E2E_HEADERS, [row for row, _ in rows]), flush=True)
    _print_failures([(row[0], failed) for row, failed in rows])
    print(f"(the ops' tuning took {tm.ops.get_default_tuner().tuning_s:.1f} s of the warm-up, cold cache)")
    if args.tp > 1:
        import subprocess
        import sys
        print(f"\n## tinymeg TP vs parallelize_module, tp={args.tp} (torchrun, gloo)\n", flush=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.tp}", __file__, "e2e",
               "--part", "tp", "--repeats", str(args.repeats), "--sizes", *sizes]
        if subprocess.run(cmd).returncode:
            print(f"(the TP half failed: its output above says why)")
    print(f"\n(ms: wall-clock medians; (cpu): the same ratio by the process's CPU time, which the load "
          f"of other processes barely moves; total {time.perf_counter() - started:.0f} s)")


def add_e2e_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", nargs="+", default=list(E2E_SIZES), choices=list(E2E_SIZES), metavar="SIZE",
                   help=f"any of {list(E2E_SIZES)}")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant (a quarter at GPT-2 small width)")
    p.add_argument("--tp", type=int, default=2, help="ranks of the TP comparison (0: skip it)")
    p.add_argument("--part", default="all", choices=["all", "tp"], help=argparse.SUPPRESS)


# Subcommands: name -> (add_arguments, run, help). (A comment, not the docstring: --help prints that.)
SUBCOMMANDS = {
    "ops": (add_ops_arguments, run_ops, "fused ops: every implementation, the tuner's pick, memory, compile"),
    "comm": (add_comm_arguments, run_comm, "collectives of one step vs the theoretical minimum (torchrun)"),
    "tp": (add_tp_arguments, run_tp, "tinymeg TP vs PyTorch's parallelize_module, same model and mesh (torchrun)"),
    "cp": (add_cp_arguments, run_cp, "context parallelism: memory, step time, ring bytes vs sequence length (torchrun)"),
    "moe": (add_moe_arguments, run_moe,
            "MoE: all-to-all bytes vs theory, dense vs MoE step, grouped vs looped experts (torchrun)"),
    "memory": (add_memory_arguments, run_memory, "ZeRO 0-3: parameter, gradient, optimizer and peak memory per rank"),
    "sample": (add_sample_arguments, run_sample, "generation with and without the KV cache (torchrun for TP)"),
    "e2e": (add_e2e_arguments, run_e2e, "one training step: tinymeg vs plain PyTorch, TP vs parallelize_module"),
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
