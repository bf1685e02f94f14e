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
(sampling) is not re-tuned at every length. A choice is cached in memory and in a JSON file.

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
   rank 0 decides (from its disk cache, or by timing) and broadcasts the choice with
   ``dist.broadcast_object_list``, with any choice it made inside that timing (a path timed
   through the custom op decides the op's kernels); the others adopt them. Outside that scope a
   multi-rank process uses choices made inside it or the default, and never calls a collective:
   so sampling on one rank, uneven last batches or rank-specific shapes cannot hang or diverge.
6. One process: the disk cache, else time every candidate, keep the fastest, write it to disk.

Timing: one call of each candidate first (it checks the output against the default's), one
more to estimate the cost, then ``warmup_iterations`` and ``measure_iterations`` calls of each,
interleaved (a, b, a, b, ...) so that a machine whose load changes slows every candidate alike,
each call timed alone; the median wins. The counts shrink so that all candidates of one key take
about ``budget_s`` together (at least one timed call each). A key with one candidate is not timed. CPU clock: the calling thread's CPU
time when torch runs one thread (it does not count time the OS gave to other processes, which
on a shared machine is most of the noise), the wall clock otherwise; CUDA: events.

A candidate that raises, or whose output differs from the default implementation's, is left
out with a warning, so a broken kernel can never win. Candidates an op calls ``untuned`` (the
loss's reference, which holds the whole logits) are never timed and run only when forced.

The disk cache is ``$TINYMEG_CACHE_DIR/autotune.json`` (default ``~/.cache/tinymeg``), written
atomically (temp file + os.replace) with the permissions of a file created by ``open`` (or the
file's own, when it exists: a shared cache directory stays readable); a corrupt file is ignored
with a warning and rewritten. ``get_default_tuner`` / ``set_default_tuner`` reach the tuner the
ops use.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

CACHE_VERSION = 2           # 2: keys of path choices; interleaved, budgeted timing
DEFAULT_BUDGET_S = 0.25     # seconds of timing per key (all its candidates together)
PATHS = ("plain", "op")     # the path names (paths.py); any other forced name is a kernel


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The disk cache: ``cache_dir``, else ``$TINYMEG_CACHE_DIR``, else the user cache dir."""
    root = cache_dir or os.environ.get("TINYMEG_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinymeg"
    return Path(root) / "autotune.json"


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


def _describe(a: Any) -> str:
    from torch.distributed.tensor import DTensor
    if isinstance(a, DTensor):
        return (f"DT[{','.join(map(str, a.placements))}/mesh{tuple(a.device_mesh.shape)}]"
                + _describe(a.to_local()))
    if isinstance(a, torch.Tensor):
        shape = [_bucket(n) for n in a.shape]
        return f"{str(a.dtype).removeprefix('torch.')}{shape}{'' if a.is_contiguous() else 'nc'}"
    return repr(a)


def _signature(args: tuple) -> tuple | None:
    """Everything a key is made of, exactly, cheap to build (a microsecond or two): the thread
    count, the device (of the first tensor: an op's tensors share one), each tensor's shape, dtype
    and contiguity, the other values. None for DTensor arguments (only the slow key knows them)."""
    sig, device = [torch.get_num_threads()], None
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter:
                return None
            if device is None:
                device = a.device
                sig.append(device)
            sig.append((a.shape, a.dtype, a.is_contiguous()))
        else:
            sig.append(a)
    return tuple(sig)


def _memo_key(op: str, args: tuple) -> tuple | None:
    """(op, exact signature): the in-process memo's key; None where only the slow key will do."""
    sig = _signature(args)
    return None if sig is None else (op, sig)


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _close(a, b) -> bool:
    """Outputs agree: same structure and shapes, values within the dtype's rounding."""
    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            tol = 1e-3 if x.dtype == torch.float32 else 5e-2
            x, y = x.float(), y.float()
            scale = max(1.0, y.abs().max().item()) if y.numel() else 1.0
            if not torch.allclose(x, y, atol=tol * scale, rtol=tol, equal_nan=True):
                return False
    return True


def _cpu_clock() -> Callable[[], float]:
    # With one torch thread every kernel runs on the calling thread, so its CPU time is the
    # candidate's cost without the time the OS gave to other processes (on a shared machine,
    # most of the noise). With several threads their work is elsewhere: the wall clock.
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


class RuntimeAutoTuner:
    """Times each candidate implementation once per key and remembers the fastest.

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
        self.timings: dict[str, dict[str, float]] = {}    # key -> {impl: seconds per call}
        self.tuning_s = 0.0                               # wall seconds spent timing, all keys
        self._synchronized = 0
        self._depth = 0                                   # keys being timed (nested: a path's op)
        self._memo: dict[tuple, str] = {}                 # (op, exact signature) -> choice
        self._fresh: dict[str, str] | None = None         # rank 0: choices made while timing
        self._disk: dict[str, str] | None = None          # the disk cache, read once

    # ---- the decision ----

    def choose(self, op: str, candidates: Mapping[str, Callable], args: tuple, default: str,
               untuned: Collection[str] = ()) -> str:
        """The implementation (a key of candidates) to run op on args. ``untuned`` names
        candidates that run only when forced, never when timed (they hold too much memory)."""
        choice = self.cached(op, args)
        if choice is not None:
            return choice
        choice, final = self._choose(op, candidates, args, default, untuned)
        if final:
            self.remember(op, args, choice)
        return choice

    def cached(self, op: str, args: tuple) -> str | None:
        """The choice for op on args if this process made it already (no timing, no collective)."""
        key = _memo_key(op, args)
        return None if key is None else self._memo.get(key)

    def remember(self, op: str, args: tuple, choice: str) -> None:
        """Make ``choice`` the answer for op on args from now on (paths.py: a forced path)."""
        key = _memo_key(op, args)
        if key is not None:
            self._memo[key] = choice

    def forget(self) -> None:
        """Forget this process's choices (the disk cache stays): the next call of each op decides
        again, reading TINYMEG_OP_IMPL and TINYMEG_AUTOTUNE again."""
        self._memo.clear()
        self.choices.clear()
        self._disk = None

    def _choose(self, op, candidates, args, default, untuned) -> tuple[str, bool]:
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
        key = self.key(op, args)
        tuned = {k: f for k, f in candidates.items() if k not in untuned}
        if key in self.choices and self.choices[key] in tuned:
            return self.choices[key], True
        if torch.compiler.is_compiling() or _capturing(device):
            return default, False  # never time inside a trace or a graph capture
        if _multi_rank():
            if self._fresh is not None:  # rank 0, timing for everyone: decide here, send it along
                choice = self._fresh[key] = self._decide(key, op, tuned, args, default)
            elif not self._synchronized:
                return default, False  # no collective unless every rank is known to be here
            else:
                choice = self._decide_on_rank0(key, op, tuned, args, default)
        else:
            choice = self._decide(key, op, tuned, args, default)
        self.choices[key] = choice
        return choice, True

    def run(self, op: str, candidates: Mapping[str, Callable], args: tuple, default: str,
            untuned: Collection[str] = ()):
        return candidates[self.choose(op, candidates, args, default, untuned)](*args)

    def is_enabled(self, device: torch.device) -> bool:
        env = os.environ.get("TINYMEG_AUTOTUNE")
        if env is not None and env.strip() != "":
            if env.strip() not in ("0", "1"):
                raise ValueError(f"TINYMEG_AUTOTUNE must be 0 or 1, got {env!r}")
            return env.strip() == "1"
        return True if self.enabled is None else self.enabled

    def key(self, op: str, args: tuple) -> str:
        device = _device_of(args)
        where = _device_name(device) + (f"x{torch.get_num_threads()}t" if device.type == "cpu" else "")
        return f"{op}|{where}|" + "|".join(_describe(a) for a in args)

    @contextlib.contextmanager
    def synchronized(self):
        """Declare that every rank runs the same ops in the same order in this block, so misses
        may be decided on rank 0 and broadcast to all ranks (one collective per new key)."""
        self._synchronized += 1
        try:
            yield self
        finally:
            self._synchronized -= 1

    def _decide_on_rank0(self, key, op, candidates, args, default) -> str:
        message = [key, None, {}]
        if dist.get_rank() == 0:
            self._fresh = {}
            try:
                message[1] = self._decide(key, op, candidates, args, default)
            finally:
                message[2], self._fresh = self._fresh, None
        dist.broadcast_object_list(message, src=0)
        if message[0] != key:
            raise RuntimeError(
                f"autotuning is out of step across ranks: rank 0 tuned {message[0]!r} while rank "
                f"{dist.get_rank()} tuned {key!r}. Only wrap code in tuner.synchronized() where "
                f"every rank runs the same ops on the same shapes.")
        if message[1] not in candidates:
            raise RuntimeError(f"rank 0 chose {op}={message[1]!r}, not available on rank "
                               f"{dist.get_rank()} (has {sorted(candidates)})")
        for k, v in message[2].items():  # what rank 0 decided while timing (nested keys)
            self.choices.setdefault(k, v)
        return message[1]

    def _decide(self, key, op, candidates, args, default) -> str:
        cached = self._load().get(key)
        if cached in candidates:
            return cached
        if len(candidates) == 1:  # nothing to compare: no timing, nothing to remember on disk
            return next(iter(candidates))
        choice = self._tune(key, op, candidates, args, default)
        self._save(key, choice)
        if os.environ.get("TINYMEG_AUTOTUNE_VERBOSE", "") == "1":
            ms = ", ".join(f"{k} {1e3 * t:.3g} ms" for k, t in self.timings[key].items())
            print(f"tinymeg autotune: {key} -> {choice} ({ms}); {self.tuning_s:.2f} s of tuning in this "
                  f"process so far", file=sys.stderr, flush=True)
        return choice

    # ---- timing ----

    def _tune(self, key, op, candidates, args, default) -> str:
        device = _device_of(args)
        started = time.perf_counter()
        clock = self.clock or _cpu_clock()
        self._depth += 1
        try:
            with torch.no_grad():
                # One call each, the default's first: is it right (against the default's output)?
                ok, expected = {}, None
                for name in sorted(candidates, key=lambda k: k != default):
                    fn = candidates[name]
                    try:
                        out = fn(*args)
                        if name == default:
                            expected = out if self.verify else None
                        elif expected is not None and not _close(out, expected):
                            warnings.warn(f"tinymeg autotune: {op} implementation {name!r} disagrees with "
                                          f"{default!r} on {key}; leaving it out", RuntimeWarning, stacklevel=2)
                            continue
                        ok[name] = fn
                    except Exception as e:  # noqa: BLE001 - a broken candidate must not break training
                        warnings.warn(f"tinymeg autotune: {op} implementation {name!r} failed on {key}: "
                                      f"{type(e).__name__}: {e}; leaving it out", RuntimeWarning, stacklevel=2)
                times = self._measure(ok, args, device, clock) if len(ok) > 1 else dict.fromkeys(ok, 0.0)
        finally:
            self._depth -= 1
            if not self._depth:  # a key timed inside another's timing is counted once
                self.tuning_s += time.perf_counter() - started
        self.timings[key] = times
        return min(times, key=times.get) if times else default

    def _iterations(self, fns: dict[str, Callable], args, device, clock) -> tuple[int, int]:
        """(warmup, measured) calls per candidate: as configured, or fewer to fit budget_s,
        from one timed call of each (after the first, which may have tuned nested choices)."""
        warmup, measure = self.warmup_iterations, self.measure_iterations
        if self.budget_s is None:
            return warmup, measure
        t0 = clock()
        for fn in fns.values():
            fn(*args)
        _synchronize(device)
        fits = int(self.budget_s / max(clock() - t0, 1e-9))  # rounds of every candidate in the budget
        measure = max(1, min(measure, fits * 10 // 11))
        return min(warmup, max(0, fits - measure)), measure

    def _measure(self, fns: dict[str, Callable], args, device, clock) -> dict[str, float]:
        """Median seconds per call of each fn, calls interleaved."""
        warmup, n = self._iterations(fns, args, device, clock)
        for _ in range(warmup):
            for fn in fns.values():
                fn(*args)
        _synchronize(device)
        samples: dict[str, list] = {name: [] for name in fns}
        events = device.type == "cuda" and self.clock is None
        for _ in range(n):
            for name, fn in fns.items():
                if events:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(*args)
                    end.record()
                    samples[name].append((start, end))
                else:
                    t0 = clock()
                    fn(*args)
                    _synchronize(device)
                    samples[name].append(clock() - t0)
        if events:
            torch.cuda.synchronize(device)
            samples = {k: [s.elapsed_time(e) / 1e3 for s, e in v] for k, v in samples.items()}
        return {name: statistics.median(s) for name, s in samples.items()}

    # ---- the disk cache ----

    def _load(self) -> dict[str, str]:
        if self._disk is None:
            self._disk = self._read()
        return self._disk

    def _read(self) -> dict[str, str]:
        path = cache_path(self.cache_dir)
        try:
            data = json.loads(path.read_text())
            if not (isinstance(data, dict) and isinstance(data.get("entries"), dict)):
                raise ValueError("not a tinymeg autotune cache")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            warnings.warn(f"ignoring the corrupt autotune cache {path} ({e}); it will be rewritten",
                          RuntimeWarning, stacklevel=2)
            return {}
        if data.get("version") != CACHE_VERSION:
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(v, str)}

    def _save(self, key: str, choice: str) -> None:
        """Merge into the file and replace it atomically: a reader never sees half a file,
        and concurrent writers lose at most each other's newest entries, never the file."""
        path = cache_path(self.cache_dir)
        self._load()[key] = choice
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a corrupt file was reported when it was read
                entries = self._read()
            entries[key] = choice
            tmp = path.parent / f".autotune.{os.getpid()}.{uuid.uuid4().hex}.tmp"
            # os.open applies the umask to 0o666 as open() does (tempfile.mkstemp would make it
            # 0o600, and os.replace would then hide a shared cache from every other user).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
                with contextlib.suppress(FileNotFoundError):  # keep the mode someone gave the file
                    os.chmod(tmp, path.stat().st_mode & 0o777)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:  # a read-only home must not stop training
            warnings.warn(f"could not write the autotune cache {path}: {e}", RuntimeWarning, stacklevel=2)


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
             untuned: Collection[str] = ()):
    """Run op on args with the implementation the default tuner picks."""
    return _default_tuner.run(op, candidates, args, default, untuned)
