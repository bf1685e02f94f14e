"""Llama (2 and 3: rotary positions, RMSNorm, SwiGLU, grouped-query attention), written as a
plain single-device model with transformers' module names, so that its state_dict keys are
``LlamaForCausalLM``'s (``model.layers.0.self_attn.q_proj.weight``...).

There is no parallel logic here: tinymeg.parallel shards this model from the outside, as it
does GPT-2. The forward, generation and what Llama shares with GPT-2 (``CausalAttention``,
the KV cache, sampling, the loss) are in base.py. As in GPT-2, attention reads its head counts
from the widths it is given (a tensor-parallel rank holds n_head/tp query and n_kv_head/tp
key/value heads, the same ratio), and its token-mixing step is a ``CausalAttention``, which
context parallelism swaps for ring attention: rotary is applied to q and k before it, from the
positions the model is given (``pos``), and grouped k/v heads are repeated to the query heads
before it (the ring takes q, k, v of one shape).

RMSNorm, SwiGLU and the loss run on tinymeg's ops (the plain aten path or a fused custom op,
whichever the autotuner finds faster). ``tinymeg/models/hf_llama.py`` reads and writes
transformers' Llama directories.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops import RMSNorm, swiglu
from .base import CausalAttention, CausalLM, KVCache, LMConfig, init_weights
from .moe import MoE

ROPE_TYPES = ("default", "llama3")


@dataclass
class LlamaConfig(LMConfig):
    """Llama's shape (LMConfig: sizes, padded vocabulary, dropout, experts) and its own fields.

    ``n_kv_head``: key/value heads (grouped-query attention; 0: n_head, plain multi-head).
    ``ffn_hidden``: the SwiGLU MLP's width; 0: Llama's rule, 2/3 of 4 x n_embd, times
    ``ffn_dim_multiplier`` if set, rounded up to a multiple of ``multiple_of``.
    ``rope_scaling``: None, or Llama 3's frequency scaling as transformers writes it:
    ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}``. ``tie_embeddings``: the LM head shares the
    embedding's weight (Llama 3.2 1B/3B), else it is its own (Llama 2/3 7B+).
    """
    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    n_kv_head: int = 0
    ffn_hidden: int = 0
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (each key/value "
                             f"head serves n_head/n_kv_head query heads; 0: n_head)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = n_embd / n_head = {self.head_dim} must be even: rotary turns pairs of dims")
        if self.ffn_hidden < 0 or self.multiple_of < 1:
            raise ValueError(f"need ffn_hidden >= 0 and multiple_of >= 1, got {self.ffn_hidden} and {self.multiple_of}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {kind!r} is not one tinymeg's Llama computes: {list(ROPE_TYPES)}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_hidden_size(self) -> int:
        """The SwiGLU width: ffn_hidden, or Llama's rounding rule (Meta's reference code)."""
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.n_embd / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def tiny(cls, **kw) -> "LlamaConfig":
        """A few-thousand-parameter model for tests: 2 layers, 4 heads (2 key/value heads), width
        32, MLP width 64, char vocab."""
        return cls(**{**dict(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             ffn_hidden=64), **kw})


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Rotary's inverse frequencies (head_dim/2,): theta^(-2i/head_dim), with Llama 3's scaling
    when asked (transformers' "llama3" rope type): wavelengths longer than the original context /
    low_freq_factor are stretched by ``factor``, shorter than original / high_freq_factor kept,
    and those between interpolated smoothly."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) == "default":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos and sin (T, head_dim) of rotary's angles at the given positions. No parameters: its
    frequencies are a buffer, recomputed at construction, not saved."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling),
                             persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = pos.float()[:, None] * self.inv_freq[None, :]   # (T, head_dim/2), float32
        angles = torch.cat([angles, angles], dim=-1)              # transformers' layout: halves, not pairs
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by the angles of its positions: each dim i of the first
    half with dim i of the second (transformers' rotate_half convention, which its weights use)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-second, first], dim=-1) * sin.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, hd
        self.q_proj = nn.Linear(C, config.n_head * hd, bias=False)
        self.k_proj = nn.Linear(C, config.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(C, config.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.n_head * hd, C, bias=False)
        self.core_attention = CausalAttention(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None  # set by generate

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        B, T, width = q.shape  # from q: under sequence parallelism x holds a slice of T
        # heads from the widths: all of them, or this rank's under TP
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask = None
        if self.kv_cache is not None:  # generating: the grouped (smaller) keys and values are cached
            k, v, mask = self.kv_cache.update(k, v)
        groups = q.size(1) // k.size(1)
        if groups > 1:  # each key/value head serves `groups` query heads: repeated for the core (and the ring)
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = self.core_attention(q, k, v, mask)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, width)))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, H = config.n_embd, config.ffn_hidden_size
        self.gate_proj = nn.Linear(C, H, bias=False)
        self.up_proj = nn.Linear(C, H, bias=False)
        self.down_proj = nn.Linear(H, C, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x))))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, moe: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = (MoE(config, config.expert_hidden or config.ffn_hidden_size, "swiglu", bias=False) if moe
                    else LlamaMLP(config))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    EMBEDDINGS = ("model.embed_tokens",)
    BLOCKS, NORM, HEAD = "model.layers", "model.norm", "lm_head"

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.padded_vocab_size, config.n_embd),
            layers=nn.ModuleList(LlamaBlock(config, config.is_moe_block(i)) for i in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.rotary = Rotary(config)  # every pipeline stage needs it (not one of the parts above)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one parameter, two uses
        init_weights(self, config.n_layer, residual_projections=("o_proj.weight", "down_proj.weight"))

    @classmethod
    def from_pretrained(cls, path: str, *, dropout: float = 0.0, vocab_multiple: int = 64) -> "Llama":
        """The Llama in a transformers directory (config.json + model.safetensors, or several
        files and their index, as LlamaForCausalLM.save_pretrained writes them), as a Llama to
        train or shard like any other. See tinymeg.models.hf_llama."""
        from .hf_llama import from_pretrained
        return from_pretrained(path, dropout=dropout, vocab_multiple=vocab_multiple)

    def save_pretrained(self, path: str, max_shard_mb: float | None = None) -> None:
        """Write config.json + model.safetensors, which transformers.LlamaForCausalLM.from_pretrained
        loads with the same logits. On a sharded model every rank calls it; rank 0 writes.
        ``max_shard_mb``: split the weights into files of at most this size, with an index."""
        from .hf_llama import save_pretrained
        save_pretrained(self, path, max_shard_mb)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(idx)

    def block_args(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(pos)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM's estimate: 6 x the weights of the
        matmuls (an untied embedding is a lookup, not one) + attention's 12 x layers x T x width."""
        c = self.config
        lookup = 0 if c.tie_embeddings else c.padded_vocab_size * c.n_embd
        return 6 * (self.num_params() - lookup) + 12 * c.n_layer * seq_len * c.n_embd
