"""Train a GPT-2 (or `--model llama`) with any mesh: `torchrun --nproc_per_node=4 recipes/train.py --tp 2 --dp 2`."""
from tinymeg.train.cli import main

if __name__ == "__main__":
    main()
