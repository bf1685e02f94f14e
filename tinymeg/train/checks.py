"""Checks of a training config that need no process group: run by the command line before
any rank starts work, and by ``train()`` for API users. Each error names the value and the fix.

``check_config(cfg, world_size)`` returns the config with the mesh resolved (``dp=-1``
becomes the ranks the other dims leave). ``run_checked(ctx, fn)`` runs a setup step that
every rank does on its own (reading files) and makes all ranks agree on its outcome, so a
failure on some ranks is an error on all of them, printed once, instead of a hang.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch
import torch.distributed as dist

from ..context import resolve_sizes
from ..models import MODELS
from ..parallel.activation_checkpoint import check_ac_mode
from ..parallel.context_parallel import check_seq_len
from ..parallel.pipeline_parallel import check_pipeline


DEFAULT_WARMUP = 20  # LR warmup steps when none is asked for (capped at a tenth of the steps)


class ConfigError(ValueError):
    """A bad flag or config value: the message names it and the fix."""


class PeerError(RuntimeError):
    """Another rank failed a check that all ranks run (``run_checked``); it reports it."""


def check_config(cfg, world_size: int, mesh: dict[str, int] | None = None):
    """Raise ConfigError for a config that cannot run on ``world_size`` processes; return cfg
    with dp resolved. ``mesh``: the dims the config asks for (trainer.mesh_sizes(cfg))."""
    mesh = mesh if mesh is not None else {"tp": cfg.tp, "dp": cfg.dp, "cp": cfg.cp, "ep": cfg.ep}
    try:
        sizes = resolve_sizes(mesh, world_size)
    except ValueError as e:
        asked = _flags(mesh)
        raise ConfigError(f"{e} (asked: {asked})" if asked and "launch with torchrun" not in str(e) else str(e)) from None
    cfg = dataclasses.replace(cfg, dp=sizes["dp"])
    if cfg.warmup is None and isinstance(cfg.steps, int):
        cfg = dataclasses.replace(cfg, warmup=default_warmup(cfg.steps))
    tp, cp, ep, pp = sizes["tp"], sizes["cp"], sizes["ep"], sizes.get("pp", 1)

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name in ("steps", "micro_batch", "grad_accum", "seq_len", "n_layer", "n_head", "n_embd", "eval_iters"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and value >= 1, f"--{_flag(name)} must be an integer >= 1, got {value!r}")
    for name in ("eval_every", "sample_tokens", "warmup"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and value >= 0, f"--{_flag(name)} must be an integer >= 0, got {value!r}")
    need(cfg.warmup <= cfg.steps,
         f"--warmup {cfg.warmup} is longer than --steps {cfg.steps}: the learning rate would never reach "
         f"--lr {cfg.lr}. Pass --warmup {max(1, cfg.steps // 10)} (a tenth of the steps) or fewer")
    need(cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr,
         f"the learning rate must satisfy 0 < --lr and 0 <= --min-lr <= --lr, got --lr {cfg.lr} --min-lr "
         f"{cfg.min_lr}: pass e.g. --lr 1e-3 --min-lr 1e-4")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables clipping), got {cfg.grad_clip}")
    need(0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}")
    need(cfg.timeout_s > 0, f"--timeout-s must be > 0 seconds, got {cfg.timeout_s}")
    need(cfg.bucket_mb > 0, f"--bucket-mb must be > 0, got {cfg.bucket_mb}")
    need(cfg.peak_tflops >= 0, f"--peak-tflops must be >= 0 (0: from the device), got {cfg.peak_tflops}")
    _check_model_flags(cfg, tp)
    for flag, on in (("--sequence-parallel", cfg.sequence_parallel), ("--loss-parallel", cfg.loss_parallel)):
        need(not on or tp > 1, f"{flag} shards over the tensor-parallel ranks, but tp=1: pass --tp 2 (or "
                               f"more), or drop {flag}")
    need(not cfg.sequence_parallel or cfg.seq_len % tp == 0,
         f"--sequence-parallel splits each sequence over the tp={tp} ranks, but --seq-len {cfg.seq_len} is "
         f"not divisible by {tp}: pass --seq-len {cfg.seq_len - cfg.seq_len % tp or tp}")
    if cp > 1:
        try:
            check_seq_len(cfg.seq_len, cp, tp if cfg.sequence_parallel else 1)
        except ValueError as e:
            raise ConfigError(f"--seq-len {cfg.seq_len}: {e}") from None
    need(cfg.n_experts >= 0 and (not cfg.n_experts or 1 <= cfg.top_k <= cfg.n_experts),
         f"--top-k {cfg.top_k} must be between 1 and --n-experts {cfg.n_experts} (0: a dense model)")
    need(ep == 1 or cfg.n_experts, f"--ep {ep} shards experts, but the model has none: add --n-experts")
    need(not cfg.n_experts or cfg.n_experts % ep == 0,
         f"--n-experts {cfg.n_experts} is not divisible by --ep {ep}: each ep rank holds n_experts/ep "
         f"experts. Pass an --ep that divides {cfg.n_experts}")
    need(not (cfg.n_experts and cfg.init_from),
         f"--init-from loads a dense model's weights, and --n-experts {cfg.n_experts} asks for a "
         f"mixture-of-experts model: drop one of them")
    try:
        check_ac_mode(cfg.ac)
    except ValueError as e:
        raise ConfigError(f"--ac: {e}") from None
    if pp > 1:
        _check_pipeline_config(cfg, pp)
    need(not cfg.tensorboard or importlib.util.find_spec("tensorboard") is not None,
         f"--tensorboard {cfg.tensorboard} needs the tensorboard package, which is not installed: "
         f"pip install -e \".[tensorboard]\" (or pip install tensorboard), or drop --tensorboard")
    check_device(cfg.device)
    check_flags(cfg)
    return cfg


def _check_model_flags(cfg, tp: int) -> None:
    """--model and the shape flags: a model config that can be built and split over tp."""
    from .trainer import LLAMA_FIELDS  # the trainer imports this module
    if cfg.model not in MODELS:
        raise ConfigError(f"--model {cfg.model!r} is not one of tinymeg's models: {sorted(MODELS)}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}: pass an --n-head that "
                          f"divides --n-embd {cfg.n_embd} (e.g. --n-head {_divisor_near(cfg.n_embd, cfg.n_head)})")
    if cfg.model != "llama":
        odd = [f"--{_flag(k)}" for k, default in LLAMA_FIELDS.items() if getattr(cfg, k) != default]
        if odd:
            raise ConfigError(f"{', '.join(odd)} shape(s) a Llama, but --model is {cfg.model}: add --model llama")
    else:
        kv = cfg.n_kv_head or cfg.n_head
        if cfg.n_kv_head < 0 or cfg.n_head % kv:
            raise ConfigError(f"--n-kv-head {cfg.n_kv_head} must divide --n-head {cfg.n_head} (each key/value head "
                              f"serves n_head / n_kv_head query heads; 0: n_head)")
        if (cfg.n_embd // cfg.n_head) % 2:
            raise ConfigError(f"--n-embd {cfg.n_embd} / --n-head {cfg.n_head} = {cfg.n_embd // cfg.n_head} must be "
                              f"even for rotary positions: pass another --n-head")
        if kv % tp:
            raise ConfigError(f"--n-kv-head {kv} is not divisible by tp={tp}: tensor parallelism gives each rank "
                              f"whole key/value heads. Pass an --n-kv-head that is a multiple of {tp}, or a "
                              f"--tp that divides {kv}")
    if cfg.n_head % tp:
        raise ConfigError(f"--n-head {cfg.n_head} is not divisible by tp={tp}: tensor parallelism splits attention "
                          f"by whole heads. Pass an --n-head that is a multiple of {tp}, or a --tp that divides "
                          f"{cfg.n_head}")


def default_warmup(steps: int, warmup: int | None = None) -> int:
    """The warmup a run gets when none is asked for: ``warmup`` (a recipe's default, else
    DEFAULT_WARMUP), or a tenth of the steps if that is fewer, so that it never outlasts a short run."""
    return min(warmup or DEFAULT_WARMUP, max(1, steps // 10))


def pipeline_args(cfg) -> dict:
    """apply_pipeline_parallel's keyword arguments (tm.parallelize's ``pipeline=``) from the flags."""
    try:
        points = [int(p) for p in cfg.pp_split_points.split(",")] if cfg.pp_split_points else None
    except ValueError:
        raise ConfigError(f"--pp-split-points {cfg.pp_split_points!r} must be block indices separated "
                          f"by commas, e.g. 2,5") from None
    return dict(schedule=cfg.pp_schedule, microbatches=cfg.pp_microbatches or cfg.pp,
                stages_per_rank=cfg.pp_stages_per_rank, split_points=points, uneven=cfg.pp_uneven)


def _check_pipeline_config(cfg, pp: int) -> None:
    try:
        check_pipeline(cfg.n_layer, pp, micro_batch=cfg.micro_batch, **pipeline_args(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_flags(cfg) -> None:
    """Contradictory or incomplete checkpoint settings, as errors that name the flags."""
    if (cfg.resume or cfg.auto_resume or cfg.ckpt_every) and not cfg.ckpt_dir:
        flag = "--resume" if cfg.resume else "--auto-resume" if cfg.auto_resume else "--ckpt-every"
        raise ConfigError(f"{flag} needs --ckpt-dir (where checkpoints are saved and found)")
    if cfg.resume and (cfg.auto_resume or cfg.resume_from):
        raise ConfigError("--resume (the latest in --ckpt-dir, which must exist) cannot be combined with "
                          "--auto-resume or --resume-from")
    if cfg.ckpt_every < 0 or cfg.keep_last < 0:
        raise ConfigError(f"--ckpt-every and --keep-last must be >= 0, got {cfg.ckpt_every}, {cfg.keep_last}")


def check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "torch sees no CUDA device")
        raise ConfigError(f"--device cuda, but {why} (torch {torch.__version__}): pass --device cpu, or "
                          f"--device auto (cuda when there is one)")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", 0))


def run_checked(ctx, fn):
    """fn() on every rank, then agree: if it raised on any rank, every rank raises, the failing
    ones their own error and the others PeerError. Use around work that touches no collective
    (reading files, checking a checkpoint), so a failure on one rank cannot leave the others
    waiting in a collective until the timeout."""
    error = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on this rank
        error = e
    failed = torch.tensor([ctx.rank if error is not None else ctx.world_size])
    if ctx.world_size > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    first = int(failed)
    if error is not None:
        error.first_failed_rank = first
        raise error
    if first < ctx.world_size:
        raise PeerError(f"rank {first} failed a setup check (it printed why)")
    return result


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _flags(mesh: dict) -> str:
    """The mesh flags that were given a size other than 1 (dp -1: inferred, left out)."""
    return " ".join(f"--{d} {s}" for d, s in mesh.items() if s not in (None, -1, 1))


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), -d))
