"""Train a Hugging Face transformers Llama with tinymeg's tensor x data parallelism, explicitly.

    torchrun --nproc_per_node=4 recipes/finetune_hf.py            # tp=2 x dp=2
    torchrun --nproc_per_node=4 recipes/finetune_hf.py --tp 4     # tp=4 x dp=1

No trainer behind it: a transformers LlamaForCausalLM (small, randomly initialised: no
network), tinymeg's shipped Llama plan, the shipped Shakespeare, AdamW and a loop. Every line
that touches parallelism is one of the three calls marked "tinymeg:". Needs transformers
(pip install -e '.[test]').
"""
import argparse
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import tinymeg as tm
from tinymeg.data import get_batch, load_corpus

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (dp = world size / tp) (default: 2)")
p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
p.add_argument("--micro-batch", type=int, default=8, help="sequences per dp rank per step (default: 8)")
p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
p.add_argument("--sequence-parallel", action="store_true", help="shard activations on the sequence too")
args = p.parse_args()

ctx = tm.ParallelContext(tp=args.tp)                                  # tinymeg: the (dp, tp) mesh
corpus = load_corpus(None, "char")                                    # Shakespeare, 65 characters
torch.manual_seed(0)                                                  # the same model on every rank
config = LlamaConfig(vocab_size=128,                                  # 65 chars, padded so tp divides it
                     hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2,    # grouped-query attention
                     max_position_embeddings=args.seq_len)
model = LlamaForCausalLM(config).to(ctx.device)

plan = tm.plans.get("llama", sequence_parallel=args.sequence_parallel)
model = tm.apply_hybrid_parallel(model, ctx, plan)                    # tinymeg: TP over tp, DP over dp
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, foreach=True)

if ctx.is_main:
    print(f"Llama, {sum(p.numel() for p in model.parameters()):,} parameters, {ctx.describe()}, "
          f"global batch {ctx.dp_size * args.micro_batch} x {args.seq_len} tokens")
start = time.perf_counter()
for step in range(args.steps):
    # tinymeg: each dp rank its rows of the step's global batch; tp ranks the same rows
    x, y = get_batch(corpus.train, seq_len=args.seq_len, micro_batch=args.micro_batch, seed=0, step=step,
                     dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
    logits = model(input_ids=x.to(ctx.device)).logits                 # (B, T, vocab) on every tp rank
    loss = F.cross_entropy(logits.flatten(0, 1), y.to(ctx.device).flatten())
    loss.backward()                                                   # DP averages gradients here
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 50 == 0 or step == args.steps - 1:
        mean = loss.detach().clone()                                  # the global batch's loss: dp mean
        torch.distributed.all_reduce(mean, group=ctx.dp_mesh.get_group())
        if ctx.is_main:
            print(f"step {step:4d}  loss {mean.item() / ctx.dp_size:.3f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)

torch.distributed.destroy_process_group()
