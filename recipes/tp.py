"""Tensor parallel only: `torchrun --nproc_per_node=2 recipes/tp.py` (flags as recipes/train.py)."""
from tinymeg.train.cli import main

if __name__ == "__main__":
    main(tp=2, dp=1)
