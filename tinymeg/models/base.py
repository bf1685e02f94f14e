"""What tinymeg's language models (GPT-2, Llama) share, and what the parallel dims ask of them.

A model is: token ids -> ``embed`` -> blocks -> final norm -> LM head (+ the loss). Each model
class says where those parts are and computes the two steps around its blocks; everything
else lives here once: the forward (logits and/or the fused loss, the MoE aux losses), generation
with a KV cache, the sampling step, the parameter count.

**The protocol** (``CausalLM``): what pipeline and context parallelism use, never the class.

- ``EMBEDDINGS``: names of the modules that turn (token ids, positions) into the first hidden
  states (the first pipeline stage keeps them); ``BLOCKS``: the name of the ModuleList of
  blocks; ``NORM``, ``HEAD``: the final norm and the LM head (the last stage keeps them). Any
  other module (Llama's rotary frequencies) is needed by every stage.
- ``embed(idx, pos)``: (B, T) ids at positions ``pos`` (T,) -> hidden states (B, T, C);
  ``block_args(pos)``: what each block takes after its input (``call_block``): a tuple,
  ``block(x, *args)`` (GPT-2: nothing; Llama: the rotary cos and sin of the positions), or a
  dict, ``block(x, **args)`` (a transformers decoder layer's keywords, tinymeg/models/hf_causal_lm.py).
- ``forward(idx, targets, return_logits, pos)``: ``pos`` are the tokens' positions in their
  sequence, 0..T-1 by default; context parallelism passes its layout's, generation later ones.
- ``config``: ``block_size``, ``vocab_size``, ``padded_vocab_size``, ``n_experts`` (``LMConfig``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import linear_cross_entropy
from .moe import moe_aux_loss


@dataclass
class LMConfig:
    """The fields every tinymeg model config has: sizes, the padded vocabulary, dropout, and the
    mixture of experts."""
    block_size: int = 1024         # the longest sequence (context) the model is trained on
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    # The embedding (and an untied head) has padded_vocab_size rows: a multiple of this, so that
    # every TP size that divides it divides the vocabulary (65 chars -> 128 rows, 50257 -> 50304).
    # Padded rows are never looked up, and their logits are cut off before loss and sampling.
    vocab_multiple: int = 64
    # Mixture of experts (tinymeg/models/moe.py): n_experts > 0 makes every moe_every-th block's
    # MLP (blocks moe_every-1, 2*moe_every-1, ...) a MoE of n_experts expert MLPs of width
    # expert_hidden (0: the dense MLP's), each token routed to top_k of them.
    # 0 experts is the dense model, bit for bit.
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


class KVCache:
    """The keys and values of one attention layer during generation (``CausalLM.generate``).

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


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """A clear error for sampling settings sample_token cannot draw with. Every generate checks
    them before its first forward, so that under pipeline parallelism all stages refuse alike
    (instead of the last stage failing mid-way while the others wait for its token)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0 (logits are divided by it), got "
                         f"{temperature!r}: for greedy decoding pass top_k=1")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
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


def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, T, vocab) logits against targets (-1 ignored), in float32
    whatever the logits' dtype (bf16 would round the loss to 3 digits)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


def call_block(block: nn.Module, x: torch.Tensor, args: tuple | dict) -> torch.Tensor:
    """One block on x with what ``block_args`` gave: positional arguments (a tuple) or keywords (a dict)."""
    return block(x, **args) if isinstance(args, dict) else block(x, *args)


def init_weights(model: nn.Module, n_layer: int, residual_projections: tuple[str, ...]) -> None:
    """GPT-2's init, which tinymeg's Llama uses too: every Linear and Embedding N(0, 0.02), biases
    zero, and the residual projections (names ending with one of ``residual_projections``)
    N(0, 0.02 / sqrt(2 n_layer)), so that the residual stream's variance does not grow with depth."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith(residual_projections):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


class CausalLM(nn.Module):
    """A decoder-only language model: the forward, generation and parameter count shared by
    tinymeg's models, on the parts each one names (see the module docstring)."""
    EMBEDDINGS: tuple[str, ...]
    BLOCKS: str
    NORM: str
    HEAD: str = "lm_head"
    config: LMConfig

    def __init__(self):
        super().__init__()
        # token_share's (total, forwards) for the current step; a buffer, so that a compiled model
        # reads new values without recompiling
        self.register_buffer("loss_tokens", torch.zeros(2, dtype=torch.long), persistent=False)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_args(self, pos: torch.Tensor) -> tuple | dict:
        return ()

    def num_params(self) -> int:
        """Parameters in the global model (tied weights counted once, padding rows included)."""
        return sum(p.numel() for p in self.parameters())

    def export_state_dict(self) -> dict:
        """The state dict save_pretrained writes: state_dict() (data parallelism's mixin gives the
        fp32 masters under mixed precision instead of the bf16 working copies)."""
        return self.state_dict()

    # save_pretrained's hf_io.PretrainedPart: None, this rank holds the whole model (pipeline
    # parallelism sets it to its stage's part)
    pretrained_part = None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True,
                pos: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None).

        Targets equal to -1 are ignored in the loss. Inside ``tinymeg.parallel.token_mean`` the
        loss is this forward's share of the step's token mean (``token_share``). ``return_logits=False`` (with targets)
        returns ``(None, loss)`` computed by ``lm_head_loss``, which never holds the
        (B*T, vocab) logits at once (the training step's memory peak) and gives 0, not NaN,
        when every target is ignored. ``pos`` (T,): the tokens' positions, 0..T-1 by default
        (generation passes later ones when earlier tokens are in the KV cache; context
        parallelism its layout's).
        """
        if not return_logits and targets is None:
            raise ValueError("return_logits=False returns only the loss, so it needs targets")
        if pos is None:
            T = idx.size(1)
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.embed(idx, pos)
        args = self.block_args(pos)
        for block in self.get_submodule(self.BLOCKS):
            x = call_block(block, x, args)
        x = self.get_submodule(self.NORM)(x)
        head, vocab = self.get_submodule(self.HEAD), self.config.vocab_size
        if not return_logits:
            return None, self._loss(lm_head_loss(head, x, targets, vocab), targets)
        logits = head(x)
        if logits.size(-1) != vocab:
            logits = logits[..., :vocab]  # padded rows are not tokens
        loss = None
        if targets is not None:
            loss = self._loss(logits_loss(logits, targets), targets)
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
        attention = [m for m in self.modules() if hasattr(m, "kv_cache")]  # the layers that cache
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
