"""Pretrain a small Llama on the shipped Shakespeare: `torchrun --nproc_per_node=4 recipes/llama.py`

tinymeg's own Llama (rotary positions, RMSNorm, SwiGLU, grouped-query attention: 4 query heads
sharing 2 key/value heads, an untied head), 4 layers of width 128, trained with tensor parallelism
plus sequence and loss parallelism over tp=2 and data parallelism over the rest (4 processes:
dp=2), as torchtitan's Llama recipes train it. Every flag of recipes/train.py applies: `--cp 2`,
`--pp 2`, `--zero 3`, `--n-experts 4 --ep 2`, `--compile`, checkpoints, `--init-from DIR` (a
transformers Llama directory, to fine-tune it instead).
"""
from tinymeg.train.cli import main

if __name__ == "__main__":
    main(model="llama", n_kv_head=2, tp=2, sequence_parallel=True, loss_parallel=True, steps=2000,
         eval_every=250, warmup=100)
