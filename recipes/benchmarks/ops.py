"""ops: the fused ops, their paths and kernels, the autotuner's picks, the loss's memory, compile."""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

import tinymeg as tm
from tinymeg.ops import cross_entropy, gelu, norm
from tinymeg.ops.autotune import RuntimeAutoTuner

from benchmarks.common import format_table, peak_memory, time_side_by_side

HELP = "fused ops: every implementation, the tuner's pick, memory, compile"


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


def run(args) -> None:
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


def add_arguments(p: argparse.ArgumentParser) -> None:
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
