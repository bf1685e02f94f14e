"""e2e: one training step, tinymeg vs plain PyTorch, and tinymeg TP vs parallelize_module."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import tinymeg as tm

from benchmarks.common import BENCH, format_table

HELP = "one training step: tinymeg vs plain PyTorch, TP vs parallelize_module"


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


def run(args) -> None:
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
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.tp}", BENCH, "e2e",
               "--part", "tp", "--repeats", str(args.repeats), "--sizes", *sizes]
        if subprocess.run(cmd).returncode:
            print("(the TP half failed: its output above says why)")
    print(f"\n(ms: wall-clock medians; (cpu): the same ratio by the process's CPU time, which the load "
          f"of other processes barely moves; total {time.perf_counter() - started:.0f} s)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", nargs="+", default=list(E2E_SIZES), choices=list(E2E_SIZES), metavar="SIZE",
                   help=f"any of {list(E2E_SIZES)}")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant (a quarter at GPT-2 small width)")
    p.add_argument("--tp", type=int, default=2, help="ranks of the TP comparison (0: skip it)")
    p.add_argument("--part", default="all", choices=["all", "tp"], help=argparse.SUPPRESS)
