"""Long context: a small Llama trained on sequences of 16,384 tokens on a CPU.
`torchrun --nproc_per_node=4 recipes/long_context.py`

Each sequence is split over the 4 ranks by context parallelism (cp=4: every rank holds 4,096 of
its tokens, from the embedding to the loss; ring attention passes keys and values around for the
rest, and rotary positions come from the whole sequence's), and every block keeps only its matmul,
attention and communication outputs for backward (--ac selective). The Llama: 2 layers of width
128, 4 query heads sharing 2 key/value heads, on the shipped Shakespeare, one sequence per step.
Other lengths and meshes: --seq-len (a multiple of 2 x cp), --cp, --ac, --tp (with
--sequence-parallel); every flag of recipes/train.py applies. README: Long context.
"""
from tinymeg.train.cli import main

if __name__ == "__main__":
    main(model="llama", cp=4, ac="selective", seq_len=16384, micro_batch=1, n_layer=2, n_head=4, n_kv_head=2,
         n_embd=128, steps=4, warmup=1, lr=3e-3, eval_every=0, eval_iters=1, sample_tokens=64)
