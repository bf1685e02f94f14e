"""Command line of the training recipes: flags map one to one onto TrainConfig fields.

Every rank of a torchrun job parses the same flags and runs the same checks
(``checks.check_config``) before any process group exists, so a bad flag is found at once and
everywhere; only rank 0 prints it (one line and the fix), the others exit quietly with the
same status. ``main`` ends the process cleanly (``exit_process``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import torch.distributed as dist

from ..parallel.activation_checkpoint import AC_MODES
from ..suggest import did_you_mean
from .checkpoint import MODEL_SHAPE_FIELDS, resume_source, verify
from .checks import (DEFAULT_WARMUP, ConfigError, PeerError, check_config, default_warmup, rank_from_env,
                     world_size_from_env)
from .trainer import TrainConfig, mesh_sizes, train

USAGE_ERROR, SETUP_ERROR = 2, 1  # exit statuses: a bad flag (as argparse), a failed setup check
PRINTER_GRACE_S = 2.0           # how long a failing rank that prints nothing lets the printer print


class _Parser(argparse.ArgumentParser):
    """argparse whose messages (help, errors) come from rank 0 only, errors in one line."""

    def _print_message(self, message, file=None):
        if rank_from_env() == 0:
            super()._print_message(message, file)

    def error(self, message):
        unknown = message.removeprefix("unrecognized arguments: ")
        if unknown != message:  # a misspelt flag: name it and the flag it is closest to, first
            flags = [t.split("=")[0] for t in unknown.split() if t.startswith("-")]
            message = "; ".join(f"{f} is not a flag{did_you_mean(f, self._flags())}" for f in flags) or message
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (--help lists every flag)\n")

    def _flags(self) -> list[str]:
        return [o for o in self._option_string_actions if o.startswith("--")]


def build_parser(base: TrainConfig, recipe_defaults: dict) -> argparse.ArgumentParser:
    differs = {k: v for k, v in recipe_defaults.items() if getattr(TrainConfig(), k) != v}
    epilog = ("This recipe's defaults differ from recipes/train.py's: "
              + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in differs.items()) if differs else None)
    p = _Parser(prog=os.path.basename(sys.argv[0]) if sys.argv[0] else "train.py",
                description="Train a GPT-2 or a Llama with tinymeg. Launch with torchrun, e.g. "
                            "`torchrun --nproc_per_node=4 recipes/train.py --tp 2` (dp: the rest).",
                epilog=epilog, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--config", default=None, metavar="FILE.toml",
        help="read flags from a TOML file (keys as the flags without --, e.g. n_embd = 256); flags given on "
             "the command line override it")
    mesh = p.add_argument_group("mesh (their product is the number of processes torchrun starts)")
    mesh.add_argument("--tp", type=int, default=base.tp, help="tensor-parallel size")
    mesh.add_argument("--dp", type=int, default=base.dp,
                      help="data-parallel size; -1: the processes the other dims leave (world / (pp x tp x cp))")
    mesh.add_argument("--cp", type=int, default=base.cp,
                      help="context-parallel size: each sequence split over cp ranks (--seq-len a multiple of 2 x cp)")
    mesh.add_argument("--ep", type=int, default=base.ep,
                      help="expert-parallel size, carved out of dp (must divide it; needs --n-experts)")
    mesh.add_argument("--pp", type=int, default=base.pp,
                      help="pipeline-parallel size: the blocks split into pp stages (outermost mesh dim)")
    mesh.add_argument("--pp-schedule", default=base.pp_schedule, choices=["gpipe", "1f1b", "interleaved-1f1b"],
                      help="pipeline schedule (torch.distributed.pipelining)")
    mesh.add_argument("--pp-microbatches", type=int, default=base.pp_microbatches, metavar="M",
                      help="pipeline microbatches per micro-batch (must divide --micro-batch); 0: pp")
    mesh.add_argument("--pp-stages-per-rank", type=int, default=base.pp_stages_per_rank, metavar="V",
                      help="virtual stages per rank, > 1 only with interleaved-1f1b")
    mesh.add_argument("--pp-split-points", default=base.pp_split_points, metavar="I,J,...",
                      help="the blocks where stages 2.. begin (default: an even split)")
    mesh.add_argument("--pp-uneven", action="store_true", default=base.pp_uneven,
                      help="split the blocks as evenly as possible when pp x V does not divide --n-layer")
    add("--steps", type=int, default=base.steps, help="optimizer steps to train for")
    add("--micro-batch", type=int, default=base.micro_batch, help="sequences per dp rank per micro-step")
    add("--grad-accum", type=int, default=base.grad_accum,
        help="micro-steps per optimizer step; global batch = dp x micro-batch x grad-accum")
    add("--seq-len", type=int, default=base.seq_len, help="tokens per sequence (the model's context)")
    add("--model", default=base.model, choices=["gpt2", "llama"],
        help="gpt2: GPT-2 (learned positions, LayerNorm, GELU, tied head); llama: Llama (rotary, RMSNorm, "
             "SwiGLU, grouped-query attention)")
    add("--n-layer", type=int, default=base.n_layer, help="transformer blocks")
    add("--n-head", type=int, default=base.n_head, help="attention heads (divisible by --tp)")
    add("--n-embd", type=int, default=base.n_embd, help="model width (divisible by --n-head)")
    llama = p.add_argument_group("llama (with --model llama)")
    llama.add_argument("--n-kv-head", type=int, default=base.n_kv_head,
                       help="key/value heads (grouped-query attention; divides --n-head, divisible by --tp); 0: --n-head")
    llama.add_argument("--ffn-hidden", type=int, default=base.ffn_hidden,
                       help="the SwiGLU MLP's width; 0: Llama's rule (8/3 x --n-embd, rounded up to a multiple of 256)")
    llama.add_argument("--rope-theta", type=float, default=base.rope_theta, help="rotary positions' base")
    llama.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=base.tie_embeddings,
                       help="share the embedding and LM head weights (GPT-2 always does)")
    add("--dropout", type=float, default=base.dropout, help="dropout probability")
    add("--n-experts", type=int, default=base.n_experts, help="> 0: mixture-of-experts MLPs with this many experts")
    add("--top-k", type=int, default=base.top_k, help="experts per token (with --n-experts)")
    add("--lr", type=float, default=base.lr, help="peak learning rate, reached after --warmup steps")
    add("--min-lr", type=float, default=base.min_lr, help="learning rate at the end of the cosine decay")
    add("--warmup", type=int, default=argparse.SUPPRESS,
        help=f"linear warmup steps (default: {base.warmup or DEFAULT_WARMUP}, or a tenth of --steps if that is fewer)")
    add("--weight-decay", type=float, default=base.weight_decay, help="AdamW weight decay of matrices and embeddings")
    add("--grad-clip", type=float, default=base.grad_clip, help="clip gradients to this global norm; 0 disables")
    add("--seed", type=int, default=base.seed, help="seeds the model's init, the batches and dropout")
    add("--eval-every", type=int, default=base.eval_every, help="evaluate every N steps; 0: at the end only")
    add("--eval-iters", type=int, default=base.eval_iters,
        help="the validation set: eval-iters x global batch fixed sequences of the val split")
    add("--data", default=base.data, metavar="PATH",
        help=".txt (.txt.gz) text or a nanoGPT/llm.c uint16 .bin; None: the shipped Tiny Shakespeare")
    add("--tokenizer", default=base.tokenizer, choices=["char", "gpt2"],
        help="for .txt data: characters, or GPT-2 BPE (pip install tiktoken, see README)")
    add("--log-jsonl", default=base.log_jsonl, metavar="PATH",
        help="append one JSON line of metrics per step (recipes/plot.py draws its loss curves)")
    add("--tensorboard", default=base.tensorboard, metavar="DIR",
        help="also write the metrics to TensorBoard in DIR (pip install -e \".[tensorboard]\")")
    add("--compile", action=argparse.BooleanOptionalAction, default=base.compile,
        help="torch.compile the model (fullgraph) and the optimizer step; the first step then takes a while")
    add("--device", default=base.device, choices=["auto", "cpu", "cuda"],
        help="auto: cuda (nccl) when there is a GPU, else cpu (gloo)")
    add("--sample-tokens", type=int, default=base.sample_tokens, help="tokens of text to sample at the end; 0: none")
    add("--sequence-parallel", action=argparse.BooleanOptionalAction, default=base.sequence_parallel,
        help="with --tp > 1: shard activations on the sequence dim outside TP regions")
    add("--loss-parallel", action=argparse.BooleanOptionalAction, default=base.loss_parallel,
        help="with --tp > 1: compute the loss from vocab-sharded logits")
    add("--ac", default=base.ac, choices=list(AC_MODES),
        help="activation checkpointing: full keeps each block's input only and recomputes the block in "
             "backward; selective keeps matmul, attention and communication outputs and recomputes the rest")
    add("--bucket-mb", type=float, default=base.bucket_mb, help="DP gradient all-reduce bucket size (MiB)")
    add("--zero", type=int, default=base.zero, choices=[0, 1, 2, 3],
        help="ZeRO stage over dp: 0 replicated, 1 optimizer states sharded, 2 + gradients, 3 + parameters (FSDP2)")
    add("--dtype", default=base.dtype, choices=["fp32", "bf16"],
        help="bf16: bf16 parameters and compute, fp32 master weights, optimizer states and gradient reduction")
    add("--timeout-s", type=float, default=base.timeout_s,
        help="collective timeout in seconds: a dead or stuck peer becomes an error after this long")
    add("--progress", action=argparse.BooleanOptionalAction, default=base.progress,
        help="a progress bar on rank 0 (--no-progress for log files: plain lines only)")
    add("--peak-tflops", type=float, default=base.peak_tflops,
        help="peak TFLOP/s of one device, for MFU; 0: a table of GPUs, or measured on CPU")
    ck = p.add_argument_group("checkpoints (see README: Checkpoints and restarts)")
    ck.add_argument("--ckpt-dir", default=base.ckpt_dir, metavar="DIR", help="save checkpoints here")
    ck.add_argument("--ckpt-every", type=int, default=base.ckpt_every, metavar="N",
                    help="save every N steps (and always at the end); 0: at the end only")
    ck.add_argument("--keep-last", type=int, default=base.keep_last, metavar="K",
                    help="keep only the newest K checkpoints; 0: keep all")
    resume = ck.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", default=base.resume,
                        help="resume from the latest checkpoint in --ckpt-dir (an error if there is none)")
    resume.add_argument("--auto-resume", action="store_true", default=base.auto_resume,
                        help="resume from the latest checkpoint in --ckpt-dir if there is one, else start "
                             "fresh: use with torchrun --max-restarts for crash recovery")
    ck.add_argument("--resume-from", default=base.resume_from, metavar="PATH",
                    help="resume from this checkpoint (or this directory's latest) on any mesh")
    add("--init-from", default=base.init_from, metavar="DIR",
        help="fine-tune: start from the --model (GPT-2 or Llama) in this Hugging Face directory (config.json + "
             "model.safetensors, as transformers' save_pretrained or recipes/export.py --format hf write it); its "
             "shape replaces --n-layer/--n-head/--n-embd (and Llama's flags)")
    return p


def parse_args(argv=None, **defaults) -> TrainConfig:
    """Flags (after those of ``--config FILE.toml``) -> a checked TrainConfig, dp resolved for
    the world torchrun started. A run that resumes takes the model's shape from its checkpoint,
    except for the shape flags given. ``defaults`` are the recipe's (hybrid.py: tp=2, ...)."""
    base = dataclasses.replace(TrainConfig(), **defaults)
    p = build_parser(base, defaults)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = p.parse_args(argv).config
        argv = (config_file_argv(config, p) if config else []) + argv  # later flags win
        args = p.parse_args(argv)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
        if "warmup" not in values:  # the default warmup never outlasts a short run
            values["warmup"] = default_warmup(values["steps"], base.warmup)
        cfg = TrainConfig(**{**dataclasses.asdict(base), **values})
        cfg = shape_from_checkpoint(cfg, given=_given(argv, base, defaults))
        return check_config(cfg, world_size_from_env(), mesh_sizes(cfg))
    except ConfigError as e:
        p.error(str(e))


def config_file_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """A TOML file's keys as flags: ``n_embd = 256`` -> ``--n-embd 256``, ``compile = true`` ->
    ``--compile``, ``compile = false`` -> ``--no-compile`` (or nothing, for a flag without one)."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {path} cannot be read as TOML: {e}") from None
    flags = {o: a for o, a in parser._option_string_actions.items() if o.startswith("--")}
    argv = []
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        if flag not in flags or flag in ("--config", "--help") or flag.startswith("--no-"):
            keys = [o[2:].replace("-", "_") for o in flags if o not in ("--config", "--help")
                    and not o.startswith("--no-")]
            raise ConfigError(f"--config {path}: unknown key {key!r}{did_you_mean(key.replace('-', '_'), keys)} "
                              f"(keys are the flags without --, e.g. n_embd = 256)")
        takes_value = flags[flag].nargs != 0
        if isinstance(value, (dict, list)):
            raise ConfigError(f"--config {path}: {key} = {value!r}: each key takes one value, as its flag does")
        if isinstance(value, bool) and not takes_value:
            negated = "--no-" + flag[2:]
            argv += [flag] if value else [negated] if negated in flags else []
        elif takes_value and not isinstance(value, bool):
            argv += [flag, str(value)]
        else:
            raise ConfigError(f"--config {path}: {key} = {value!r}: "
                              + ("true or false" if not takes_value else f"a value for {flag}, not a boolean"))
    return argv


def _given(argv: list[str], base: TrainConfig, defaults: dict) -> set[str]:
    """The TrainConfig fields that argv's flags set (given, not defaulted)."""
    quiet = build_parser(base, defaults)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def shape_from_checkpoint(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """A resumed run's model (``--model``) and shape (``MODEL_SHAPE_FIELDS``) are its checkpoint's,
    as nanoGPT's init_from='resume' does, for each flag not ``given``. One given that differs
    from the checkpoint is left to the checkpoint check, which says so; so is a checkpoint that
    cannot be read (every rank checks it before loading, checkpoint.Checkpointer.restore)."""
    try:
        path = resume_source(cfg)
        meta = verify(path) if path else None
    except (OSError, ValueError, KeyError):
        return cfg
    if not meta or not meta.get("model_config"):
        return cfg
    kind = meta.get("model") or "gpt2"   # checkpoints from before Llama are GPT-2's
    if "model" not in given:
        cfg = dataclasses.replace(cfg, model=kind)
    if cfg.model != kind:                # another model: the checkpoint check names it
        return cfg
    shape = {field: meta["model_config"][m] for m, field in MODEL_SHAPE_FIELDS.items()
             if field not in given and m in meta["model_config"]}
    return dataclasses.replace(cfg, **shape)


def main(argv=None, **defaults) -> None:
    """The recipes' entry point: parse, train, and end the process (``exit_process``), with
    status 0 on success. An error that a user can fix is one line on stderr (from rank 0, or
    from the first rank that failed a setup check), and every rank exits with the same status:
    2 for a bad flag, 1 for a failed setup check (files, checkpoints). Anything else prints
    its traceback and exits 1. (In Python code, call ``train(parse_args(argv))`` instead.)"""
    try:
        cfg = parse_args(argv, **defaults)   # a bad flag: SystemExit(2), printed by rank 0 only
        train(cfg)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        exit_process(status, printed_elsewhere=status != 0 and rank_from_env() != 0)
    except (ConfigError, PeerError) as e:
        _exit_with(e, USAGE_ERROR if isinstance(e, ConfigError) else SETUP_ERROR)
    except Exception as e:  # noqa: BLE001
        if hasattr(e, "first_failed_rank"):  # a setup check's error: the user's to fix
            _exit_with(e, SETUP_ERROR)
        traceback.print_exc()
        exit_process(1)
    exit_process(0, barrier=True)


def _exit_with(error: Exception, status: int) -> None:
    printer = not isinstance(error, PeerError) and getattr(error, "first_failed_rank", 0) == rank_from_env()
    if printer:
        print(f"error: {error}", file=sys.stderr, flush=True)
    exit_process(status, printed_elsewhere=not printer)


def exit_process(status: int = 0, barrier: bool = False, printed_elsewhere: bool = False) -> None:
    """End the process now with ``status``, skipping the interpreter's teardown.

    Why: torch's gloo process groups run worker threads that may still be dropping the last
    reference to a finished collective's tensors when Python shuts down; that needs the GIL,
    which a finalizing interpreter no longer hands out, and the thread's unwinding calls
    std::terminate: "terminate called without an active exception", SIGABRT, status -6, in
    about one run in ten (more sub-groups, more often; destroy_process_group() does not
    prevent it). ``os._exit`` ends the process without that teardown, after flushing what
    Python buffers. ``barrier``: first wait for every rank (success path), so that no peer is
    still talking to this one. ``printed_elsewhere``: another rank prints this failure; wait a
    moment first, since torchrun stops every rank as soon as one exits with an error."""
    if barrier and dist.is_initialized():
        dist.barrier()
    if printed_elsewhere:
        time.sleep(PRINTER_GRACE_S)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass
    os._exit(status)
