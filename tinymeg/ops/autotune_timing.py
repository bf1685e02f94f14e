"""How the autotuner times candidates, and the rule that keeps a pick only when it clearly wins.

Calls are interleaved (a, b, a, b, ...) round by round, so that a machine whose load changes
slows every candidate alike, and each call is timed alone. The clock: the calling thread's CPU
time when torch runs one thread (it leaves out the time the OS gave to other processes, which
on a shared machine is most of the noise), the wall clock otherwise; CUDA events on a GPU.

A pick made once is cached for good, so a pick that loses to the default is worse than no pick:
the default stays unless another candidate beats it beyond the noise (``pick``). Each round
pairs every candidate's time with the default's, taken moments apart; a candidate wins only if
it was faster than the default in at least 3 of 4 rounds and its median per-round ratio to the
default is at most ``1 - MARGIN``, over at least ``MIN_ROUNDS`` rounds. Where fewer rounds fit
in the budget (a call too slow to repeat that often) nothing is timed beyond the estimate: the
default is kept, for free.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

MARGIN = 0.05      # a pick must be at least 5% faster than the default at the median...
MIN_ROUNDS = 5     # ...over at least this many interleaved rounds...
WIN_SHARE = 0.75   # ...and faster than the default in at least this share of them


def cpu_clock() -> Callable[[], float]:
    # With one torch thread every kernel runs on the calling thread, so its CPU time is the
    # candidate's cost without the time the OS gave to other processes (on a shared machine,
    # most of the noise). With several threads their work is elsewhere: the wall clock.
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rounds_in_budget(fns: dict[str, Callable], args: tuple, device: torch.device, clock,
                     warmup: int, rounds: int, budget_s: float | None) -> tuple[int, int]:
    """(warmup, timed) rounds: as configured, or fewer to fit budget_s, from one timed round
    (after the first call of each, which may have tuned nested choices). (0, 0) where fewer
    than MIN_ROUNDS timed rounds fit: no pick could be told from noise, so none is timed."""
    if budget_s is None:
        return warmup, rounds
    t0 = clock()
    for fn in fns.values():
        fn(*args)
    synchronize(device)
    fits = int(budget_s / max(clock() - t0, 1e-9))  # rounds of every candidate in the budget
    rounds = min(rounds, fits * 10 // 11)
    if rounds < MIN_ROUNDS:
        return 0, 0
    return min(warmup, max(0, fits - rounds)), rounds


def measure(fns: dict[str, Callable], args: tuple, device: torch.device, clock: Callable[[], float] | None,
            warmup: int, rounds: int, budget_s: float | None = None) -> dict[str, list[float]]:
    """Seconds of each timed call of each fn, calls interleaved: samples[name][i] is round i.
    ``clock`` None on CUDA: CUDA events. Past ``budget_s`` of the clock (the wall clock slows
    with the machine's load after the estimate was made), no round beyond MIN_ROUNDS starts."""
    deadline = None if clock is None or budget_s is None else clock() + budget_s
    for _ in range(warmup):
        for fn in fns.values():
            fn(*args)
    synchronize(device)
    samples: dict[str, list] = {name: [] for name in fns}
    for i in range(rounds):
        if deadline is not None and i >= MIN_ROUNDS and clock() > deadline:
            break
        for name, fn in fns.items():
            if clock is None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                end.record()
                samples[name].append((start, end))
            else:
                t0 = clock()
                fn(*args)
                synchronize(device)
                samples[name].append(clock() - t0)
    if clock is None:
        torch.cuda.synchronize(device)
        samples = {k: [s.elapsed_time(e) / 1e3 for s, e in v] for k, v in samples.items()}
    return samples


def pick(samples: dict[str, list[float]], default: str) -> str:
    """The default, unless a candidate beats it beyond the noise (see the module doc); of
    several that do, the one with the lowest median ratio to the default."""
    if default not in samples:  # the default failed its check: the fastest of the others
        return min(samples, key=lambda k: statistics.median(samples[k]) if samples[k] else math.inf)
    best, best_ratio = default, 1.0 - MARGIN
    for name, times in samples.items():
        if name == default or len(times) < MIN_ROUNDS:
            continue
        ratios = [t / d if d > 0 else math.inf for t, d in zip(times, samples[default])]
        ratio = statistics.median(ratios)
        if sum(r < 1.0 for r in ratios) >= WIN_SHARE * len(ratios) and ratio <= best_ratio:
            best, best_ratio = name, ratio
    return best
