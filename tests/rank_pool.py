"""A pool of real gloo ranks that runs test bodies, started once per world size per session.

Spawning a world costs seconds (each rank imports torch and connects), so tests do not spawn
their own: they send a module-level function to ``world(n).run(fn, *args)``; every rank runs
it and the results come back as a list indexed by rank. An exception on any rank fails the
test with that rank's traceback; a rank stuck in a collective (because another failed) hits
the collective timeout, and a pool that misbehaves is torn down and rebuilt for the next test.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from datetime import timedelta

from tinymeg.context import _free_port  # one home for "a free local port"

COLLECTIVE_TIMEOUT_S = 60
TEST_TIMEOUT_S = 300
# Starting n ranks (each imports torch and connects) is not a test's time: on a loaded 2-core
# machine an 8-rank pool can take minutes to come up.
STARTUP_TIMEOUT_S = 900


def _worker(rank, world_size, port, tasks, results, path):
    sys.path[:0] = [p for p in path if p not in sys.path]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)  # 2 cores shared by up to 4 ranks: no oversubscription
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results.put((rank, True, "ready"))
    while (task := tasks.get()) is not None:
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - sent back to the test, which raises it
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, world_size, port, self.tasks[r], self.results, list(sys.path)))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()
        ready, deadline = 0, time.monotonic() + STARTUP_TIMEOUT_S
        while ready < world_size:  # every rank says "ready" once its process group is up
            try:
                self.results.get(timeout=5)
                ready += 1
            except queue.Empty:
                if not self.alive() or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"the {world_size}-rank pool did not start: "
                                       f"{'a rank died' if not self.alive() else f'{STARTUP_TIMEOUT_S}s passed'}") from None

    def run(self, fn, *args, **kwargs) -> list:
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out, errors = [None] * self.world_size, []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self.results.get(timeout=TEST_TIMEOUT_S)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"a rank of the {self.world_size}-rank pool did not answer "
                                   f"in {TEST_TIMEOUT_S}s") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            raise AssertionError("test body failed on some ranks:\n" + "\n".join(sorted(errors)))
        return out

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


_pools: dict[int, RankPool] = {}


def world(n: int) -> RankPool:
    """The session's pool of n ranks (started on first use, rebuilt if a rank died)."""
    pool = _pools.get(n)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _pools[n] = RankPool(n)
    return pool


def close_all() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()


# ---- helpers for test bodies (they run inside the ranks) ----

_contexts: dict = {}


def get_ctx(dp: int = 1, tp: int = 1, **dims):
    """A cached ParallelContext: building a mesh creates process groups, so build each shape once.
    Other dims (cp=2, ...) are keywords; a dim of size 1 is the same as leaving it out."""
    import tinymeg as tm
    sizes = {d: n for d, n in {"dp": dp, "tp": tp, **dims}.items() if n != 1}
    key = tuple(sorted(sizes.items()))
    if key not in _contexts:
        _contexts[key] = tm.ParallelContext(**{"dp": dp, **sizes})
    return _contexts[key]
