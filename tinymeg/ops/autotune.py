"""RuntimeAutoTuner: pick the fastest implementation of an op for the inputs it is given.

Every tinymeg op has a few implementations (``ref`` in plain aten, ``fast`` on CPU, ``triton``
on CUDA). Inside the op's kernel, ``dispatch(op, candidates, args, default)`` asks the module's
default tuner which one to run. A choice is keyed on the op, the device, thread count, and each
argument's shape, dtype, contiguity (and placements and mesh, for DTensor arguments; inside a
kernel DTensor has already unwrapped its arguments to local shards, whose shapes carry the
sharding). Each dim of a shape is rounded up to a power of two, so that a sequence growing by
one token (sampling) is not re-tuned at every length. A choice is cached in memory and in a
JSON file.

Policy, in order:

1. ``TINYMEG_OP_IMPL=layer_norm=ref,bias_gelu=fast`` forces implementations. ``layer_norm=ref``
   also forces ``layer_norm_backward`` (the same names exist for both); a ``*_backward`` entry
   overrides that.
2. ``TINYMEG_AUTOTUNE=0`` turns tuning off (each op's default implementation), ``=1`` on.
   Unset, the tuner's ``enabled`` argument decides; its default ``None`` means "on CUDA only".
   Why not on CPU: timing 110 runs of a GPT-2-sized op costs seconds to minutes of a CPU, the
   CPU defaults are the bench's winners already, and tests must not depend on timings.
3. A key decided before in this process: the same choice (no re-timing).
4. Inside a ``torch.compile`` trace or a CUDA-graph capture: never time; the default is used.
   (tinymeg's ops are opaque to the compiler, whose trace only runs their fake kernels, so in
   practice the kernel and this tuner run at run time, outside the trace, and a compiled graph
   calls the same implementation eager code does.)
5. Several ranks (``torch.distributed`` initialised, world > 1): a choice must be the same on
   every rank, and a collective is only safe where every rank is known to reach the same
   decision in the same order. That is only true where the caller says so: inside
   ``with tuner.synchronized():`` (wrap one training step that every rank runs, e.g. the first),
   rank 0 decides (from its disk cache, or by timing) and broadcasts the choice with
   ``dist.broadcast_object_list``; the others adopt it. Outside that scope a multi-rank process
   uses choices made inside it or the default, and never calls a collective: so sampling on one
   rank, uneven last batches or rank-specific shapes cannot hang or diverge.
6. One process: the disk cache, else time every candidate (CUDA events on GPU, the clock and a
   synchronize otherwise), keep the fastest, write it to disk.

A candidate that raises, or whose output differs from the default implementation's, is left
out with a warning, so a broken kernel can never win. Candidates an op calls ``untuned`` (the
loss's reference, which holds the whole logits) are never timed and run only when forced.

The disk cache is ``$TINYMEG_CACHE_DIR/autotune.json`` (default ``~/.cache/tinymeg``), written
atomically (temp file + os.replace); a corrupt file is ignored with a warning and rewritten.
``get_default_tuner`` / ``set_default_tuner`` reach the tuner the ops use.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

CACHE_VERSION = 1


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


def forced_choice(op: str) -> str | None:
    """The implementation TINYMEG_OP_IMPL forces for op, if any."""
    forced = _parse_forced(os.environ.get("TINYMEG_OP_IMPL", ""))
    if op in forced:
        return forced[op]
    if op.endswith("_backward"):
        return forced.get(op[: -len("_backward")])
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


class RuntimeAutoTuner:
    """Times each candidate implementation once per key and remembers the fastest.

    ``clock`` replaces ``time.perf_counter`` (and CUDA events): tests inject a fake clock.
    ``enabled``: True/False, or None for "on CUDA only"; ``TINYMEG_AUTOTUNE`` overrides it.
    ``cache_dir``: where autotune.json lives (default: see ``cache_path``).
    ``verify``: check each candidate's output against the default implementation's.
    """

    def __init__(self, warmup_iterations: int = 10, measure_iterations: int = 100, *,
                 clock: Callable[[], float] | None = None, enabled: bool | None = None,
                 cache_dir: str | os.PathLike | None = None, verify: bool = True):
        if warmup_iterations < 0 or measure_iterations < 1:
            raise ValueError(f"need warmup_iterations >= 0 and measure_iterations >= 1, "
                             f"got {warmup_iterations} and {measure_iterations}")
        self.warmup_iterations, self.measure_iterations = warmup_iterations, measure_iterations
        self.clock, self.enabled, self.cache_dir, self.verify = clock, enabled, cache_dir, verify
        self.choices: dict[str, str] = {}                 # key -> implementation, this process
        self.timings: dict[str, dict[str, float]] = {}    # key -> {impl: seconds per call}
        self._synchronized = 0

    # ---- the decision ----

    def choose(self, op: str, candidates: Mapping[str, Callable], args: tuple, default: str,
               untuned: Collection[str] = ()) -> str:
        """The implementation (a key of candidates) to run op on args. ``untuned`` names
        candidates that run only when forced, never when timed (they hold too much memory)."""
        if default not in candidates:
            raise ValueError(f"default implementation {default!r} of {op} is not among {sorted(candidates)}")
        forced = forced_choice(op)
        if forced is not None:
            if forced not in candidates:
                raise ValueError(f"TINYMEG_OP_IMPL forces {op}={forced!r}, but for these inputs "
                                 f"{op} has only {sorted(candidates)}")
            return forced
        device = _device_of(args)
        if not self.is_enabled(device):
            return default
        key = self.key(op, args)
        tuned = {k: f for k, f in candidates.items() if k not in untuned}
        if key in self.choices and self.choices[key] in tuned:
            return self.choices[key]
        if torch.compiler.is_compiling() or _capturing(device):
            return default  # never time inside a trace or a graph capture
        if _multi_rank():
            if not self._synchronized:
                return default  # no collective unless every rank is known to be here
            choice = self._decide_on_rank0(key, op, tuned, args, default)
        else:
            choice = self._decide(key, op, tuned, args, default)
        self.choices[key] = choice
        return choice

    def run(self, op: str, candidates: Mapping[str, Callable], args: tuple, default: str,
            untuned: Collection[str] = ()):
        return candidates[self.choose(op, candidates, args, default, untuned)](*args)

    def is_enabled(self, device: torch.device) -> bool:
        env = os.environ.get("TINYMEG_AUTOTUNE")
        if env is not None and env.strip() != "":
            if env.strip() not in ("0", "1"):
                raise ValueError(f"TINYMEG_AUTOTUNE must be 0 or 1, got {env!r}")
            return env.strip() == "1"
        return device.type == "cuda" if self.enabled is None else self.enabled

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
        message = [key, None]
        if dist.get_rank() == 0:
            message[1] = self._decide(key, op, candidates, args, default)
        dist.broadcast_object_list(message, src=0)
        if message[0] != key:
            raise RuntimeError(
                f"autotuning is out of step across ranks: rank 0 tuned {message[0]!r} while rank "
                f"{dist.get_rank()} tuned {key!r}. Only wrap code in tuner.synchronized() where "
                f"every rank runs the same ops on the same shapes.")
        if message[1] not in candidates:
            raise RuntimeError(f"rank 0 chose {op}={message[1]!r}, not available on rank "
                               f"{dist.get_rank()} (has {sorted(candidates)})")
        return message[1]

    def _decide(self, key, op, candidates, args, default) -> str:
        cached = self._load().get(key)
        if cached in candidates:
            return cached
        choice = self._tune(key, op, candidates, args, default)
        self._save(key, choice)
        return choice

    # ---- timing ----

    def _tune(self, key, op, candidates, args, default) -> str:
        device = _device_of(args)
        with torch.no_grad():
            expected = candidates[default](*args) if self.verify and len(candidates) > 1 else None
            times = {}
            for name, fn in candidates.items():
                try:
                    if expected is not None and name != default and not _close(fn(*args), expected):
                        warnings.warn(f"tinymeg autotune: {op} implementation {name!r} disagrees with "
                                      f"{default!r} on {key}; leaving it out", RuntimeWarning, stacklevel=2)
                        continue
                    times[name] = self._measure(fn, args, device)
                except Exception as e:  # noqa: BLE001 - a broken candidate must not break training
                    warnings.warn(f"tinymeg autotune: {op} implementation {name!r} failed on {key}: "
                                  f"{type(e).__name__}: {e}; leaving it out", RuntimeWarning, stacklevel=2)
        self.timings[key] = times
        return min(times, key=times.get) if times else default

    def _measure(self, fn, args, device) -> float:
        for _ in range(self.warmup_iterations):
            fn(*args)
        _synchronize(device)
        n = self.measure_iterations
        if self.clock is None and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn(*args)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n
        clock = self.clock or time.perf_counter
        t0 = clock()
        for _ in range(n):
            fn(*args)
        _synchronize(device)
        return (clock() - t0) / n

    # ---- the disk cache ----

    def _load(self) -> dict[str, str]:
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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a corrupt file was reported when it was read
                entries = self._load()
            entries[key] = choice
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
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
