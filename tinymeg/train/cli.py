"""Command line of the training recipes: flags map one to one onto TrainConfig fields."""
from __future__ import annotations

import argparse
import dataclasses
import os

from .checkpoint import check_flags
from .trainer import TrainConfig, train


def parse_args(argv=None, **defaults) -> TrainConfig:
    base = dataclasses.replace(TrainConfig(), **defaults)
    p = argparse.ArgumentParser(description="Train a GPT-2 with tinymeg (launch with torchrun).")
    add = p.add_argument
    add("--tp", type=int, default=base.tp, help="tensor-parallel size")
    add("--dp", type=int, default=base.dp, help="data-parallel size; tp*dp*cp must equal the world size")
    add("--cp", type=int, default=base.cp,
        help="context-parallel size: each sequence split over cp ranks (--seq-len a multiple of 2*cp); "
             "tp*dp*cp must equal the world size")
    add("--ep", type=int, default=base.ep, help="expert-parallel size, carved out of dp (must divide it)")
    add("--steps", type=int, default=base.steps)
    add("--micro-batch", type=int, default=base.micro_batch, help="sequences per rank per micro-step")
    add("--grad-accum", type=int, default=base.grad_accum, help="micro-steps per optimizer step")
    add("--seq-len", type=int, default=base.seq_len)
    add("--n-layer", type=int, default=base.n_layer)
    add("--n-head", type=int, default=base.n_head)
    add("--n-embd", type=int, default=base.n_embd)
    add("--dropout", type=float, default=base.dropout)
    add("--n-experts", type=int, default=base.n_experts, help="> 0: mixture-of-experts MLPs with this many experts")
    add("--top-k", type=int, default=base.top_k, help="experts per token (with --n-experts)")
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
    add("--zero", type=int, default=base.zero, choices=[0, 1, 2, 3],
        help="ZeRO stage over dp: 0 replicated, 1 optimizer states sharded, 2 + gradients, 3 + parameters (FSDP2)")
    add("--dtype", default=base.dtype, choices=["fp32", "bf16"],
        help="bf16: bf16 parameters and compute, fp32 master weights, optimizer states and gradient reduction")
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
    add("--init-from", default=base.init_from, metavar="DIR",
        help="fine-tune: start from the GPT-2 in this Hugging Face directory (config.json + "
             "model.safetensors, e.g. from recipes/export.py --format hf); its shape replaces --n-layer/--n-head/--n-embd")
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", 1))
    ranks = args.tp * args.dp * args.cp
    cp = f" x --cp {args.cp}" if args.cp != 1 else ""
    if ranks != world:
        p.error(f"--tp {args.tp} x --dp {args.dp}{cp} = {ranks} ranks, but torchrun started "
                f"{world} process(es): pass --tp/--dp{'/--cp' if cp else ''} whose product is {world}, "
                f"or launch with `torchrun --nproc_per_node={ranks}`")
    if args.cp < 1 or args.seq_len % (2 * args.cp):
        p.error(f"--cp {args.cp} cuts each sequence into 2 x cp chunks: --seq-len {args.seq_len} must be a "
                f"multiple of {2 * args.cp}")
    if args.ep < 1 or args.dp % args.ep:
        p.error(f"--ep {args.ep} must divide --dp {args.dp}: expert parallelism is carved out of the "
                f"data-parallel ranks. Choose an --ep that divides --dp")
    if args.ep > 1 and not args.n_experts:
        p.error(f"--ep {args.ep} shards experts, but the model has none: add --n-experts")
    if args.n_experts and args.n_experts % args.ep:
        p.error(f"--n-experts {args.n_experts} is not divisible by --ep {args.ep}: each ep rank holds "
                f"n_experts/ep experts")
    if args.n_experts and args.init_from:
        p.error(f"--init-from loads GPT-2's dense weights, and --n-experts {args.n_experts} asks for a "
                f"mixture-of-experts model: drop one of them")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                         if hasattr(args, f.name)})
    try:
        check_flags(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def main(argv=None, **defaults) -> dict:
    return train(parse_args(argv, **defaults))
