"""A small mixture-of-experts GPT on the shipped Shakespeare: `torchrun --nproc_per_node=4 recipes/moe.py`

Every block's MLP is a mixture of 4 experts with top-2 routing; the 4 ranks are data-parallel
and, two by two, expert-parallel (dp=4, ep=2: each rank holds 2 of the 4 experts of every
layer and exchanges tokens with its ep partner). The JSONL log (--log-jsonl) gains aux_loss and
the largest and smallest share of tokens an expert received (expert_frac_max/min). Any other
world size works too (dp = the world, ep = 2 when it divides it); every flag of
recipes/train.py applies (--ep, --n-experts, --top-k, --tp ...).
"""
import os

from tinymeg.train.cli import main

if __name__ == "__main__":
    world = int(os.environ.get("WORLD_SIZE", 1))
    main(dp=world, ep=2 if world % 2 == 0 else 1, n_experts=4, top_k=2, steps=1000, eval_every=250, warmup=100)
