"""GPT-2, written as a plain single-device model (nanoGPT's shape and module names).

There is no parallel logic here: tinymeg.parallel shards this model from the outside. The
forward, generation and the pieces GPT-2 shares with Llama (``CausalAttention``, the KV cache,
sampling, the loss) are in base.py; this file says where GPT-2's parts are and what they compute.
The only concessions are that attention reads its head count from the width it is given,
so the same code runs on a rank that holds only some of the heads, that the MLP may ask its
first Linear for the product without the bias (``linear_pre_bias``), so that the bias add fuses
into the GELU whatever module (plain or tensor-parallel) holds the weight (``linear_gelu``: where
the fused op wins; elsewhere the Linear adds its bias itself), and that the step of attention
that mixes tokens is a module of its own (``CausalAttention``), which context parallelism swaps
for ring attention.

LayerNorm, bias + GELU and the loss run on tinymeg's ops (tinymeg.ops: the plain aten path or a
fused custom op, whichever the autotuner finds faster); parameter names and state_dict keys are
nn.LayerNorm's and nn.Linear's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import LayerNorm, bias_gelu, bias_gelu_path
from ..ops.gelu import DEFAULT_PATH as BIAS_GELU_DEFAULT_PATH
from ..ops.paths import forced_path, unobserved
from .base import CausalAttention, CausalLM, KVCache, LMConfig, init_weights
from .moe import MoE


@dataclass
class GPTConfig(LMConfig):
    """GPT-2's shape (LMConfig: sizes, padded vocabulary, dropout, experts) and its biases."""
    bias: bool = True

    @classmethod
    def gpt2_small(cls, **kw) -> "GPTConfig":
        """The 124M-parameter GPT-2 shape."""
        return cls(**{**dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768), **kw})

    @classmethod
    def tiny(cls, **kw) -> "GPTConfig":
        """A few-thousand-parameter model for tests: 2 layers, 4 heads, width 32, char vocab."""
        return cls(**{**dict(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=32), **kw})


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        # q|k|v stacked on the output dim. output_chunks tells any sharding of this weight
        # that it holds 3 projections, which must be split by heads, not by plain rows.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_attn.output_chunks = 3
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.core_attention = CausalAttention(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None  # set by generate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(x)
        B, T, _ = qkv.shape  # from qkv: under sequence parallelism x holds a slice of T
        width = qkv.size(-1) // 3                # all heads, or this rank's heads under TP
        q, k, v = (t.view(B, T, width // self.head_dim, self.head_dim).transpose(1, 2)
                   for t in qkv.split(width, dim=-1))
        mask = None
        if self.kv_cache is not None:  # generating: attend to the tokens seen before too
            k, v, mask = self.kv_cache.update(k, v)
        y = self.core_attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, width)
        return self.resid_dropout(self.c_proj(y))


def linear_pre_bias(linear: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x W^T, b) for a Linear, leaving the bias add to the caller's next (fused) op. A module
    that stands in for nn.Linear (tinymeg.nn's parallel ones) provides forward_pre_bias; one
    whose forward is wrapped by hooks (torch's parallelize_module) is called whole."""
    if hasattr(linear, "forward_pre_bias"):
        return linear.forward_pre_bias(x)
    if linear._forward_hooks or linear._forward_pre_hooks:
        return linear(x), None
    return F.linear(x, linear.weight), linear.bias


def linear_gelu(linear: nn.Module, x: torch.Tensor, bias_in_matmul: dict) -> torch.Tensor:
    """gelu(linear(x), tanh), the bias added where it costs least: in the GELU pass of
    tinymeg::bias_gelu where the tuner picked that op for these shapes, else in the matmul (addmm
    beats an add of its own). bias_in_matmul remembers per input what bias_gelu chose."""
    if torch.compiler.is_compiling():  # a graph takes bias_gelu's compile-time path, see ops/paths.py
        plain = (forced_path("bias_gelu") or BIAS_GELU_DEFAULT_PATH) == "plain"
    else:
        key = (x.shape, x.dtype, x.device, torch.is_grad_enabled())
        plain = bias_in_matmul.get(key)
        if plain is None:
            plain = bias_in_matmul[key] = _bias_in_matmul(linear, x)
    if plain:
        return F.gelu(linear(x), approximate="tanh")
    return bias_gelu(*linear_pre_bias(linear, x))


def _bias_in_matmul(linear: nn.Module, x: torch.Tensor) -> bool:
    """Does bias_gelu take its plain path on linear's product with x? Asked once per input, on a
    product made for the question alone (no gradient, unobserved), so that the first call computes
    what every later one does: activation checkpointing runs it again in backward, and must get
    the same ops."""
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in linear.parameters()))
    with unobserved(), torch.no_grad():
        h, bias = linear_pre_bias(linear, x)
    return bias is None or bias_gelu_path(h.requires_grad_(grad), bias) == "plain"


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.bias_in_matmul: dict = {}  # linear_gelu's memory: input -> bias added by the matmul?

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(linear_gelu(self.c_fc, x, self.bias_in_matmul)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MoE(config, config.expert_hidden or 4 * config.n_embd, "gelu", config.bias) if moe else MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(CausalLM):
    EMBEDDINGS = ("transformer.wte", "transformer.wpe", "transformer.drop")
    BLOCKS, NORM, HEAD = "transformer.h", "transformer.ln_f", "lm_head"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, config.is_moe_block(i)) for i in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one parameter, two uses
        init_weights(self, config.n_layer, residual_projections=("c_proj.weight",))

    @classmethod
    def from_pretrained(cls, path: str, *, dropout: float | None = None, vocab_multiple: int = 64) -> "GPT2Model":
        """The GPT-2 in a Hugging Face directory (config.json + model.safetensors, as transformers'
        save_pretrained writes them; any GPT-2 size), as a GPT2Model to train or shard like any
        other. ``dropout`` None keeps the config's. See tinymeg.models.hf_gpt2."""
        from .hf_gpt2 import from_pretrained
        return from_pretrained(path, dropout=dropout, vocab_multiple=vocab_multiple)

    def save_pretrained(self, path: str, max_shard_mb: float | None = None) -> None:
        """Write config.json + model.safetensors, which transformers.GPT2LMHeadModel.from_pretrained
        loads with the same logits. On a sharded model every rank calls it; rank 0 writes.
        ``max_shard_mb``: split the weights into files of at most this size, with an index."""
        from .hf_gpt2 import save_pretrained
        save_pretrained(self, path, max_shard_mb)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM's estimate: 6 x the weights of the
        matmuls (every parameter but the position table) + attention's 12 x layers x T x width."""
        c = self.config
        return 6 * (self.num_params() - c.block_size * c.n_embd) + 12 * c.n_layer * seq_len * c.n_embd
