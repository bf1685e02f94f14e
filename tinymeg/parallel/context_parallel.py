"""Context parallelism: every sequence split over the ``cp`` ranks, attention computed by a ring.

**Layout.** A sequence of T tokens is cut into 2·cp chunks of T/(2·cp); cp rank r holds chunks
r and 2·cp-1-r, in that order. Under the causal mask chunk i attends to chunks 0..i, so an early
chunk is cheap and a late one dear; pairing them gives every rank the same work. Token ids,
targets and positions are taken in this order (``layout_index``); a rank never holds the rest.

**Ring attention** (``tinymeg::ring_attention``). Each rank's queries must meet the keys and
values of every earlier token. The ranks pass their (k, v) around the ring (rank r sends to
r+1, receives from r-1) for cp-1 hops; at each hop the next transfer is already in flight
while the rank computes attention against the (k, v) it holds, and the partial results are
merged with the online-softmax rule (running log-sum-exp, as flash attention merges tiles).
With this layout the blocks are simple: at hop 0 a rank's own chunks (a causal block); from a
rank s < r, all queries against s's first chunk only (its second chunk is in nobody's past
here); from s > r, only the second query chunk against both of s's chunks. Fully masked blocks
are never computed, and every hop costs every rank the same half block. Backward recomputes
the blocks from the saved q, k, v, output and log-sum-exp (nothing of size T x T is kept),
passes (k, v) around once more, and sends each block's dK/dV along with them until they reach
their owner. Bytes each rank sends per attention layer: forward (cp-1)·|k,v|, backward
(cp-1)·|k,v| + (cp-1)·|dk,dv| (fp32); ``ring_stats()`` counts them.

It is a ``torch.library`` custom op (fake kernel and autograd registered), so a CP model
compiles with ``fullgraph=True``: the compiler sees one opaque op; the point-to-point
transfers inside it run eagerly. torch's ``context_parallel`` is not used: on CPU it fails
(``_scaled_dot_product_flash_attention_for_cpu`` has no CP sharding rule in torch 2.13; only
the CUDA flash/efficient/cudnn kernels do), and it works by monkey-patching
``F.scaled_dot_product_attention`` and resizing input buffers in place.

**Loss and gradients.** Weights are replicated over cp: cp ranks are data-parallel for the
weights, and DP averages gradients over dp x cp (``ctx.dp_cp_mesh``). The model's loss is the
mean over all tokens of the sequences, the same number on every cp rank (an all-reduce of
(sum, count), so unevenly ignored targets count right; inside ``tinymeg.parallel.token_mean``
that mean's share of the step's), and MoE balancing losses are added to it whole; its backward
gives each rank cp x its own tokens' share, so that the average over cp is the whole gradient
(Megatron-LM scales its CP loss by cp for the same reason). Logits, when asked for, are
all-gathered back into sequence order, with the same rule in backward.

**What it needs from a model.** Attention's token-mixing step must be a
``tinymeg.models.CausalAttention`` module (GPT-2's ``attn.core_attention``, Llama's
``self_attn.core_attention``): it is swapped for ``RingAttention``. The model's forward must
take the tokens' positions (``pos``, tinymeg.models.base's protocol): each rank passes its
layout's, so learned position embeddings (GPT-2) and rotary angles (Llama) alike are those of
the tokens' places in the whole sequence. Grouped key/value heads must be repeated to the query
heads before the core (Llama's attention does). Attention dropout is refused (the ring would
need each block's dropout mask again in backward).
The loss goes through the model's ``loss_share`` (tinymeg.models.base.CausalLM), which this
mixin overrides. A transformers Llama, Qwen2 or Mistral qualifies once adapted
(``tm.models.from_transformers``: its attention goes through transformers' attention interface to
a CausalAttention, its rotary angles follow the positions given).

**Under pipeline parallelism** the cores are swapped the same way, and the pipeline places the
tokens: each microbatch's ids and targets are taken in this rank's layout before the schedule
runs, every stage computes its positions from the layout, and stages pass the sequence shards
(tinymeg.parallel.pipeline_parallel).

**Generation** runs without CP (``model.generate`` turns it off): every cp rank holds the whole
model, so it samples alone, with plain attention on the whole context.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from .. import compat
from ..context import ParallelContext
from ..models.base import CausalAttention, CausalLM, token_share
from ..ops import precision
from ..nn.functional import all_gather, all_reduce
from .tensor_parallel import sequence_parallel_size

# ---- the layout ----


def layout_index(seq_len: int, cp: int, rank: int, device=None) -> Tensor:
    """Positions (in the full sequence) of the tokens cp rank `rank` holds: chunks rank and
    2cp-1-rank of 2cp equal chunks."""
    chunk = seq_len // (2 * cp)
    first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def check_seq_len(seq_len: int, cp: int, tp_seq: int = 1) -> None:
    """A clear error for a length the layout cannot split (tp_seq: sequence parallelism's
    further split of each rank's T/cp tokens over tp)."""
    if seq_len % (2 * cp):
        raise ValueError(
            f"context parallelism cuts each sequence into 2 x cp = {2 * cp} equal chunks, but the "
            f"sequence length is {seq_len}: use a multiple of {2 * cp}")
    if (seq_len // cp) % tp_seq:
        multiple = cp * math.lcm(2, tp_seq)
        raise ValueError(
            f"with context parallelism (cp={cp}) and sequence parallelism (tp={tp_seq}), each rank's "
            f"{seq_len // cp} of the {seq_len} tokens are split again over tp: use a sequence "
            f"length that is a multiple of {multiple}")


# ---- the ring: send to the next cp rank, receive from the previous one ----

@dataclass
class RingStats:
    """What the ring sent from this process (``ring_stats()``; reset with ``.reset()``)."""
    messages: int = 0
    bytes: int = 0
    # query x key pairs scored by this rank's blocks: equal on every rank (balanced layout)
    pairs: int = 0
    per_phase: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def reset(self) -> None:
        self.messages = self.bytes = self.pairs = 0
        self.per_phase = {"forward": 0, "backward": 0}


_STATS = RingStats()


def ring_stats() -> RingStats:
    return _STATS


class _Shift:
    """An asynchronous ring transfer of one tensor: ours goes to the next rank while the
    previous rank's arrives. ``wait()`` returns what arrived."""

    def __init__(self, tensor: Tensor, group: dist.ProcessGroup, phase: str):
        n, r = group.size(), group.rank()
        tensor = tensor.contiguous()
        self.received = torch.empty_like(tensor)
        self.works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, group=group, group_peer=(r + 1) % n),
            dist.P2POp(dist.irecv, self.received, group=group, group_peer=(r - 1) % n)])
        self._sent = tensor  # keep the buffer alive until the send completes
        nbytes = tensor.numel() * tensor.element_size()
        _STATS.messages += 1
        _STATS.bytes += nbytes
        _STATS.per_phase[phase] += nbytes

    def wait(self) -> Tensor:
        for work in self.works:
            work.wait()
        return self.received


# ---- one block of attention: (out, lse) of q against a k/v block, and its backward ----
# Two implementations: "math" (plain aten, any device: the reference) and "flash" (aten's fused
# CPU kernel, which never materialises the scores). "auto" is flash on CPU, math elsewhere.

def _resolve_block(block: str, device: torch.device) -> str:
    if block == "auto":
        return "flash" if device.type == "cpu" else "math"
    if block not in ("math", "flash"):
        raise ValueError(f"ring attention block implementation must be 'auto', 'math' or 'flash', got {block!r}")
    if block == "flash" and device.type != "cpu":
        raise ValueError(f"block='flash' is aten's CPU kernel, but the tensors are on {device}: use 'math' or 'auto'")
    return block


# "math" keeps SDPA's dtypes: its matmuls in the inputs' dtype (bf16 under bf16 or autocast),
# the scores, softmax and the running output in float32.

def _scores(q, k, causal, scale):
    s = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    if causal:  # square diagonal block: query i sees keys 0..i
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _block_forward(block, q, k, v, causal, scale) -> tuple[Tensor, Tensor]:
    _STATS.pairs += q.size(-2) * k.size(-2)
    if block == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out.float(), lse.float()
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul((s - lse.unsqueeze(-1)).exp().to(v.dtype), v).float(), lse


def _block_backward(block, dout, q, k, v, out, lse, causal, scale) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the *final* output and log-sum-exp of these queries
    (softmax probabilities are exp(s - lse) whichever block they fall in)."""
    if block == "flash":
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
        return tuple(g.float() for g in grads)
    s = _scores(q, k, causal, scale)
    p = (s - lse.unsqueeze(-1)).exp()
    dv = torch.matmul(p.to(dout.dtype).transpose(-2, -1), dout).float()
    dp = torch.matmul(dout, v.transpose(-2, -1)).float()
    ds = (p * (dp - (dout.float() * out.float()).sum(-1, keepdim=True)) * scale).to(q.dtype)
    return torch.matmul(ds, k).float(), torch.matmul(ds.transpose(-2, -1), q).float(), dv


def _merge_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Online softmax: fold a block's (out, lse) into the running (out, lse), in place."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_((lse - new_lse).exp().unsqueeze(-1)).add_(block_out * (block_lse - new_lse).exp().unsqueeze(-1))
    lse.copy_(new_lse)


def _hop_blocks(i: int, rank: int, n: int, half: int):
    """At hop i >= 1 (holding the k/v of rank (rank - i) mod n): which query rows and which
    key rows meet, unmasked. See the module docstring."""
    source = (rank - i) % n
    if source < rank:
        return slice(None), slice(0, half)        # all our queries vs its first chunk
    return slice(half, None), slice(None)         # our second chunk vs both of its chunks


# ---- the custom op ----

@torch.library.custom_op("tinymeg::ring_attention", mutates_args=())
def ring_attention_op(q: Tensor, k: Tensor, v: Tensor, group_name: str, scale: float,
                      block: str) -> tuple[Tensor, Tensor]:
    """Causal attention of this rank's queries (B, H, T/cp, D) in the load-balanced layout
    against every cp rank's keys and values. Returns (out, log-sum-exp (B, H, T/cp) fp32)."""
    group = compat.resolve_process_group(group_name)
    n, rank, half = group.size(), group.rank(), q.size(2) // 2
    block = _resolve_block(block, q.device)
    kv = torch.stack([k, v])
    incoming = _Shift(kv, group, "forward") if n > 1 else None
    out, lse = _block_forward(block, q, k, v, True, scale)      # hop 0: our own chunks, causal
    for i in range(1, n):
        kv = incoming.wait()
        if i + 1 < n:
            incoming = _Shift(kv, group, "forward")              # the next hop travels meanwhile
        rows, keys = _hop_blocks(i, rank, n, half)
        block_out, block_lse = _block_forward(block, q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys],
                                              False, scale)
        _merge_(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
    return _sdpa_layout(q).copy_(out), lse.contiguous()


def _sdpa_layout(q: Tensor) -> Tensor:
    """An empty (B, H, T, D) tensor stored as (B, T, H, D), the layout SDPA returns: attention's
    y.transpose(1, 2).reshape(B, T, C) is then a view, so the output projection saves the same
    storage that ring attention saves for backward, not a copy of it."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


@ring_attention_op.register_fake
def _(q, k, v, group_name, scale, block):
    return _sdpa_layout(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tinymeg::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               group_name: str, scale: float, block: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ring_attention: (k, v) go around the ring again; the dK/dV of the
    k/v a rank holds travel with them (fp32) and reach their owner after the last hop."""
    group = compat.resolve_process_group(group_name)
    n, rank, half = group.size(), group.rank(), q.size(2) // 2
    block = _resolve_block(block, q.device)
    kv = torch.stack([k, v])
    incoming = _Shift(kv, group, "backward") if n > 1 else None
    dq, dk, dv = _block_backward(block, dout, q, k, v, out, lse, True, scale)   # hop 0: our own
    grads_in = None
    for i in range(1, n):
        kv = incoming.wait()
        if i + 1 < n:
            incoming = _Shift(kv, group, "backward")
        # the dK/dV gathered so far for the k/v we now hold (none before the first hop)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device) if grads_in is None else grads_in.wait()
        rows, keys = _hop_blocks(i, rank, n, half)
        dq_b, dk_b, dv_b = _block_backward(block, dout[:, :, rows], q[:, :, rows], kv[0][:, :, keys],
                                           kv[1][:, :, keys], out[:, :, rows], lse[:, :, rows], False, scale)
        dq[:, :, rows] += dq_b
        dkv[0][:, :, keys] += dk_b
        dkv[1][:, :, keys] += dv_b
        grads_in = _Shift(dkv, group, "backward")   # on to the next holder; after hop n-1, the owner
    if grads_in is not None:
        own = grads_in.wait()
        dk, dv = dk + own[0], dv + own[1]
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, group_name, scale, block):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.group_name, ctx.scale, ctx.block = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout, _dlse):
    # lse is an output for backward's sake only; RingAttention never lets it reach a loss.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ring_attention_backward_op(dout, q, k, v, out, lse, ctx.group_name, ctx.scale, ctx.block)
    return dq, dk, dv, None, None, None


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast, as SDPA: q, k and v in the autocast dtype.
AUTOCAST = {"cpu": precision.LOWER, "cuda": precision.LOWER}
precision.register_autocast(ring_attention_op, AUTOCAST)
precision.register_autocast(ring_attention_backward_op, precision.BACKWARD)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, mesh: DeviceMesh, block: str = "auto") -> Tensor:
    """Causal attention over the cp ranks of `mesh`: q, k, v (B, H, T/cp, D) hold this rank's
    two chunks of the layout; returns this rank's rows of the output."""
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"ring attention needs q, k and v of one shape (B, heads, T, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}: repeat grouped k/v heads first")
    return ring_attention_op(q, k, v, mesh.get_group().group_name, q.size(-1) ** -0.5, block)[0]


# ---- the modules CP swaps in, and the model's forward ----

@dataclass
class ContextParallelState:
    """Shared by a CP model, its RingAttention modules and its position hook."""
    mesh: DeviceMesh
    tp_seq: int = 1          # sequence parallelism's split of each rank's tokens (tp), else 1
    enabled: bool = True     # False: plain single-rank attention on whole sequences (generation)

    @property
    def size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    def index(self, seq_len: int, device) -> Tensor:
        return layout_index(seq_len, self.size, self.rank, device)


class RingAttention(nn.Module):
    """Stands in for CausalAttention on a cp rank (same call: q, k, v -> attention output)."""

    def __init__(self, state: ContextParallelState, block: str = "auto"):
        super().__init__()
        self.state, self.block = state, block

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        if not self.state.enabled:   # generation: the whole sequence (and a KV cache's mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        if mask is not None:
            raise ValueError("ring attention takes no mask: a KV cache works with CP turned off "
                             "(model.generate does that)")
        return ring_attention(q, k, v, self.state.mesh, self.block)

    def extra_repr(self) -> str:
        return f"cp={self.state.size}, block={self.block}"


class _MeanOverCP(torch.autograd.Function):
    """(the mean loss over all tokens of the cp group, their count), from each rank's mean over
    its own. Backward: cp x this rank's share (DP averages the gradients over cp)."""

    @staticmethod
    def forward(ctx, local_mean, count, mesh):
        # in float32 whatever the loss's dtype: bf16 holds integers exactly only up to 256
        count = count.float()
        local_sum = torch.where(count > 0, local_mean.float() * count, torch.zeros_like(count))
        total_sum, total_count = all_reduce(torch.stack([local_sum, count]), mesh)
        ctx.save_for_backward(mesh.size() * count / total_count.clamp(min=1))
        ctx.dtype = local_mean.dtype
        total_count = total_count.round().long()
        ctx.mark_non_differentiable(total_count)
        return total_sum / total_count.clamp(min=1), total_count

    @staticmethod
    def backward(ctx, grad, _grad_count):
        scale, = ctx.saved_tensors
        return (grad * scale).to(ctx.dtype), None, None


class _GatherSequence(torch.autograd.Function):
    """(B, T/cp, ...) in this rank's layout -> (B, T, ...) in sequence order on every cp rank.
    Backward: cp x this rank's rows (DP averages the gradients over cp)."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        gathered = all_gather(x, state.mesh, dim=1)              # ranks' layouts, one after another
        seq_len = gathered.size(1)
        order = torch.cat([layout_index(seq_len, state.size, r, x.device) for r in range(state.size)])
        return gathered.index_select(1, order.argsort())

    @staticmethod
    def backward(ctx, grad):
        state = ctx.state
        return grad.index_select(1, state.index(grad.size(1), grad.device)) * state.size, None


def mean_over_cp(local_mean: Tensor, count: Tensor, mesh: DeviceMesh) -> Tensor:
    """The mean over every cp rank's counted tokens from each rank's mean over its ``count``
    (backward: cp x this rank's share, see _MeanOverCP)."""
    return _MeanOverCP.apply(local_mean, count, mesh)[0]


def gather_sequence(x: Tensor, state: ContextParallelState) -> Tensor:
    """(B, T/cp, ...) in this rank's layout -> (B, T, ...) in sequence order on every cp rank."""
    return _GatherSequence.apply(x, state)


@contextlib.contextmanager
def context_parallel_disabled(model: nn.Module):
    """Run ``model`` on whole sequences with plain attention, each rank alone (no communication);
    a model without context parallelism is left as it is."""
    state = getattr(model, "context_parallel", None)
    if state is None:
        yield
        return
    previous, state.enabled = state.enabled, False
    try:
        yield
    finally:
        state.enabled = previous


class ContextParallelMixin:
    """Mixed into the model's class by apply_context_parallel (as DP's mixin is): the model
    is called with whole sequences, the same on every cp rank, and keeps its own chunks."""
    context_parallel: ContextParallelState

    def forward(self, idx: Tensor, targets: Tensor | None = None, *args, **kwargs):
        state = self.context_parallel
        if not state.enabled:
            return super().forward(idx, targets, *args, **kwargs)
        seq_len = idx.size(1)
        block_size = getattr(getattr(self, "config", None), "block_size", None)
        if block_size is not None and seq_len > block_size:
            raise ValueError(f"sequence length {seq_len} exceeds block_size {block_size}")
        check_seq_len(seq_len, state.size, state.tp_seq)
        if kwargs.get("pos") is not None:
            raise ValueError("a context-parallel model places its tokens itself (the layout's positions): "
                             "call it without pos, on whole sequences")
        index = state.index(seq_len, idx.device)
        local_targets = None if targets is None else targets.index_select(1, index)
        logits, loss = super().forward(idx.index_select(1, index), local_targets, *args,
                                       **{**kwargs, "pos": index})
        if logits is not None:
            logits = gather_sequence(logits, state)
        return logits, loss

    def loss_share(self, ce: Tensor, targets: Tensor) -> Tensor:
        """CausalLM.loss_share over the cp group's chunks together: their mean (the loss of the
        whole sequences, the same on every cp rank), as one forward's share of the step's
        token mean. MoE balancing losses are added after it, whole (they are global already)."""
        if not self.context_parallel.enabled:
            return super().loss_share(ce, targets)
        mean, count = _MeanOverCP.apply(ce, (targets != -1).sum(), self.context_parallel.mesh)
        return token_share(mean, count, self.loss_tokens)

    def generate(self, *args, **kwargs):
        """Sampling runs without CP: each rank holds the whole model (see the module docstring)."""
        with context_parallel_disabled(self):
            return super().generate(*args, **kwargs)


def apply_context_parallel(model: nn.Module, ctx: ParallelContext, block: str = "auto") -> nn.Module:
    """Split every sequence over ``ctx.mesh["cp"]`` and run attention as a ring, in place.

    Every ``CausalAttention`` becomes a ``RingAttention``; the model's forward gets each rank's
    tokens and their positions in the whole sequence (``pos=``: the layout's); the model's class
    gains ContextParallelMixin. Apply it after TP and before DP, which averages gradients over
    dp x cp (``tm.parallelize`` does the ordering). ``block``: "auto", "flash" (aten's fused CPU
    kernel) or "math" for each block of the ring.
    """
    if isinstance(model, ContextParallelMixin):
        raise ValueError("context parallelism was already applied to this model; apply it once")
    _resolve_block(block, ctx.device)
    state = ContextParallelState(ctx.mesh["cp"])
    cores = [name for name, m in model.named_modules() if isinstance(m, CausalAttention)]
    _check_attention(model, cores)
    if not isinstance(model, CausalLM):
        raise TypeError(f"{type(model).__name__} is not a tinymeg.models.CausalLM: context parallelism gives each "
                        f"rank its tokens and their positions in the whole sequence (forward's pos) and takes "
                        f"the loss's mean over the cp ranks (loss_share), as tinymeg's GPT2Model and Llama "
                        f"(tinymeg.models.base) do; adapt a transformers Llama, Qwen2 or Mistral with "
                        f"tm.models.from_transformers(model)")
    pipelined = getattr(model, "pipeline", None) is not None  # its stages place the tokens themselves
    for name in cores:
        core = model.get_submodule(name)
        if core.dropout.p > 0:
            raise ValueError(f"{name!r} has attention dropout {core.dropout.p}, which ring attention does not "
                             f"implement: build the model with dropout=0 (GPTConfig(dropout=0.0)) to use cp")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, RingAttention(state, block))

    state.tp_seq = sequence_parallel_size(model)
    model.context_parallel = state
    if not pipelined:  # a pipeline splits each microbatch by the layout itself (pipeline_parallel.py)
        model.__class__ = type(f"ContextParallel{type(model).__name__}", (ContextParallelMixin, type(model)), {})
    return model


def _check_attention(model: nn.Module, cores: list[str]) -> None:
    """Refuse attention CP cannot reach: a module named like attention that computes it itself."""
    for name, module in model.named_modules():
        if "attention" not in type(module).__name__.lower() or isinstance(module, (CausalAttention, RingAttention)):
            continue
        if not any(core.startswith(name + ".") for core in cores):
            raise TypeError(
                f"module {name!r} ({type(module).__name__}) computes attention itself, which context "
                f"parallelism cannot split over the sequence. It needs the token-mixing step as a "
                f"submodule: call a tinymeg.models.CausalAttention on (B, heads, T, head_dim) q, k, v "
                f"(as GPT-2's attn.core_attention does), with positions (or rotary angles) taken from "
                f"the positions the model is given (forward's pos)")
    if not cores:
        raise TypeError(f"{type(model).__name__} has no tinymeg.models.CausalAttention module for "
                        f"context parallelism to replace with ring attention")
