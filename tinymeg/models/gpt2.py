"""GPT-2, written as a plain single-device model (nanoGPT's shape and module names).

There is no parallel logic here: tinymeg.parallel shards this model from the outside.
The only concessions are that attention reads its head count from the width it is given,
so the same code runs on a rank that holds only some of the heads, and that the MLP may ask its
first Linear for the product without the bias (``linear_pre_bias``), so that the bias add fuses
into the GELU whatever module (plain or tensor-parallel) holds the weight (``linear_gelu``: where
the fused op wins; elsewhere the Linear adds its bias itself).

LayerNorm, bias + GELU and the loss run on tinymeg's ops (tinymeg.ops: the plain aten path or a
fused custom op, whichever the autotuner finds faster); parameter names and state_dict keys are
nn.LayerNorm's and nn.Linear's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import LayerNorm, bias_gelu, bias_gelu_path, linear_cross_entropy
from ..ops.gelu import DEFAULT_PATH as BIAS_GELU_DEFAULT_PATH
from ..ops.paths import forced_path


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # The embedding has padded_vocab_size rows: a multiple of this, so that every TP size
    # that divides it divides the vocabulary (65 chars -> 128 rows, 50257 -> 50304).
    # Padded rows are never looked up, and their logits are cut off before loss and sampling.
    vocab_multiple: int = 64

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.vocab_multiple < 1:
            raise ValueError(f"vocab_multiple must be >= 1, got {self.vocab_multiple}")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

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
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(x)
        B, T, _ = qkv.shape  # from qkv: under sequence parallelism x holds a slice of T
        width = qkv.size(-1) // 3                # all heads, or this rank's heads under TP
        q, k, v = (t.view(B, T, width // self.head_dim, self.head_dim).transpose(1, 2)
                   for t in qkv.split(width, dim=-1))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
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
    beats an add of its own). bias_in_matmul remembers per input what bias_gelu chose on the first
    call, when the product without the bias was made to ask it."""
    if torch.compiler.is_compiling():  # a graph takes bias_gelu's compile-time path, see ops/paths.py
        plain = (forced_path("bias_gelu") or BIAS_GELU_DEFAULT_PATH) == "plain"
    else:
        plain = bias_in_matmul.get((x.shape, x.dtype, x.device, torch.is_grad_enabled()))
    if plain:
        return F.gelu(linear(x), approximate="tanh")
    h, bias = linear_pre_bias(linear, x)
    if bias is not None and not torch.compiler.is_compiling():
        bias_in_matmul[x.shape, x.dtype, x.device, torch.is_grad_enabled()] = bias_gelu_path(h, bias) == "plain"
    return bias_gelu(h, bias)


def lm_head_loss(head: nn.Module, x: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of head(x)[..., :vocab_size] against targets (-1 ignored), by
    tinymeg.ops.linear_cross_entropy. A module that stands in for nn.Linear (tinymeg.nn's
    vocab-sharded head) provides forward_loss."""
    if hasattr(head, "forward_loss"):
        return head.forward_loss(x, targets, vocab_size, ignore_index=-1)
    return linear_cross_entropy(x, head.weight, targets, vocab_size, ignore_index=-1)


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
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one parameter, two uses
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters in the global model (tied weights counted once, padding rows included)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None).

        Targets equal to -1 are ignored in the loss. ``return_logits=False`` (with targets)
        returns ``(None, loss)`` computed by ``lm_head_loss``, which never holds the
        (B*T, vocab) logits at once (the training step's memory peak) and gives 0, not NaN,
        when every target is ignored.
        """
        if not return_logits and targets is None:
            raise ValueError("return_logits=False returns only the loss, so it needs targets")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if not return_logits:
            return None, lm_head_loss(self.lm_head, x, targets, self.config.vocab_size)
        logits = self.lm_head(x)
        if logits.size(-1) != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # padded rows are not tokens
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 context_multiple: int = 1) -> torch.Tensor:
        """Sample max_new_tokens after idx (B, T). Pass the same generator state on every
        rank of a TP group so that all ranks draw the same tokens. The context fed to the
        model is cropped to a multiple of context_multiple tokens (sequence parallelism needs
        a length divisible by the TP size); idx must hold at least that many."""
        if idx.size(1) < context_multiple:
            raise ValueError(f"the prompt needs at least {context_multiple} tokens, got {idx.size(1)}")
        for _ in range(max_new_tokens):
            n = min(idx.size(1), self.config.block_size)
            logits, _ = self(idx[:, -(n - n % context_multiple):])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx
