"""Helpers every benchmark shares: tables, side-by-side timing, memory."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import tinymeg as tm

# The dispatcher: benchmarks that launch torchrun themselves run it again under torchrun.
BENCH = str(Path(__file__).resolve().parents[1] / "bench.py")


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


def activation_memory(forward_backward, optimizer, device: torch.device) -> int:
    """Peak bytes of forward_backward() above the parameters, their gradients and the optimizer's
    states: the activations (and backward's temporaries). One step first allocates the gradients
    and the states, which then stay allocated (zeroed in place, not freed), so the peak does not
    count them. The step changes the parameters: call it on a benchmark's own model."""
    forward_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    peak = peak_memory(forward_backward, device)
    optimizer.zero_grad(set_to_none=False)
    return peak


def gpt2_small(args) -> tm.models.GPT2Model:
    """GPT-2 small's width with ``args.n_layer`` layers and block size ``args.seq``, seeded."""
    torch.manual_seed(0)
    return tm.models.GPT2Model(tm.models.GPTConfig.gpt2_small(n_layer=args.n_layer, block_size=args.seq))
