"""Command line of the training recipes: flags map one to one onto TrainConfig fields."""
from __future__ import annotations

import argparse
import dataclasses
import os

from ..parallel.pipeline_parallel import check_pipeline
from .checkpoint import check_flags
from .trainer import TrainConfig, pipeline_args, train


def parse_args(argv=None, **defaults) -> TrainConfig:
    base = dataclasses.replace(TrainConfig(), **defaults)
    p = argparse.ArgumentParser(description="Train a GPT-2 with tinymeg (launch with torchrun).")
    add = p.add_argument
    add("--tp", type=int, default=base.tp, help="tensor-parallel size")
    add("--dp", type=int, default=base.dp, help="data-parallel size; pp*dp*tp must equal the world size")
    add("--pp", type=int, default=base.pp, help="pipeline-parallel size (stages, split by blocks)")
    add("--pp-schedule", default=base.pp_schedule, choices=["gpipe", "1f1b", "interleaved-1f1b"])
    add("--pp-microbatches", type=int, default=base.pp_microbatches, metavar="M",
        help="pipeline microbatches per micro-batch (must divide --micro-batch); 0: pp")
    add("--pp-stages-per-rank", type=int, default=base.pp_stages_per_rank, metavar="V",
        help="virtual stages per rank, > 1 only with interleaved-1f1b")
    add("--pp-split-points", default=base.pp_split_points, metavar="I,J,...",
        help="the blocks where stages 2.. begin (default: an even split)")
    add("--pp-uneven", action="store_true", default=base.pp_uneven,
        help="split the blocks as evenly as possible when pp x V does not divide --n-layer")
    add("--steps", type=int, default=base.steps)
    add("--micro-batch", type=int, default=base.micro_batch, help="sequences per rank per micro-step")
    add("--grad-accum", type=int, default=base.grad_accum, help="micro-steps per optimizer step")
    add("--seq-len", type=int, default=base.seq_len)
    add("--n-layer", type=int, default=base.n_layer)
    add("--n-head", type=int, default=base.n_head)
    add("--n-embd", type=int, default=base.n_embd)
    add("--dropout", type=float, default=base.dropout)
    add("--lr", type=float, default=base.lr)
    add("--min-lr", type=float, default=base.min_lr)
    add("--warmup", type=int, default=base.warmup)
    add("--weight-decay", type=float, default=base.weight_decay)
    add("--grad-clip", type=float, default=base.grad_clip, help="global-norm clip; 0 disables")
    add("--seed", type=int, default=base.seed)
    add("--eval-every", type=int, default=base.eval_every, help="0: evaluate at the end only")
    add("--eval-iters", type=int, default=base.eval_iters)
    add("--data", default=base.data, metavar="PATH", help=".txt or nanoGPT/llm.c uint16 .bin; default: shipped Shakespeare")
    add("--tokenizer", default=base.tokenizer, choices=["char", "gpt2"])
    add("--log-jsonl", default=base.log_jsonl, metavar="PATH", help="append one JSON line of metrics per step")
    add("--compile", action=argparse.BooleanOptionalAction, default=base.compile, help="torch.compile the model")
    add("--device", default=base.device, choices=["auto", "cpu", "cuda"])
    add("--sample-tokens", type=int, default=base.sample_tokens)
    add("--sequence-parallel", action=argparse.BooleanOptionalAction, default=base.sequence_parallel,
        help="with --tp > 1: shard activations on the sequence dim outside TP regions")
    add("--loss-parallel", action=argparse.BooleanOptionalAction, default=base.loss_parallel,
        help="with --tp > 1: compute the loss from vocab-sharded logits")
    add("--bucket-mb", type=float, default=base.bucket_mb, help="DP all-reduce bucket size")
    add("--timeout-s", type=float, default=base.timeout_s,
        help="collective timeout in seconds: a dead or stuck peer becomes an error after this long")
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
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.pp > 1 and args.tp * args.dp * args.pp != world:
        n = args.pp * args.dp * args.tp
        p.error(f"--pp {args.pp} x --dp {args.dp} x --tp {args.tp} = {n} ranks, but torchrun started "
                f"{world} process(es): pass --pp/--dp/--tp whose product is {world}, or launch with "
                f"`torchrun --nproc_per_node={n}`")
    if args.tp * args.dp * args.pp != world:
        p.error(f"--tp {args.tp} x --dp {args.dp} = {args.tp * args.dp} ranks, but torchrun started "
                f"{world} process(es): pass --tp/--dp whose product is {world}, or launch with "
                f"`torchrun --nproc_per_node={args.tp * args.dp}`")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                         if hasattr(args, f.name)})
    try:
        check_flags(cfg)
        if cfg.pp > 1:
            check_pipeline(cfg.n_layer, cfg.pp, micro_batch=cfg.micro_batch, **pipeline_args(cfg))
    except ValueError as e:
        p.error(str(e))
    return cfg


def main(argv=None, **defaults) -> dict:
    return train(parse_args(argv, **defaults))
