"""Distributed checkpoints: save, verify, resume (on any mesh), crash-safe, exportable.

A checkpoint directory (``--ckpt-dir``) looks like::

    ck/
      latest                  # one line: the name of the newest complete checkpoint
      step_000020/
        .metadata             # DCP's index of every tensor, its global shape and its chunks
        __0_0.distcp ...      # DCP's data, one file per rank that wrote something
        rng/rank_00000.pt     # each rank's RNG states (torch CPU/CUDA, Python, numpy)
        tinymeg.json          # step, configs, mesh, tokenizer, parameter shapes, file sizes

What is saved. Model and optimizer go through ``torch.distributed.checkpoint`` (DCP) with
``get_state_dict``/``set_state_dict``: every tensor is stored with its *global* shape and
each rank writes only the chunks it holds (replicas once), so a checkpoint loads onto any
mesh and DCP reads each rank's new chunks from whichever files hold them. The LR schedule
and the data position are pure functions of the step (``lr_at(step)``, ``get_batch(seed,
step, dp rank)``), so the step is all the state they have.

GPT-2's fused ``c_attn`` is the one exception to "DCP just works": under TP it is sharded
within each of q, k and v (``_StridedShard(0, split_factor=3)``), so a rank's shard is three
separate row ranges of the global weight, which DCP's one-box-per-shard metadata cannot
describe (``dcp.save`` fails with "overlapping chunks"). Seen as ``(3, rows / 3, ...)``
the same shard *is* one box, ``Shard(1)``. So every parameter that stacks k projections
(``output_chunks`` on the module, or the ``split_factor`` of its placement) is stored as
a ``(k, rows / k, ...)`` view, whatever the mesh, tp=1 included: no copy, no communication,
and any TP size reshards it like any other ``Shard``. ``tinymeg.json`` lists those keys
under ``"stacked"``; ``load_model`` and ``recipes/export.py`` give the usual layout back.

RNG states are per rank. Resumed on the same mesh, every rank restores its own. On a
different mesh the old ranks no longer exist (and a different dp split gives each rank other
sequences anyway), so every rank reseeds from a hash of (seed, step, dp rank): resharded runs
stay deterministic, and with dropout 0 (the default) RNG plays no part in training at all.

A checkpoint is complete or absent: all ranks write into ``step_N.tmp``, barrier, then rank 0
writes ``tinymeg.json`` (last, with every file's size), renames the directory to ``step_N``
and replaces ``latest`` atomically (temp file + ``os.replace``). A crash at any point leaves
``latest`` at the previous complete checkpoint; leftover ``*.tmp`` are removed by the next
successful save. Before loading, every file is checked against the recorded sizes and the
parameter shapes against the model, so a damaged or mismatched checkpoint is a clear error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from tqdm import tqdm

from ..compat import StridedShard
from ..data import CharTokenizer, GPT2Tokenizer
from ..models import MODELS, CausalLM, model_name
# torch's get/set_state_dict, extended to ZeRO shards and fp32 master weights (any stage, any mesh)
from ..parallel.zero import get_state_dict, set_state_dict, stacked_count
from .checks import check_flags, run_checked
from .optim import set_weight_decay

META = "tinymeg.json"
LATEST = "latest"
FORMAT = 2  # 2: the optimizer state flattened to one key per parameter (see _on_disk)
_STEP_DIR = re.compile(r"step_(\d+)$")
# Training settings that change the run's trajectory: resuming with other values works, but
# the result is not what the uninterrupted run would have given (warned about, not an error).
_TRAJECTORY_FIELDS = ("seed", "lr", "min_lr", "warmup", "steps", "weight_decay", "grad_clip",
                      "data", "tokenizer", "dropout", "top_k")
# Model config fields that do not change which weights there are or what they mean: dropout and
# the MoE routing's k and loss weights (a change is a trajectory change, warned about above).
_TRAINING_ONLY_MODEL_FIELDS = ("dropout", "top_k", "aux_loss_weight", "z_loss_weight")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ---------------------------------------------------------------- finding checkpoints

def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete checkpoints in ckpt_dir (those with tinymeg.json), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(ckpt_dir)
             if (m := _STEP_DIR.match(name)) and os.path.isfile(os.path.join(ckpt_dir, name, META))]
    return [os.path.join(ckpt_dir, name) for _, name in sorted(found)]


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The checkpoint ``ckpt_dir/latest`` names; without that file (a crash between the first
    rename and the first pointer write) the newest complete one; None when there is none."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(pointer):
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    with open(pointer) as f:
        return os.path.join(ckpt_dir, f.read().strip())


def resolve(path: str) -> str:
    """A checkpoint directory, or a --ckpt-dir (then its latest)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    latest = latest_checkpoint(path) if os.path.isdir(path) else None
    return latest or path


def verify(path: str) -> dict:
    """Check that the checkpoint at path is complete and undamaged; return its tinymeg.json.

    Every file the save wrote must be there with the size it had; this catches a missing
    .metadata, a shard cut short, an unfinished save. Damage that keeps the sizes is not seen
    here: a garbled header fails to load, flipped bits inside tensor data load as they are.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist or is not a directory")
    if path.rstrip("/").endswith(".tmp"):
        raise ValueError(f"{path!r} is an unfinished save (a .tmp directory): resume from a "
                         f"complete checkpoint, e.g. the one its directory's `latest` names")
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"checkpoint {path!r} is incomplete or not a tinymeg checkpoint: it has no "
                         f"{META}, which a save writes last{_others_hint(path)}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        files, step = meta["files"], meta["step"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {path!r} is corrupt: {meta_path} cannot be read ({e!r})"
                         f"{_others_hint(path)}") from None
    problems = []
    for rel, size in sorted(files.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{rel} has {os.path.getsize(full)} bytes, the save wrote {size}")
    if problems:
        raise ValueError(f"checkpoint {path!r} (step {step}) is damaged: " + "; ".join(problems)
                         + _others_hint(path))
    return meta


def _others_hint(path: str) -> str:
    others = [p for p in list_checkpoints(os.path.dirname(os.path.abspath(path)))
              if os.path.abspath(p) != os.path.abspath(path)]
    if not others:
        return ""
    return f". Other checkpoints there: {', '.join(os.path.basename(p) for p in others)} (--resume-from one of them)"


def check_writable(ckpt_dir: str) -> None:
    """Create ckpt_dir if needed and prove it takes a file, before any training is done."""
    probe = os.path.join(ckpt_dir, f".write_test.{os.getpid()}.{os.environ.get('RANK', 0)}")
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"--ckpt-dir {ckpt_dir!r} is not writable ({e.strerror or e}): choose a "
                              f"directory this user can create and write files in") from None


# ---------------------------------------------------------------- state dicts on disk

def _stacked_counts(model: nn.Module) -> dict[str, int]:
    """fqn -> k for each parameter that stacks k projections on dim 0 (GPT-2's c_attn: q|k|v)."""
    counts = {}
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            k = stacked_count(module, p)   # (not fooled by ZeRO-3's dp _StridedShard)
            if k > 1:
                counts[f"{mod_name}.{name}" if mod_name else name] = k
    return counts


def _stacked_placement(pl, k: int):
    if isinstance(pl, StridedShard):
        if pl.dim != 0 or pl.split_factor != k:
            raise NotImplementedError(f"cannot checkpoint placement {pl} of a {k}-projection weight")
        return Shard(1)
    if isinstance(pl, Shard):
        if pl.dim == 0:
            raise NotImplementedError(f"a {k}-projection weight sharded with plain Shard(0) mixes "
                                      f"projections on a rank; shard it with _StridedShard(0, {k})")
        return Shard(pl.dim + 1)
    if isinstance(pl, Replicate):
        return pl
    raise NotImplementedError(f"cannot checkpoint placement {pl}")


def _stacked(t: torch.Tensor, k: int) -> torch.Tensor:
    """t (k*m, ...) viewed as (k, m, ...), sharing t's memory. A _StridedShard(0, k) shard is one
    box of that view (Shard(1)), so DCP can save it and reshard it."""
    if not isinstance(t, DTensor):
        return t.view(k, -1, *t.shape[1:])
    local = t.to_local()
    return DTensor.from_local(local.view(k, -1, *local.shape[1:]), t.device_mesh,
                              [_stacked_placement(pl, k) for pl in t.placements], run_check=False)


def _tied(model: nn.Module) -> dict[str, str]:
    """fqn -> the fqn of the same parameter met first (GPT-2's lm_head.weight is wte's)."""
    first, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


# The optimizer's state dict is flattened: "state.<fqn>.exp_avg", "param_groups.<fqn>.lr"... so
# every key names one parameter. Pipeline stages hold different parameters and each writes its
# own keys; a nested "param_groups" list (one per rank, naming that rank's parameters) would be
# written once, by one stage, and given to all. The same flat keys load on any pp size.
# (torch's StateDictOptions(flatten_optimizer_state_dict=True) does this too, but ZeRO's
# get_state_dict is not torch's: one flattening for both.)

def _flatten_optim(optim_sd: dict) -> dict:
    flat = {f"state.{fqn}.{k}": v for fqn, s in optim_sd["state"].items() for k, v in s.items()}
    for group in optim_sd["param_groups"]:
        for fqn in group["params"]:
            flat.update({f"param_groups.{fqn}.{k}": v for k, v in group.items() if k != "params"})
    return flat


def _unflatten_optim(flat: dict, like: dict) -> dict:
    """The nested state dict ``like`` (this rank's, from get_state_dict) with ``flat``'s values."""
    state = {fqn: {k: flat[f"state.{fqn}.{k}"] for k in s} for fqn, s in like["state"].items()}
    groups = [{**{k: flat.get(f"param_groups.{g['params'][0]}.{k}", v) if g["params"] else v
                  for k, v in g.items() if k != "params"}, "params": g["params"]}
              for g in like["param_groups"]]
    return {"state": state, "param_groups": groups}


def _optim_fqn(key: str) -> str | None:
    """The parameter a flat optimizer-state key belongs to: "state.<fqn>.<name>" -> fqn."""
    return key[len("state."):].rpartition(".")[0] if key.startswith("state.") else None


def _on_disk(model: nn.Module, model_sd: dict, optim_sd: dict | None) -> dict:
    """The dict DCP saves and loads: the state dicts with stacked parameters as views, and a
    tied parameter once (it is one tensor: loading the first name loads it)."""
    stacked, tied = _stacked_counts(model), _tied(model)
    out = {"model": {k: _stacked(v, stacked[k]) if k in stacked else v for k, v in model_sd.items()
                     if k not in tied}}
    if optim_sd is not None:
        out["optim"] = {k: _stacked(v, stacked[fqn]) if (fqn := _optim_fqn(k)) in stacked and torch.is_tensor(v)
                        and v.dim() else v for k, v in optim_sd.items()}
    return out


def _whole_model(model: nn.Module, ctx) -> dict:
    """The stacked, tied and parameter shapes of the whole model. Under pipeline parallelism
    each stage holds some of the parameters: the stages' lists are merged (a collective over pp)."""
    mine = {"stacked": _stacked_counts(model), "tied": _tied(model), "param_shapes": _shapes(model)}
    if getattr(ctx, "pp_size", 1) == 1:
        return mine
    stages = [None] * ctx.pp_size
    dist.all_gather_object(stages, mine, group=ctx.mesh["pp"].get_group())
    return {key: {k: v for stage in stages for k, v in stage[key].items()} for key in mine}


def _model_config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def check_compatible(meta: dict, model: nn.Module, path: str, shapes: dict | None = None) -> None:
    """Parameter names and global shapes must match, and so must every model config field
    that changes what the model computes (n_head, vocab_size, ...: parameters of the same
    shapes can mean another model); name every one that does not. ``shapes``: the whole
    model's (_whole_model), when this rank holds only a part of it (a pipeline stage)."""
    saved, now = meta["param_shapes"], _shapes(model) if shapes is None else shapes
    bad = [f"{k}: checkpoint {tuple(saved[k]) if k in saved else 'absent'}, model "
           f"{tuple(now[k]) if k in now else 'absent'}"
           for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if not bad:
        ours, theirs = _model_config(model) or {}, meta.get("model_config") or {}
        # A field the checkpoint lacks is one added since: the saving run had its default.
        diff = [f"{f}={theirs[f]!r} (now {v!r})" for f, v in ours.items()
                if f not in _TRAINING_ONLY_MODEL_FIELDS and f in theirs and theirs[f] != v]
        if diff:
            raise ValueError(
                f"checkpoint {path!r} holds a model with other settings: {', '.join(diff)}. Its parameters "
                f"have the shapes of this model's but compute something else. Pass the settings of the run "
                f"that saved it (--n-head, --data/--tokenizer for the vocabulary, ...), or start a fresh run")
        return
    ours, fields = _model_config(model), ""
    if ours and meta.get("model_config"):
        diff = [f"{f}={meta['model_config'].get(f)!r} (now {v!r})" for f, v in ours.items()
                if meta["model_config"].get(f) != v]
        fields = f"\nModel config in the checkpoint: {', '.join(diff)}" if diff else ""
    shown = bad[:20] + ([f"... and {len(bad) - 20} more"] if len(bad) > 20 else [])
    raise ValueError(f"checkpoint {path!r} holds a different model; {len(bad)} parameter(s) do not "
                     f"match:\n  " + "\n  ".join(shown) + fields
                     + "\nPass the same --n-layer/--n-head/--n-embd/--seq-len/--data as the run that saved it.")


# ---------------------------------------------------------------- RNG

def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _reseed(seed: int, step: int, dp_rank: int) -> None:
    digest = hashlib.blake2b(f"rng:{seed}:{step}:{dp_rank}".encode(), digest_size=8).digest()
    s = int.from_bytes(digest, "little") >> 1
    torch.manual_seed(s)   # seeds CUDA too
    random.seed(s)
    np.random.seed(s % 2**32)


# ---------------------------------------------------------------- files

def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: str, final: str, ckpt_dir: str) -> None:
    """Rank 0, once every rank's files are in tmp: make the checkpoint visible, atomically."""
    if os.path.exists(final):
        # Renamed by an attempt that died before updating `latest`; this run resumed from an
        # older checkpoint and redid the step. (Never `latest` itself: saves come after it.)
        if os.path.realpath(final) == os.path.realpath(latest_checkpoint(ckpt_dir) or ""):
            raise FileExistsError(f"refusing to replace {final!r}, the latest checkpoint")
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = os.path.join(ckpt_dir, LATEST)
    _write(pointer + ".tmp", (os.path.basename(final) + "\n").encode())
    os.replace(pointer + ".tmp", pointer)
    _fsync_dir(ckpt_dir)


def _step_of(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


def _prune(ckpt_dir: str, latest: str, keep_last: int) -> None:
    """Rank 0, after committing `latest`: drop unfinished saves, checkpoints numbered after
    `latest`, and all but the keep_last newest up to `latest`.

    A checkpoint numbered after the one just committed was renamed by an attempt that died
    before naming it `latest`; this run resumed from an older one and went on without it, so
    it is not part of this run's history (and would count as the newest: keep_last would
    then delete `latest` itself)."""
    for name in os.listdir(ckpt_dir):
        if name.endswith(".tmp") and _STEP_DIR.match(name[:-4]):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    history = []
    for path in list_checkpoints(ckpt_dir):
        if _step_of(path) > _step_of(latest):
            shutil.rmtree(path, ignore_errors=True)
        else:
            history.append(path)
    if keep_last > 0:
        for path in history[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- save / load

def save(ckpt_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, ctx,
         meta: dict | None = None, keep_last: int = 0) -> str:
    """Save the checkpoint of `step` as ``ckpt_dir/step_N``; every rank calls this.

    ``meta`` is extra JSON for tinymeg.json (configs, tokenizer). Returns the checkpoint path.
    """
    final = os.path.join(ckpt_dir, step_dir_name(step))
    tmp = final + ".tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)          # a dead attempt's leftovers
        os.makedirs(os.path.join(tmp, "rng"))
    dist.barrier()
    whole = _whole_model(model, ctx)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(_on_disk(model, model_sd, _flatten_optim(optim_sd)), checkpoint_id=tmp)
    with open(os.path.join(tmp, "rng", f"rank_{ctx.rank:05d}.pt"), "wb") as f:
        torch.save(_rng_state(ctx.device), f)
        f.flush()
        os.fsync(f.fileno())
    dist.barrier()                                      # every rank's files are on disk
    if ctx.is_main:
        files = {os.path.relpath(os.path.join(root, n), tmp): os.path.getsize(os.path.join(root, n))
                 for root, _, names in os.walk(tmp) for n in names}
        record = {"format": FORMAT, "step": step, "model": model_name(model), "mesh": dict(ctx.sizes),
                  "world_size": ctx.world_size, "torch": torch.__version__, "saved_at": time.time(),
                  "model_config": _model_config(model), **(meta or {}), **whole, "files": files}
        _write(os.path.join(tmp, META), json.dumps(record, indent=1).encode())
        _commit(tmp, final, ckpt_dir)
        _prune(ckpt_dir, final, keep_last)
    dist.barrier()                                      # nobody runs ahead of `latest`
    return final


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, ctx, seed: int) -> dict:
    """Load model, optimizer and RNG state from the checkpoint at path, on any mesh.

    Verifies the files and the parameter shapes first. Returns the checkpoint's tinymeg.json.
    """
    meta = verify(path)
    if meta.get("format", 1) != FORMAT:
        raise ValueError(f"checkpoint {path!r} has format {meta.get('format', 1)}, this tinymeg reads format "
                         f"{FORMAT} (the optimizer state is laid out differently): resume it with the "
                         f"tinymeg that saved it, or export its model (recipes/export.py) and start anew")
    check_compatible(meta, model, path, _whole_model(model, ctx)["param_shapes"])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    flat = _flatten_optim(optim_sd)
    on_disk = _on_disk(model, model_sd, flat)
    try:
        # DCP reads into the tensors of this dict in place: the views share the parameters' memory.
        dcp.load(on_disk, checkpoint_id=path)
    except Exception as e:  # noqa: BLE001 - DCP's errors can be long; say which checkpoint first
        raise RuntimeError(f"could not load checkpoint {path!r} (damaged?): {e}") from e
    # values that are not tensors (lr, betas...) DCP replaced in on_disk's dict
    flat.update({k: v for k, v in on_disk["optim"].items() if not torch.is_tensor(flat[k])})
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=_unflatten_optim(flat, optim_sd))

    if {**{d: 1 for d in ctx.sizes}, **meta["mesh"]} == ctx.sizes:  # the same mesh: the same ranks
        with open(os.path.join(path, "rng", f"rank_{ctx.rank:05d}.pt"), "rb") as f:
            _set_rng_state(torch.load(f, weights_only=False), ctx.device)  # our own pickle
    else:
        _reseed(seed, meta["step"], ctx.dp_rank)
    return meta


def build_model(meta: dict) -> CausalLM:
    """The unsharded model a checkpoint's (or an export's) metadata describes, freshly initialised:
    its ``"model"`` (tinymeg.models.MODELS: gpt2 before Llama existed) and ``"model_config"``."""
    model_class, config_class = MODELS[meta.get("model") or "gpt2"]
    return model_class(config_class(**meta["model_config"]))


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[CausalLM, dict]:
    """An unsharded model (GPT2Model, Llama) with the weights of a checkpoint (or --ckpt-dir's
    latest). One process, no process group needed. Returns (model, tinymeg.json).
    """
    path = resolve(path)
    meta = verify(path)
    model = build_model(meta).to(device)
    check_compatible(meta, model, path)
    with warnings.catch_warnings():  # "...assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(_on_disk(model, model.state_dict(), None), checkpoint_id=path,  # in place
                 no_dist=not dist.is_initialized())
    return model, meta


def _mib(meta: dict) -> float:
    return sum(meta["files"].values()) / 2**20


def tokenizer_from_meta(meta: dict):
    """The tokenizer the checkpoint's run trained with, or None (a token file without tiktoken)."""
    tok = meta.get("tokenizer")
    if tok is None:
        return None
    return CharTokenizer(tok["chars"]) if tok["kind"] == "char" else GPT2Tokenizer()


def tokenizer_meta(tokenizer) -> dict | None:
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "chars": tokenizer.chars}
    if isinstance(tokenizer, GPT2Tokenizer):
        return {"kind": "gpt2"}
    return None


# ---------------------------------------------------------------- the trainer's side

class Checkpointer:
    """What the training loop needs: ``restore()`` once before training (returns the step to
    start from) and ``after_step(n)`` after each optimizer step (saves when it is due).

    Which checkpoint restore() loads:

    - ``--resume``: ``--ckpt-dir``'s latest; none there is an error.
    - ``--auto-resume``: ``--ckpt-dir``'s latest if there is one, else start fresh (or from
      ``--resume-from``). This is what a torchrun job with ``--max-restarts`` uses: the first
      attempt starts fresh, every restart continues from the newest checkpoint.
    - ``--resume-from PATH``: that checkpoint (or that directory's latest).
    - none of these: start fresh. A --ckpt-dir that already holds checkpoints is then an
      error: this run's saves would overwrite them.
    """

    def __init__(self, cfg, ctx, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer=None):
        self.cfg, self.ctx, self.model, self.optimizer = cfg, ctx, model, optimizer
        self.tokenizer = tokenizer
        self.start_step = 0
        self.resumed_from: str | None = None   # the checkpoint restore() loaded
        self.last_saved: str | None = None     # the checkpoint after_step() saved last

    def restore(self) -> int:
        """Load the checkpoint the flags name, if any, and return its step (0: a fresh start).
        Every check that reads files runs on every rank before any collective, and all ranks
        agree on the outcome (checks.run_checked): a bad checkpoint is one error, not a hang."""
        cfg = self.cfg
        self.whole_shapes = _whole_model(self.model, self.ctx)["param_shapes"]  # pp: every stage's
        path = run_checked(self.ctx, self._checked_source)
        if path is None:
            return 0
        t0 = time.perf_counter()
        meta = load(path, self.model, self.optimizer, self.ctx, cfg.seed)
        set_weight_decay(self.optimizer, cfg.weight_decay)  # the restored groups carry the saving run's
        self.start_step, self.resumed_from = meta["step"], path
        if self.ctx.is_main:
            self._warn_changes(meta, path)
            tqdm.write(f"resumed from {path} at step {self.start_step} ({_mib(meta):.1f} MiB "
                       f"loaded in {time.perf_counter() - t0:.2f} s)")
        return self.start_step

    def _checked_source(self) -> str | None:
        """The checkpoint to load (None: start fresh), verified to be complete and to fit the model."""
        check_flags(self.cfg)
        if self.cfg.ckpt_dir:
            check_writable(self.cfg.ckpt_dir)
        path = self._source()
        if path is not None:
            check_compatible(verify(path), self.model, path, self.whole_shapes)
        return path

    def _source(self) -> str | None:
        cfg = self.cfg
        latest = latest_checkpoint(cfg.ckpt_dir) if cfg.ckpt_dir else None
        if cfg.resume:
            if latest is None:
                raise FileNotFoundError(
                    f"--resume: --ckpt-dir {cfg.ckpt_dir!r} holds no checkpoint (no `{LATEST}` file, no "
                    f"complete step_* directory). "
                    f"Start without --resume, or use --auto-resume to resume only when there is one")
            return latest
        if cfg.auto_resume and latest is not None:
            return latest
        if cfg.resume_from:
            path = resolve(cfg.resume_from)
            verify(path)  # a damaged checkpoint is the first thing to hear about
            if latest is not None and os.path.realpath(latest) != os.path.realpath(path):
                raise FileExistsError(
                    f"--ckpt-dir {cfg.ckpt_dir!r} already holds checkpoints (latest: {latest}); a run "
                    f"resumed from {path} would overwrite or interleave with them. Save to a new --ckpt-dir")
            return path
        if latest is not None:
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            hint = (f" (this is restart {restart} of a torchrun job: add --auto-resume so that "
                    f"restarts continue from the latest checkpoint)" if restart != "0" else "")
            raise FileExistsError(
                f"--ckpt-dir {cfg.ckpt_dir!r} already holds checkpoints ({os.path.basename(latest)}); "
                f"a fresh run would overwrite them. Pass --resume to continue from the latest, or "
                f"choose another --ckpt-dir{hint}")
        return None

    def _warn_changes(self, meta: dict, path: str) -> None:
        saved = meta.get("train_config", {})
        now = dataclasses.asdict(self.cfg)
        changed = [f"{f}: {saved[f]!r} -> {now[f]!r}" for f in _TRAJECTORY_FIELDS
                   if f in saved and saved[f] != now[f]]
        old_batch = saved.get("dp", 1) * saved.get("micro_batch", 0) * saved.get("grad_accum", 1)
        if saved and old_batch != self.cfg.global_batch:
            changed.append(f"global batch (dp x micro_batch x grad_accum): {old_batch} -> {self.cfg.global_batch}")
        if changed:
            print(f"warning: resuming {path} with other settings than the run that saved it "
                  f"({'; '.join(changed)}): the new values apply from step {meta['step'] + 1}, so training "
                  f"continues, but not as that run would have", file=sys.stderr, flush=True)

    def due(self, step_done: int) -> bool:
        cfg = self.cfg
        if not cfg.ckpt_dir or step_done <= self.start_step:
            return False
        return step_done == cfg.steps or (cfg.ckpt_every > 0 and step_done % cfg.ckpt_every == 0)

    def after_step(self, step_done: int) -> str | None:
        """Save if a checkpoint is due after `step_done` optimizer steps (every --ckpt-every
        steps and at the end of training)."""
        if not self.due(step_done):
            return None
        t0 = time.perf_counter()
        meta = {"train_config": dataclasses.asdict(self.cfg), "tokenizer": tokenizer_meta(self.tokenizer)}
        path = self.last_saved = save(self.cfg.ckpt_dir, step_done, self.model, self.optimizer, self.ctx,
                                      meta, self.cfg.keep_last)
        if self.ctx.is_main:
            with open(os.path.join(path, META)) as f:
                size = _mib(json.load(f))
            tqdm.write(f"saved {path} ({size:.1f} MiB) in {time.perf_counter() - t0:.2f} s")
        return path


def maybe_inject_fault(step: int, ctx) -> None:
    """For crash-recovery tests: with TINYMEG_FAULT_AT_STEP=K, rank 1 (rank 0 in a 1-rank world)
    dies at the start of step K, on a job's first attempt only (TORCHELASTIC_RESTART_COUNT 0)."""
    at = os.environ.get("TINYMEG_FAULT_AT_STEP")
    if (at is not None and step == int(at) and ctx.rank == min(1, ctx.world_size - 1)
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        print(f"TINYMEG_FAULT_AT_STEP={at}: rank {ctx.rank} exits now", file=sys.stderr, flush=True)
        os._exit(1)
