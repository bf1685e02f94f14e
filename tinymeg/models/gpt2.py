"""GPT-2, written as a plain single-device model (nanoGPT's shape and module names).

There is no parallel logic here: tinymeg.parallel shards this model from the outside.
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

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import LayerNorm, bias_gelu, bias_gelu_path, linear_cross_entropy
from ..ops.gelu import DEFAULT_PATH as BIAS_GELU_DEFAULT_PATH
from ..ops.paths import forced_path, unobserved
from .moe import MoE, moe_aux_loss


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
    # Mixture of experts (tinymeg/models/moe.py): n_experts > 0 makes every moe_every-th block's
    # MLP (blocks moe_every-1, 2*moe_every-1, ...) a MoE of n_experts expert MLPs of width
    # expert_hidden (0: 4 * n_embd, the dense MLP's), each token routed to top_k of them.
    # 0 experts is the dense GPT-2, bit for bit.
    n_experts: int = 0
    top_k: int = 2
    moe_every: int = 1
    expert_hidden: int = 0
    aux_loss_weight: float = 0.01   # load-balancing loss (Switch/GShard form)
    z_loss_weight: float = 0.001    # router z-loss

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.vocab_multiple < 1:
            raise ValueError(f"vocab_multiple must be >= 1, got {self.vocab_multiple}")
        if self.n_experts < 0 or self.moe_every < 1 or self.expert_hidden < 0:
            raise ValueError(f"need n_experts >= 0, moe_every >= 1 and expert_hidden >= 0, got "
                             f"{self.n_experts}, {self.moe_every} and {self.expert_hidden}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}: "
                             f"each token is routed to top_k distinct experts")

    def is_moe_block(self, i: int) -> bool:
        """Whether block i's MLP is a mixture of experts."""
        return self.n_experts > 0 and i % self.moe_every == self.moe_every - 1

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


class CausalAttention(nn.Module):
    """softmax(q k^T / sqrt(head_dim), causal) v over (B, heads, T, head_dim): the one step of
    attention that mixes tokens. A module of its own, with no parameters, so that context
    parallelism can swap in ring attention from the outside, as tensor parallelism swaps Linears."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)  # on the attention probabilities

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: (T, S) bool, True where a query may attend (generation with a KV cache,
        in eval: no dropout); None: causal over q's and k's own positions."""
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return causal_attention(q, k, v, self.dropout if self.training else None)


class KVCache:
    """The keys and values of one attention layer during generation (``GPT2Model.generate``).

    Positions ``[0, start)`` hold the tokens already seen; a forward writes its T new tokens at
    ``[start, start + T)`` and attends over ``[0, start + T)``, causally. Under tensor
    parallelism each rank caches only its own heads (attention sees only those)."""

    def __init__(self, capacity: int):
        self.capacity, self.start = capacity, 0
        self.k = self.v = None

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, heads, T, head_dim) at [start, start + T); return the keys and values
        of [0, start + T) and the attention mask (None: plain causal, when nothing is cached)."""
        T, end = k.size(2), self.start + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot hold {end}")
        if self.k is None:
            self.k = k.new_empty(*k.shape[:2], self.capacity, k.size(3))
            self.v = v.new_empty(*v.shape[:2], self.capacity, v.size(3))
        self.k[:, :, self.start:end], self.v[:, :, self.start:end] = k, v
        # Query i (position start + i) sees keys 0 .. start + i.
        mask = None if self.start == 0 else torch.ones(T, end, dtype=torch.bool, device=k.device).tril(self.start)
        return self.k[:, :, :end], self.v[:, :, :end], mask


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
        self.kv_cache: KVCache | None = None  # set by GPT2Model.generate

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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: nn.Module | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v, with dropout on the probabilities (while training).
    nn.Dropout runs inside SDPA's fused kernel. A module that stands in for it (tinymeg.nn's
    ParallelDropout, which gives each tensor-parallel rank's heads their own mask) needs the
    probabilities, so they are computed explicitly for it."""
    if dropout is None or dropout.p == 0 or type(dropout) is nn.Dropout:
        p = 0.0 if dropout is None else dropout.p
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
    T, S = q.size(-2), k.size(-2)
    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    return dropout(scores.masked_fill(future, float("-inf")).softmax(-1)) @ v


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


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """A clear error for sampling settings sample_token cannot draw with. Every generate checks
    them before its first forward, so that under pipeline parallelism all stages refuse alike
    (instead of the last stage failing mid-way while the others wait for its token)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0 (logits are divided by it), got "
                         f"{temperature!r}: for greedy decoding pass top_k=1")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None (the whole vocabulary) or an integer >= 1, got {top_k!r}")


def sample_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """The next token (B, 1) from the last position's logits (B, vocab): scaled by temperature,
    cut to the top_k, drawn from the softmax with generator. One home for generation's sampling
    step, so that every parallel layout draws exactly the unsharded model's tokens (settings
    checked by check_sampling)."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def token_share(mean: torch.Tensor, count: torch.Tensor, loss_tokens: torch.Tensor) -> torch.Tensor:
    """One forward's loss as its share of a step's token mean.

    ``mean`` is the cross-entropy averaged over this forward's ``count`` counted targets (not -1);
    ``loss_tokens`` = (total, forwards): the counted targets of the step's whole batch and the
    number of forwards it is split into (data-parallel ranks x accumulation micro-steps x pipeline
    microbatches), set for a step by ``tinymeg.parallel.token_mean``. The share is
    ``mean * count * forwards / total``, so the mean of the forwards' shares is the mean over every
    counted target of the batch, however unevenly ignored targets fall between the forwards.
    Where nothing is ignored each forward counts total / forwards targets and the factor is
    exactly 1. (0, 0), outside such a step: the forward's own mean."""
    total, forwards = loss_tokens.unbind()
    return mean * torch.where(forwards > 0, count * forwards / total.clamp(min=1), 1.0)


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
    def __init__(self, config: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MoE(config) if moe else MLP(config)

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
            h=nn.ModuleList(Block(config, config.is_moe_block(i)) for i in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one parameter, two uses
        # token_share's (total, forwards) for the current step; a buffer, so that a compiled model
        # reads new values without recompiling
        self.register_buffer("loss_tokens", torch.zeros(2, dtype=torch.long), persistent=False)
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

    @classmethod
    def from_pretrained(cls, path: str, *, dropout: float | None = None, vocab_multiple: int = 64) -> "GPT2Model":
        """The GPT-2 in a Hugging Face directory (config.json + model.safetensors, as transformers'
        save_pretrained writes them; any GPT-2 size), as a GPT2Model to train or shard like any
        other. ``dropout`` None keeps the config's. See tinymeg.models.hf_gpt2."""
        from .hf_gpt2 import from_pretrained
        return from_pretrained(path, dropout=dropout, vocab_multiple=vocab_multiple)

    def save_pretrained(self, path: str) -> None:
        """Write config.json + model.safetensors, which transformers.GPT2LMHeadModel.from_pretrained
        loads with the same logits. On a sharded model every rank calls it; rank 0 writes."""
        from .hf_gpt2 import save_pretrained
        save_pretrained(self, path)

    def num_params(self) -> int:
        """Parameters in the global model (tied weights counted once, padding rows included)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True,
                pos: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None).

        Targets equal to -1 are ignored in the loss. Inside ``tinymeg.parallel.token_mean`` the
        loss is this forward's share of the step's token mean (``token_share``). ``return_logits=False`` (with targets)
        returns ``(None, loss)`` computed by ``lm_head_loss``, which never holds the
        (B*T, vocab) logits at once (the training step's memory peak) and gives 0, not NaN,
        when every target is ignored. ``pos`` (T,): the tokens' positions, 0..T-1 by default
        (generate passes later ones when earlier tokens are in the KV cache).
        """
        if not return_logits and targets is None:
            raise ValueError("return_logits=False returns only the loss, so it needs targets")
        B, T = idx.shape
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if not return_logits:
            return None, self._loss(lm_head_loss(self.lm_head, x, targets, self.config.vocab_size), targets)
        logits = self.lm_head(x)
        if logits.size(-1) != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # padded rows are not tokens
        loss = None
        if targets is not None:
            loss = self._loss(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1), targets)
        return logits, loss

    def _loss(self, ce: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss forward returns: the cross-entropy's share of the step's token mean, plus in
        training the MoE layers' balancing and z losses (whole: they are statistics of the batch,
        not of its tokens one by one)."""
        loss = self.loss_share(ce, targets)
        return loss + moe_aux_loss(self) if self.training and self.config.n_experts else loss

    def loss_share(self, ce: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """token_share of ce, the mean cross-entropy of targets. Context parallelism overrides it
        (its ranks' chunks make one forward)."""
        return token_share(ce, (targets != -1).sum(), self.loss_tokens)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 context_multiple: int = 1, kv_cache: bool = True) -> torch.Tensor:
        """Sample max_new_tokens after idx (B, T), each conditioned on the last block_size
        tokens (the context the model was trained on). Pass the same generator state on every
        rank of a TP group so that all ranks draw the same tokens.

        ``kv_cache``: keep each layer's keys and values (under TP, each rank its own heads) and
        feed only the new token; the result is the no-cache one (up to float reassociation).
        Once the context slides past block_size every position changes, so each later step
        recomputes the window. ``context_multiple``: the model needs sequence lengths that are
        multiples of it (sequence parallelism: the TP size); what is fed is right-padded with
        token 0, which changes nothing: causal attention never lets a token see those to its
        right, and the logits are read at the last real token.
        """
        if idx.size(1) < 1:
            raise ValueError("generate needs a prompt of at least one token")
        check_sampling(max_new_tokens, temperature, top_k)
        block = self.config.block_size
        attention = [m for m in self.modules() if isinstance(m, CausalSelfAttention)]
        caches = [KVCache(block + context_multiple) for _ in attention] if kv_cache else []
        for module, cache in zip(attention, caches):
            module.kv_cache = cache
        try:
            cached = 0  # idx[:, :cached] are in the caches (while the window has not slid)
            for _ in range(max_new_tokens):
                if not caches or idx.size(1) > block:  # no cache, or every position moved
                    cached = 0
                chunk = idx[:, cached:][:, -block:]
                logits = self._last_logits(chunk, cached, caches, context_multiple)
                cached += chunk.size(1)
                idx = torch.cat([idx, sample_token(logits, temperature, top_k, generator)], dim=1)
        finally:
            for module in attention:
                module.kv_cache = None
        return idx

    def _last_logits(self, chunk: torch.Tensor, start: int, caches: list[KVCache], multiple: int) -> torch.Tensor:
        """Logits (B, vocab_size) after the last token of chunk, whose first token is at
        position start (the caches hold positions 0..start-1), right-padded to a multiple."""
        T = chunk.size(1)
        pad = -T % multiple
        pos = torch.arange(start, start + T + pad, device=chunk.device).clamp(max=self.config.block_size - 1)
        for cache in caches:
            cache.start = start
        logits, _ = self(F.pad(chunk, (0, pad)), pos=pos)  # padding positions are never attended to
        return logits[:, T - 1]
