"""A model tinymeg did not write, sharded by a plan alone: a Llama-style decoder with Hugging
Face module names, RMSNorm, rotary embeddings, grouped-query attention and an untied lm_head.
Its code has no parallel logic; like Hugging Face's, attention infers its head count from the
projection width (view(..., -1, head_dim)), which is what lets a rank hold some of the heads.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from test_tensor_parallel import compare_training_step, full


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, dim, num_heads, num_key_value_heads):
        super().__init__()
        self.num_heads, self.num_key_value_heads = num_heads, num_key_value_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        q, k, v = (p(x) for p in (self.q_proj, self.k_proj, self.v_proj))
        B, T, _ = q.shape  # from the projections: under sequence parallelism x holds a slice of T
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        groups = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim, eps=1e-6)
        self.self_attn = LlamaAttention(dim, heads, kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = LlamaMLP(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, vocab, dim, layers, heads, kv_heads, hidden):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaDecoderLayer(dim, heads, kv_heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        head_dim = dim // heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, ids):
        freqs = torch.outer(torch.arange(ids.size(1)).float(), self.inv_freq)
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, vocab=64, dim=32, layers=2, heads=4, kv_heads=2, hidden=48):
        super().__init__()
        self.model = LlamaModel(vocab, dim, layers, heads, kv_heads, hidden)
        self.lm_head = nn.Linear(dim, vocab, bias=False)  # untied

    def forward(self, ids, targets=None):
        logits = self.lm_head(self.model(ids))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


LLAMA_PLAN = {
    "embed_tokens": tm.VocabParallel(),
    "self_attn.q_proj": tm.ColumnParallel(), "self_attn.k_proj": tm.ColumnParallel(),
    "self_attn.v_proj": tm.ColumnParallel(), "self_attn.o_proj": tm.RowParallel(),
    "mlp.gate_proj": tm.ColumnParallel(), "mlp.up_proj": tm.ColumnParallel(), "mlp.down_proj": tm.RowParallel(),
    "lm_head": tm.ColumnParallel(gather_output=True),
}


def _llama_body(tp, model_kwargs, seed, sequence_parallel):
    ctx = get_ctx(tp=tp)
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(**model_kwargs)
    torch.manual_seed(seed)
    plan = {**LLAMA_PLAN, "sequence_parallel": sequence_parallel}
    sharded = tm.apply_tensor_parallel(LlamaForCausalLM(**model_kwargs), ctx, plan)
    assert type(sharded.model.layers[0].input_layernorm).__name__ == "RMSNorm"
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model_kwargs["vocab"], (2, 8), generator=g)
    targets = torch.randint(0, model_kwargs["vocab"], (2, 8), generator=g)
    compare_training_step(ref, sharded, ids, targets)


@given(tp=st.sampled_from([2, 4]), kv_per_rank=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([4, 8]), layers=st.integers(1, 2), seed=st.integers(0, 2**16), sp=st.booleans())
def test_llama_with_gqa_sharded_by_plan_equals_unsharded(tp, kv_per_rank, groups, head_dim, layers, seed, sp):
    kv_heads = tp * kv_per_rank
    heads = kv_heads * groups
    kwargs = dict(vocab=16 * tp, dim=heads * head_dim, layers=layers, heads=heads, kv_heads=kv_heads, hidden=12 * tp)
    world(tp).run(_llama_body, tp, kwargs, seed, sp)


def _gqa_heads_error_body():
    ctx = get_ctx(tp=4)
    model = LlamaForCausalLM(vocab=64, dim=32, heads=4, kv_heads=2)
    try:
        tm.apply_tensor_parallel(model, ctx, LLAMA_PLAN)
    except ValueError as e:
        assert "num_key_value_heads=2, not divisible by tp=4" in str(e), e
    else:
        raise AssertionError("2 kv heads cannot be split over 4 ranks")


def test_kv_heads_not_divisible_by_tp_is_a_clear_error():
    world(4).run(_gqa_heads_error_body)


class Conv1D(nn.Module):
    """GPT-2 ports (Hugging Face's) store a Linear's weight transposed, as (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        # scaled as a trained layer's (1/sqrt(fan_in)): unit weights made activations large enough
        # that reassociating their sums across tp=4 ranks passed the 1e-5 tolerance (seed 116)
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class Conv1DMLP(nn.Module):
    """An MLP whose fused first projection stacks two halves (a gated unit's gate|up)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.c_fc = Conv1D(2 * hidden, dim)
        self.c_proj = Conv1D(dim, hidden)

    def forward(self, x, targets=None):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        y = self.c_proj(F.silu(gate) * up)
        return y, (y - targets).pow(2).mean()


def _conv1d_body(tp, seed):
    ctx = get_ctx(tp=tp)
    torch.manual_seed(seed)
    ref = Conv1DMLP(8, 4 * tp)
    sharded = tm.apply_tensor_parallel(copy.deepcopy(ref), ctx, {"c_fc": tm.ColumnParallel(output_chunks=2),
                                                                  "c_proj": tm.RowParallel()})
    # the transposed weights keep their names, shapes and layout; c_fc is sharded within gate and up
    assert sharded.c_fc.weight.shape == ref.c_fc.weight.shape and sharded.c_fc.transposed
    assert torch.equal(full(sharded.c_fc.weight), ref.c_fc.weight)
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    compare_training_step(ref, sharded, x, y)


@given(tp=st.sampled_from([2, 4]), seed=st.integers(0, 2**16))
@example(tp=4, seed=116)
def test_transposed_conv1d_is_sharded_like_linear(tp, seed):
    world(tp).run(_conv1d_body, tp, seed)
