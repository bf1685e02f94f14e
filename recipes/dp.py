"""Data parallel only: `torchrun --nproc_per_node=2 recipes/dp.py` (flags as recipes/train.py;
dp is the number of processes)."""
from tinymeg.train.cli import main

if __name__ == "__main__":
    main(tp=1)
