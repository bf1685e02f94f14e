"""RuntimeAutoTuner: pick the fastest implementation of an op for the inputs it is given.

It makes two kinds of choice, with one mechanism:

- **the path** (``tinymeg/ops/paths.py``): each op's wrapper runs either the plain PyTorch code a
  model would run without tinymeg (``plain``) or the custom op (``op``); timed forward + backward
  through the wrapper, so the custom op's dispatch cost is in what is timed;
- **the kernel**: inside the custom op, which implementation runs (``ref`` in plain aten,
  ``fast``/``chunked`` on CPU, ``triton`` on CUDA); ``dispatch(op, candidates, args, default)``.

A choice is keyed on the op, the device, the thread count, and each argument's shape, dtype,
contiguity (and placements and mesh, for DTensor arguments; inside a kernel DTensor has already
unwrapped its arguments to local shards, whose shapes carry the sharding). Each dim of a shape
is rounded up to a power of two (a "shape class"), so that a sequence growing by one token
(sampling) is not re-tuned at every length. A dim the op calls data-dependent (``data_dependent``:
the rows a mixture of experts routes to a rank's experts) is left out of the key: it differs
from rank to rank and step to step, and every rank must ask the same question. A choice is
cached in memory and on disk (``autotune_cache.py``).

Policy, in order:

The environment variables below are read when a choice is first made in a process (a choice
made is a dict lookup, not an environment read, on every later call): set them before the first
step, or call ``get_default_tuner().forget()`` after changing them.

1. ``TINYMEG_OP_IMPL=layer_norm=ref,bias_gelu=plain`` forces choices. An op's name forces its
   path (``plain``, or ``op`` = the custom op with its kernel tuned) or its kernel (any other
   name, which implies the op path). ``layer_norm=ref`` also forces ``layer_norm_backward`` where
   the backward has an implementation of that name; a ``*_backward`` entry overrides that.
2. ``TINYMEG_AUTOTUNE=0`` turns tuning off (each op's default), ``=1`` on. Unset, the tuner's
   ``enabled`` argument decides; its default ``None`` means on, on CPU as on CUDA: a budget
   (``budget_s`` per key) bounds what timing costs, and the disk cache makes it a one-off.
   (``TINYMEG_AUTOTUNE_VERBOSE=1`` prints each choice timed, with its timings and the seconds
   spent tuning so far, to stderr.)
3. A key decided before in this process: the same choice (a dict lookup on exact shapes first,
   so a decided op costs about a microsecond per call).
4. Inside a ``torch.compile`` trace or a CUDA-graph capture: never time; the default is used.
   (Under compile each wrapper takes its compile-time path, see paths.py; a custom op left in
   the graph runs its kernel, and this tuner, at run time, outside the trace.)
5. Several ranks (``torch.distributed`` initialised, world > 1): a choice must be the same on
   every rank, and a collective is only safe where every rank is known to reach the same
   decision in the same order. That is only true where the caller says so: inside
   ``with tuner.synchronized():`` (wrap one training step that every rank runs, e.g. the first),
   rank 0 decides (from its disk cache, or by timing), and one ``all_gather_object`` per new key
   gives every rank rank 0's choice, with any choice it made inside that timing (a path timed
   through the custom op decides the op's kernels), and every rank's key. Where the keys differ
   (code that is not the same on every rank, wrapped all the same), every rank sees it at that
   same collective: each takes the default and the tuner makes no more collectives in this
   process (rank 0 warns once; a rank that meets more new keys than the others would still wait
   on a collective they never make). Outside that scope a multi-rank process uses choices made
   inside it or the default, and never calls a collective: so sampling on one rank, uneven last
   batches or rank-specific shapes cannot hang or diverge.
6. One process: the disk cache, else time the candidates, keep the default unless another beats
   it beyond the noise (``autotune_timing.py``), write the choice to disk.

Before it is timed each candidate runs once and is checked against the default
(``autotune_check.py``); then the rounds of ``autotune_timing.py``, at most ``warmup_iterations`` +
``measure_iterations`` calls of each, fewer so that all candidates of one key take about
``budget_s`` together. A key with one candidate is not timed. Candidates an op calls ``untuned``
(the loss's reference, which holds the whole logits) are never timed and run only when forced.

Nothing the tuner does can stop a run: a candidate that fails its check is left out with a
one-line warning; a timing that fails (a candidate that raises only on a later call, say) leaves
the key to its default, with one line of warning, and is not cached. ``get_default_tuner`` /
``set_default_tuner`` reach the tuner the ops use.
"""
from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Collection, Mapping

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

from . import autotune_cache, autotune_check, autotune_timing
from .autotune_cache import cache_path

DEFAULT_BUDGET_S = 0.25     # seconds of timing per key (all its candidates together)
PATHS = ("plain", "op")     # the path names (paths.py); any other forced name is a kernel


@functools.lru_cache(maxsize=8)
def _parse_forced(spec: str) -> dict[str, str]:
    forced = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, sep, impl = item.partition("=")
        if not sep or not op.strip() or not impl.strip():
            raise ValueError(f"TINYMEG_OP_IMPL={spec!r}: expected 'op=impl,op=impl', got {item!r}")
        forced[op.strip()] = impl.strip()
    return forced


def forced_choice(op: str, candidates: Collection[str] | None = None) -> str | None:
    """The implementation TINYMEG_OP_IMPL forces for op, if any. ``op=impl`` forces
    ``op_backward`` too, when ``impl`` is among its ``candidates`` (the loss's forward has
    ref/chunked and its backward ref/fast: ``linear_cross_entropy=chunked`` leaves the backward
    to the tuner)."""
    forced = _parse_forced(os.environ.get("TINYMEG_OP_IMPL", ""))
    if op in forced:
        return forced[op]
    if op.endswith("_backward"):
        base = forced.get(op[: -len("_backward")])
        if base is not None and (candidates is None or base in candidates):
            return base
    return None


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _describe(a: Any, varying: Collection[int] = ()) -> str:
    """One argument in a key: a tensor's dtype, shape class and contiguity; ``varying`` dims
    (data-dependent) as ``*``."""
    from torch.distributed.tensor import DTensor
    if isinstance(a, DTensor):
        return (f"DT[{','.join(map(str, a.placements))}/mesh{tuple(a.device_mesh.shape)}]"
                + _describe(a.to_local(), varying))
    if isinstance(a, torch.Tensor):
        shape = ", ".join("*" if d in varying else str(_bucket(n)) for d, n in enumerate(a.shape))
        return f"{str(a.dtype).removeprefix('torch.')}[{shape}]{'' if a.is_contiguous() else 'nc'}"
    return repr(a)


def _varying(data_dependent: Collection[tuple[int, int]], i: int) -> tuple[int, ...]:
    """The data-dependent dims of argument i."""
    return tuple(d for j, d in data_dependent if j == i)


def _signature(args: tuple, data_dependent: Collection[tuple[int, int]] = ()) -> tuple | None:
    """Everything a key is made of, exactly, cheap to build (a microsecond or two): the thread
    count, the device (of the first tensor: an op's tensors share one), each tensor's shape (its
    data-dependent dims left out), dtype and contiguity, the other values. None for DTensor
    arguments (only the slow key knows them)."""
    sig, device = [torch.get_num_threads()], None
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter:
                return None
            if device is None:
                device = a.device
                sig.append(device)
            shape = a.shape
            if data_dependent and (varying := _varying(data_dependent, i)):
                shape = tuple(None if d in varying else n for d, n in enumerate(shape))
            sig.append((shape, a.dtype, a.is_contiguous()))
        else:
            sig.append(a)
    return tuple(sig)


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _device_of(args) -> torch.device:
    for a in tree_flatten(args)[0]:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RuntimeAutoTuner:
    """Times each candidate implementation once per key and remembers the fastest, where it
    beats the default beyond the noise.

    ``clock`` replaces the default clocks (thread CPU time or ``time.perf_counter``; CUDA
    events): tests inject a fake clock.
    ``enabled``: True/False, or None for "on" (CPU and CUDA alike); ``TINYMEG_AUTOTUNE`` overrides it.
    ``cache_dir``: where autotune.json lives (default: see ``cache_path``).
    ``verify``: check each candidate's output against the default implementation's.
    ``budget_s``: seconds of timing per key, all candidates together (None: no limit, always
    ``warmup_iterations`` + ``measure_iterations`` calls each).
    """

    def __init__(self, warmup_iterations: int = 10, measure_iterations: int = 100, *,
                 clock: Callable[[], float] | None = None, enabled: bool | None = None,
                 cache_dir: str | os.PathLike | None = None, verify: bool = True,
                 budget_s: float | None = DEFAULT_BUDGET_S):
        if warmup_iterations < 0 or measure_iterations < 1:
            raise ValueError(f"need warmup_iterations >= 0 and measure_iterations >= 1, "
                             f"got {warmup_iterations} and {measure_iterations}")
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"budget_s must be > 0 seconds (or None for no limit), got {budget_s}")
        self.warmup_iterations, self.measure_iterations = warmup_iterations, measure_iterations
        self.clock, self.enabled, self.cache_dir, self.verify = clock, enabled, cache_dir, verify
        self.budget_s = budget_s
        self.choices: dict[str, str] = {}                 # key -> implementation, this process
        self.timings: dict[str, dict[str, float]] = {}    # key -> {impl: median seconds per call}
        self.tuning_s = 0.0                               # wall seconds spent timing, all keys
        self._synchronized = 0
        self._out_of_step = False                         # ranks asked different questions: no more collectives
        self._referencing = False                         # a check's reference runs: ops take defaults
        self._depth = 0                                   # keys being timed (nested: a path's op)
        self._memo: dict[tuple, str] = {}                 # (op, exact signature) -> choice
        self._fresh: dict[str, str] | None = None         # rank 0: choices made while timing
        self._disk: dict[str, str] | None = None          # the disk cache, read once

    # ---- the decision ----

    def choose(self, op: str, candidates: Mapping[str, Callable], args: tuple, default: str,
               untuned: Collection[str] = (), data_dependent: Collection[tuple[int, int]] = ()) -> str:
        """The implementation (a key of candidates) to run op on args. ``untuned`` names
        candidates that run only when forced, never when timed (they hold too much memory).
        ``data_dependent``: (argument index, dim) pairs whose size depends on the data, left
        out of the key (the candidates must not depend on them either)."""
        choice = self.cached(op, args, data_dependent)
        if choice is not None:
            return choice
        choice, final = self._choose(op, candidates, args, default, untuned, data_dependent)
        if final:
            self.remember(op, args, choice, data_dependent)
        return choice

    def cached(self, op: str, args: tuple, data_dependent: Collection[tuple[int, int]] = ()) -> str | None:
        """The choice for op on args if this process made it already (no timing, no collective)."""
        sig = _signature(args, data_dependent)
        return None if sig is None else self._memo.get((op, sig))

    def remember(self, op: str, args: tuple, choice: str, data_dependent: Collection[tuple[int, int]] = ()) -> None:
        """Make ``choice`` the answer for op on args from now on (paths.py: a forced path)."""
        sig = _signature(args, data_dependent)
        if sig is not None:
            self._memo[op, sig] = choice

    def forget(self) -> None:
        """Forget this process's choices (the disk cache stays): the next call of each op decides
        again, reading TINYMEG_OP_IMPL and TINYMEG_AUTOTUNE again."""
        self._memo.clear()
        self.choices.clear()
        self._disk = None

    def _choose(self, op, candidates, args, default, untuned, data_dependent) -> tuple[str, bool]:
        """(choice, whether it is final for these inputs: then it is remembered)."""
        if default not in candidates:
            raise ValueError(f"default implementation {default!r} of {op} is not among {sorted(candidates)}")
        forced = forced_choice(op, candidates)
        if forced is not None and forced not in PATHS:
            if forced not in candidates:
                raise ValueError(f"TINYMEG_OP_IMPL forces {op}={forced!r}, but for these inputs "
                                 f"{op} has only {sorted(candidates)}")
            return forced, True
        device = _device_of(args)
        if not self.is_enabled(device):
            return default, True
        key = self.key(op, args, data_dependent)
        tuned = {k: f for k, f in candidates.items() if k not in untuned}
        if key not in self.choices:
            if torch.compiler.is_compiling() or _capturing(device) or self._referencing:
                return default, False  # never time inside a trace, a graph capture or a check
            if not _multi_rank():
                self.choices[key] = self._decide(key, op, tuned, args, default)
            elif self._fresh is not None:  # rank 0, timing for everyone: decide here, send it along
                self.choices[key] = self._fresh[key] = self._decide(key, op, tuned, args, default)
            elif self._synchronized and not self._out_of_step:
                self.choices[key] = self._decide_on_rank0(key, op, tuned, args, default)
            else:
                return default, False  # no collective unless every rank is known to be here
        choice = self.choices[key]
        return (choice if choice in tuned else default), True  # (rank 0's pick may not run here)

    def run(self, op: str, candidates: Mapping[str, Callable], args: tuple, default: str,
            untuned: Collection[str] = (), data_dependent: Collection[tuple[int, int]] = ()):
        return candidates[self.choose(op, candidates, args, default, untuned, data_dependent)](*args)

    def is_enabled(self, device: torch.device) -> bool:
        env = os.environ.get("TINYMEG_AUTOTUNE")
        if env is not None and env.strip() != "":
            if env.strip() not in ("0", "1"):
                raise ValueError(f"TINYMEG_AUTOTUNE must be 0 or 1, got {env!r}")
            return env.strip() == "1"
        return True if self.enabled is None else self.enabled

    def key(self, op: str, args: tuple, data_dependent: Collection[tuple[int, int]] = ()) -> str:
        device = _device_of(args)
        where = _device_name(device) + (f"x{torch.get_num_threads()}t" if device.type == "cpu" else "")
        return f"{op}|{where}|" + "|".join(_describe(a, _varying(data_dependent, i)) for i, a in enumerate(args))

    @contextlib.contextmanager
    def synchronized(self):
        """Declare that every rank runs the same ops in the same order in this block, so misses
        may be decided on rank 0 and sent to all ranks (one collective per new key)."""
        self._synchronized += 1
        try:
            yield self
        finally:
            self._synchronized -= 1

    def _decide_on_rank0(self, key, op, candidates, args, default) -> str:
        """Rank 0's choice for key, on every rank; the default everywhere if the ranks' keys differ."""
        choice, fresh = None, {}
        if dist.get_rank() == 0:
            self._fresh = {}
            try:
                choice = self._decide(key, op, candidates, args, default)
            finally:
                fresh, self._fresh = self._fresh, None
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, (key, choice, fresh))
        others = [(rank, k) for rank, (k, _, _) in enumerate(messages) if k != messages[0][0]]
        if others:  # every rank sees this at this same collective, so all stop together
            self._out_of_step = True
            if dist.get_rank() == 0:
                rank, other = others[0]
                warnings.warn(f"tinymeg autotune: ranks ran different ops inside synchronized() (rank 0 "
                              f"{messages[0][0]!r}, rank {rank} {other!r}); every rank keeps the defaults of "
                              f"undecided ops from here on", RuntimeWarning, stacklevel=2)
            return default
        for k, v in messages[0][2].items():  # what rank 0 decided while timing (nested keys)
            self.choices.setdefault(k, v)
        return messages[0][1]

    def _decide(self, key, op, candidates, args, default) -> str:
        cached = self._load().get(key)
        if cached in candidates:
            return cached
        if len(candidates) == 1:  # nothing to compare: no timing, nothing to remember on disk
            return next(iter(candidates))
        choice = self._tune(key, op, candidates, args, default)
        if choice is None:  # bad inputs, or the timing failed (warned): the default, not written
            return default
        self._load()[key] = choice
        autotune_cache.write(cache_path(self.cache_dir), key, choice)
        if os.environ.get("TINYMEG_AUTOTUNE_VERBOSE", "") == "1":
            ms = ", ".join(f"{k} {1e3 * t:.3g} ms" for k, t in self.timings[key].items()) or "not timed"
            print(f"tinymeg autotune: {key} -> {choice} ({ms}); {self.tuning_s:.2f} s of tuning in this "
                  f"process so far", file=sys.stderr, flush=True)
        return choice

    def _load(self) -> dict[str, str]:
        if self._disk is None:
            self._disk = autotune_cache.read(cache_path(self.cache_dir))
        return self._disk

    # ---- timing ----

    def _tune(self, key, op, candidates, args, default) -> str | None:
        """The candidate to keep for key (autotune_timing.pick); None if none ran or timing failed."""
        device = _device_of(args)
        started = time.perf_counter()
        clock = self.clock or (None if device.type == "cuda" else autotune_timing.cpu_clock())
        self._depth += 1
        try:
            with torch.no_grad():
                ok = self._checked(key, op, candidates, args, default)
                if len(ok) < 2:
                    self.timings[key] = {}
                    return next(iter(ok), None)
                warmup, rounds = autotune_timing.rounds_in_budget(
                    ok, args, device, clock or time.perf_counter, self.warmup_iterations,
                    self.measure_iterations, self.budget_s)
                samples = autotune_timing.measure(ok, args, device, clock, warmup, rounds, self.budget_s)
        except Exception as e:  # noqa: BLE001 - tuning must never stop a run
            warnings.warn(f"tinymeg autotune: timing {key} failed ({autotune_check.first_line(e)}); {op} keeps its "
                          f"default {default!r} for it", RuntimeWarning, stacklevel=2)
            return None
        finally:
            self._depth -= 1
            if not self._depth:  # a key timed inside another's timing is counted once
                self.tuning_s += time.perf_counter() - started
        self.timings[key] = {k: statistics.median(s) for k, s in samples.items() if s}
        return autotune_timing.pick(samples, default)

    def _checked(self, key, op, candidates, args, default) -> dict[str, Callable]:
        """autotune_check.checked, each candidate left out warned about in one line. Where none
        runs the inputs are wrong: no warning, the op's own error follows when its default runs."""
        ok, left_out = autotune_check.checked(candidates, args, default, self.verify, self._untuned)
        for name, why in left_out.items() if ok else ():
            warnings.warn(f"tinymeg autotune: {op} implementation {name!r} {why} on {key}; leaving it out",
                          RuntimeWarning, stacklevel=4)
        return ok

    @contextlib.contextmanager
    def _untuned(self):
        """Ops called in this block take their defaults (a check's float32 reference run)."""
        self._referencing = True
        try:
            yield
        finally:
            self._referencing = False

_default_tuner = RuntimeAutoTuner()


def get_default_tuner() -> RuntimeAutoTuner:
    """The tuner tinymeg's ops use."""
    return _default_tuner


def set_default_tuner(tuner: RuntimeAutoTuner) -> RuntimeAutoTuner:
    """Make ``tuner`` the one tinymeg's ops use; returns the previous one."""
    global _default_tuner
    previous, _default_tuner = _default_tuner, tuner
    return previous


def synchronized():
    """``with tinymeg.ops.synchronized():`` around a step that every rank runs: see the module doc."""
    return _default_tuner.synchronized()


def dispatch(op: str, candidates: Mapping[str, Callable], args: tuple, default: str,
             untuned: Collection[str] = (), data_dependent: Collection[tuple[int, int]] = ()):
    """Run op on args with the implementation the default tuner picks."""
    return _default_tuner.run(op, candidates, args, default, untuned, data_dependent)
