"""The main job: 2D TP x DP. `torchrun --nproc_per_node=4 recipes/hybrid.py` (tp=2 x dp=2;
dp is the processes tp leaves). Its defaults train a small character-level GPT on the shipped
Shakespeare in about six minutes on a 2-core CPU (gloo), to a validation loss of about 1.84,
printing falling train/val loss and ending with a sample.
"""
from tinymeg.train.cli import main

if __name__ == "__main__":
    main(tp=2, steps=2000, eval_every=250, warmup=100)
