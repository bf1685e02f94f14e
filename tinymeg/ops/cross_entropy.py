"""tinymeg::linear_cross_entropy: the LM head and the cross-entropy loss in one op, without the
(N, V) logits in memory at once.

    linear_cross_entropy(hidden (N, C), weight (V, C), targets (N,), vocab_size, ignore_index,
                         reduction, compute_grad) -> (loss, grad_hidden, grad_weight)
    linear_cross_entropy_backward(grad_loss, grad_hidden, grad_weight) -> (grad_hidden, grad_weight)

Tokens are processed in chunks: a chunk's logits are computed, reduced to the loss, and turned
in place into d loss / d logits, which two matmuls turn into this chunk's share of the gradients
w.r.t. hidden and weight. So the gradients are computed in the forward pass, from the same
logits, and stored; backward only scales them by grad_loss. (That is a pass fewer than a
recomputing backward and the reason the op returns them.) With compute_grad=False (eval, no
grad) that work is skipped and the gradient outputs are empty.

- Only the first ``vocab_size`` rows of weight are classes: GPT-2 pads its embedding to a
  multiple of 64, and padded rows must stay out of the softmax. They get zero gradient. The
  matmuls run on the whole padded weight (50304 rows for GPT-2, never a 50257-row slice: an odd
  dimension keeps cuBLAS off its fastest kernels) and the padded columns of the logits are
  masked (-inf) before the softmax; chunks of tokens are multiples of 64 rows.
- Targets equal to ignore_index (GPT-2: -1) count for nothing. With reduction="mean" the loss
  is divided by the number of counted targets; when there are none, loss and gradients are 0
  (F.cross_entropy returns NaN there).
- Dtypes: every matmul runs in the inputs' dtype (bf16 inputs: bf16 matmuls accumulating in
  float32, as F.linear under autocast); the softmax, loss and d logits are computed in float32
  (as F.cross_entropy under autocast), d logits cast back to the inputs' dtype for the gradient
  matmuls. The loss is float32; the gradients come back in the inputs' dtypes. Under autocast
  the op casts hidden and weight to the autocast dtype first (precision.py).
- Memory: one chunk of logits, plus grad_hidden and grad_weight (the size of hidden and weight)
  kept from forward to backward, where scaling them makes a second copy for a moment. The
  reference implementation holds the whole float32 logits, so the tuner never picks it (it
  runs only when forced: TINYMEG_OP_IMPL=linear_cross_entropy=ref).

Towards a vocab-parallel (loss-parallel) form: the per-chunk work is split in two functions,
``chunk_stats`` (each row's max, sum of exp and target logit, for a shard of the vocabulary that
starts at ``vocab_start``) and ``chunk_grad_`` (softmax minus one-hot, given the log-sum-exp).
A vocab-sharded op runs chunk_stats on its shard, all-reduces the max (MAX), then the sum of
exp rescaled to that max and the target logit (SUM), and runs chunk_grad_ with the global
log-sum-exp; its grad_hidden is Partial over the shards, its grad_weight sharded like the weight.

Sharding (DTensor): everything replicated; or, with reduction="sum", tokens sharded (hidden and
targets Shard(0), weight replicated): loss and grad_weight are then Partial sums and
grad_hidden is Shard(0), with no communication. A token-sharded "mean" needs the global count
of targets, so DTensor gathers the tokens first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from . import _triton, paths, precision
from .autotune import dispatch

REDUCTIONS = ("mean", "sum")
# Logits elements per chunk in the chunked kernel: on CPU 32 MiB of float32 (166 tokens of
# GPT-2's vocabulary: smaller chunks made the bench's matmuls slower, larger ones were no
# faster); on a GPU 256 MiB, so that each matmul fills the device.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}
# Rows per chunk are a multiple of this (or all the tokens, when fewer), so that a chunk's
# matmuls run on tensor-core friendly shapes whatever the vocabulary.
CHUNK_ROW_MULTIPLE = 64


def chunk_rows(n_tokens: int, width: int, chunk_elements: int) -> int:
    """Tokens per chunk: about chunk_elements logits of the given width, a multiple of 64 rows."""
    rows = chunk_elements // width // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return min(n_tokens, max(rows, CHUNK_ROW_MULTIPLE))


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, reduction: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(f"linear_cross_entropy: expected hidden (N, C), weight (V, C), targets (N,), got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden has {hidden.shape[1]} features but weight has "
                         f"{weight.shape[1]} (weight must be (vocab, features), as in nn.Linear)")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: {targets.shape[0]} targets for {hidden.shape[0]} tokens")
    if not 1 <= vocab_size <= weight.shape[0]:
        raise ValueError(f"linear_cross_entropy: vocab_size={vocab_size} must be in [1, {weight.shape[0]}] "
                         f"(the weight's rows)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_cross_entropy: targets must be int64 or int32, got {targets.dtype}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError("linear_cross_entropy: hidden and weight must be floating point")
    if hidden.dtype != weight.dtype:  # as F.linear: one dtype (under torch.autocast the op casts both)
        raise TypeError(f"linear_cross_entropy: hidden and weight must have one dtype, got {hidden.dtype} "
                        f"and {weight.dtype}; cast one, or run under torch.autocast")


def _check_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if targets.is_cuda or torch.compiler.is_compiling():  # no host sync; no data-dependent branch in a graph
        torch._assert_async(~bad.any(), "linear_cross_entropy: a target is outside [0, vocab_size)")
    elif bad.any():
        raise ValueError(f"linear_cross_entropy: target {targets[bad][0].item()} is outside "
                         f"[0, {vocab_size}) and is not ignore_index={ignore_index}")


def _scale(valid: Tensor, reduction: str) -> Tensor:
    """1 / (number of counted targets) for "mean" (1 when there are none: 0 / 1 = 0), else 1."""
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=valid.device)
    return 1.0 / valid.sum().clamp(min=1).float()


def _empty_grads(hidden, weight):
    return hidden.new_empty(0), weight.new_empty(0)


# ---- the two pieces (also the building blocks of a future vocab-parallel loss) ----

def _local_targets(targets: Tensor, vocab_start: int, width: int) -> tuple[Tensor, Tensor]:
    """Targets as column indices of a shard of `width` vocab ids from vocab_start (clamped), and
    whether each is inside it (ignored targets and other shards' are not)."""
    local = targets - vocab_start
    return local.clamp(0, width - 1), (local >= 0) & (local < width)


def float_logits(logits: Tensor, classes: int) -> Tensor:
    """logits (rows, v) as float32 (a copy unless they are float32 already), with the columns
    from ``classes`` on (the padded rows of the weight) set to -inf: out of the softmax, and
    zero in its gradient."""
    logits = logits.float()
    if classes < logits.shape[1]:
        logits[:, classes:] = float("-inf")
    return logits


def chunk_stats(logits: Tensor, targets: Tensor, vocab_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """For float32 logits (rows, v) of vocab ids [vocab_start, vocab_start + v): each row's max,
    sum of exp(logit - max), and its target's logit (0 where the target is outside the range:
    ignored, or in another shard). logits are left as they are, for chunk_grad_. Columns masked
    with -inf (float_logits) count for nothing; a row needs one that is not masked."""
    row_max = logits.max(-1).values
    sum_exp = (logits - row_max.unsqueeze(-1)).exp_().sum(-1)
    column, inside = _local_targets(targets, vocab_start, logits.shape[1])
    return row_max, sum_exp, logits.gather(1, column.unsqueeze(1)).squeeze(1) * inside


def chunk_grad_(logits: Tensor, lse: Tensor, targets: Tensor, row_scale: Tensor, vocab_start: int = 0) -> Tensor:
    """In place: logits -> (softmax(logits) - onehot(target)) * row_scale, the gradient w.r.t. the
    logits of a loss that weighs row i by row_scale[i]. lse is each row's log-sum-exp over the
    whole vocabulary (with a sharded vocabulary: after the all-reduces)."""
    logits.sub_(lse.unsqueeze(-1)).exp_().mul_(row_scale.unsqueeze(-1))  # softmax * row_scale
    column, inside = _local_targets(targets, vocab_start, logits.shape[1])
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits[rows, column] -= inside * row_scale
    return logits


# ---- implementations (hidden, weight, targets, vocab_size, ignore_index, reduction, compute_grad) ----

def forward_ref(hidden, weight, targets, vocab_size, ignore_index, reduction, compute_grad):
    """The whole (N, V) logits in float32, as the unfused model computes them."""
    w = weight[:vocab_size].float()
    logits = hidden.float() @ w.T
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    scale = _scale(valid, reduction)
    lse = torch.logsumexp(logits, -1)
    losses = torch.where(valid, lse - logits.gather(1, safe.unsqueeze(1)).squeeze(1), 0.0)
    loss = losses.sum() * scale
    if not compute_grad:
        return (loss, *_empty_grads(hidden, weight))
    dlogits = torch.softmax(logits, -1)
    dlogits[torch.arange(len(safe), device=safe.device), safe] -= 1.0  # minus one-hot(target)
    dlogits = dlogits * (valid.float() * scale).unsqueeze(-1)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_weight[:vocab_size] = dlogits.T @ hidden.float()
    return loss, (dlogits @ w).to(hidden.dtype), grad_weight.to(weight.dtype)


def forward_chunked(hidden, weight, targets, vocab_size, ignore_index, reduction, compute_grad,
                    chunk_elements=None):
    """Token chunks of about chunk_elements logits: one matmul for a chunk's logits (the padded
    vocabulary, in the inputs' dtype), loss and d logits from them in float32, in place, then
    its share of both gradients (two matmuls in the inputs' dtype)."""
    N, dtype = hidden.shape[0], hidden.dtype
    valid = targets != ignore_index
    row_scale = valid.float() * _scale(valid, reduction)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    if compute_grad:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    chunk_elements = chunk_elements or CHUNK_ELEMENTS.get(hidden.device.type, CHUNK_ELEMENTS["cpu"])
    rows = chunk_rows(N, weight.shape[0], chunk_elements)
    for s in range(0, N, rows):
        h, t, scale = hidden[s:s + rows], targets[s:s + rows], row_scale[s:s + rows]
        logits = float_logits(h @ weight.T, vocab_size)
        row_max, sum_exp, target_logit = chunk_stats(logits, t)
        lse = row_max + sum_exp.log()
        loss += ((lse - target_logit) * scale).sum()
        if compute_grad:
            dlogits = chunk_grad_(logits, lse, t, scale).to(dtype)
            torch.mm(dlogits, weight, out=grad_hidden[s:s + rows])
            if dtype == torch.float32:
                grad_weight.addmm_(dlogits.T, h)
            else:  # accumulate the chunks in float32: one rounding per chunk, not a running one
                grad_weight += dlogits.T @ h
    if not compute_grad:
        return (loss, *_empty_grads(hidden, weight))
    return loss, grad_hidden, grad_weight.to(weight.dtype)


def backward_ref(grad_loss, grad_hidden, grad_weight):
    g = grad_loss.float()
    return (grad_hidden.float() * g).to(grad_hidden.dtype), (grad_weight.float() * g).to(grad_weight.dtype)


def backward_fast(grad_loss, grad_hidden, grad_weight):
    """One pass each, in the gradients' own dtype."""
    return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype)


FORWARD = {"ref": forward_ref, "chunked": forward_chunked}
BACKWARD = {"ref": backward_ref, "fast": backward_fast}
if _triton.AVAILABLE:
    FORWARD["triton"] = _triton.linear_cross_entropy_forward

# Used when the tuner is off or cannot time; aten-based (see _triton.py for why not triton).
DEFAULT_FORWARD, DEFAULT_BACKWARD = "chunked", "fast"
# Never timed, only run when forced: it holds the (N, V) logits the op exists to avoid.
UNTUNED = ("ref",)


def candidates(table: dict, x: Tensor) -> dict:
    """The implementations in table that can run on x (triton: CUDA tensors only)."""
    return {k: f for k, f in table.items() if k != "triton" or _triton.supports(x)}


# ---- the ops ----

@torch.library.custom_op("tinymeg::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int,
                            ignore_index: int, reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check(hidden, weight, targets, vocab_size, reduction)
    _check_targets(targets, vocab_size, ignore_index)
    args = (hidden.contiguous(), weight.contiguous(), targets, vocab_size, ignore_index, reduction, compute_grad)
    return dispatch("linear_cross_entropy", candidates(FORWARD, hidden), args, DEFAULT_FORWARD, untuned=UNTUNED)


@linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, vocab_size, ignore_index, reduction, compute_grad):
    _check(hidden, weight, targets, vocab_size, reduction)
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return (loss, *_empty_grads(hidden, weight))
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)


@torch.library.custom_op("tinymeg::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(grad_loss: Tensor, grad_hidden: Tensor,
                                     grad_weight: Tensor) -> tuple[Tensor, Tensor]:
    if grad_loss.numel() != 1:
        raise ValueError(f"linear_cross_entropy_backward: grad_loss must be a scalar, got {tuple(grad_loss.shape)}")
    args = (grad_loss, grad_hidden.contiguous(), grad_weight.contiguous())
    return dispatch("linear_cross_entropy_backward", candidates(BACKWARD, grad_hidden), args, DEFAULT_BACKWARD)


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, grad_hidden, grad_weight):
    return grad_hidden.new_empty(grad_hidden.shape), grad_weight.new_empty(grad_weight.shape)


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.set_materialize_grads(False)  # no (V, C) zeros for the grads of those outputs
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.compute_grad = inputs[-1]


def _backward(ctx, grad_loss, _g1, _g2):
    if grad_loss is None:  # the loss was not used; its stored gradients are not differentiable
        return None, None, None, None, None, None, None
    if not ctx.compute_grad:
        raise RuntimeError("linear_cross_entropy was called with compute_grad=False, so it stored no "
                           "gradients; call it with compute_grad=True to backpropagate")
    grad_hidden, grad_weight = torch.ops.tinymeg.linear_cross_entropy_backward(grad_loss, *ctx.saved_tensors)
    need_h, need_w = ctx.needs_input_grad[:2]
    return grad_hidden if need_h else None, grad_weight if need_w else None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
# Under autocast: the head's matmul in the autocast dtype; the loss is float32 inside the op.
AUTOCAST = {"cpu": precision.LOWER, "cuda": precision.LOWER}
precision.register_autocast(linear_cross_entropy_op, AUTOCAST)
precision.register_autocast(linear_cross_entropy_backward_op, precision.BACKWARD)


# ---- sharding: [outputs...], [inputs...] (None for non-tensors) ----

@register_sharding(torch.ops.tinymeg.linear_cross_entropy.default)
def _(hidden, weight, targets, vocab_size, ignore_index, reduction, compute_grad):
    tail = [None, None, None, None]
    rules = [([Replicate()] * 3, [Replicate(), Replicate(), Replicate(), *tail])]
    if reduction == "sum":  # a sum over sharded tokens is a Partial sum, and so is grad_weight
        grads = [Shard(0), Partial()] if compute_grad else [Replicate(), Replicate()]
        rules.append(([Partial(), *grads], [Shard(0), Replicate(), Shard(0), *tail]))
    return rules


@register_sharding(torch.ops.tinymeg.linear_cross_entropy_backward.default)
def _(grad_loss, grad_hidden, grad_weight):
    return [([h, w], [Replicate(), h, w]) for h in (Replicate(), Shard(0)) for w in (Replicate(), Partial())]


# ---- the wrapper: the plain path or the op (paths.py) ----

def plain_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int,
                               ignore_index: int, reduction: str) -> Tensor:
    """What a model written with F.linear and F.cross_entropy runs, with the op's semantics: the
    logits of the whole padded weight in the inputs' dtype (autocast's under autocast), their
    first vocab_size columns' loss in float32, the same checks, and 0 (not NaN) when every
    target is ignored (a sum divided by the count of targets, at least 1)."""
    _check(hidden, weight, targets, vocab_size, reduction)
    _check_targets(targets, vocab_size, ignore_index)
    logits = F.linear(hidden, weight)[:, :vocab_size].float()
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss / (targets != ignore_index).sum().clamp(min=1) if reduction == "mean" else loss


def _op_linear_cross_entropy(hidden, weight, targets, vocab_size, ignore_index, reduction):
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return torch.ops.tinymeg.linear_cross_entropy(hidden, weight, targets, vocab_size, ignore_index,
                                                  reduction, compute_grad)[0]


PATHS = {"plain": plain_linear_cross_entropy, "op": _op_linear_cross_entropy}
# The plain path holds the whole float32 logits, their softmax and their gradient at once: it is
# a candidate only while the logits are no bigger than one chunk of the chunked kernel (32 MiB),
# which holds that much anyway. Beyond, the op is the only path (unless forced).
PLAIN_MAX_LOGITS = CHUNK_ELEMENTS["cpu"]


def default_path(n_tokens: int, vocab_size: int) -> str:
    """The path without timing (tuning off, under torch.compile): plain while its logits are small."""
    return "plain" if n_tokens * vocab_size <= PLAIN_MAX_LOGITS else "op"


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int | None = None,
                         ignore_index: int = -1, reduction: str = "mean") -> Tensor:
    """F.cross_entropy(hidden @ weight[:vocab_size].T, targets, ignore_index=ignore_index,
    reduction=reduction): hidden (..., C), targets (...), weight (V, C). By the plain path
    while the logits are small and it is faster, else by tinymeg::linear_cross_entropy, which
    never holds the logits (see paths.py). Returns 0 (not NaN) when every target is ignored."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    args = (hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), vocab_size, ignore_index, reduction)
    args = precision.cast_for(AUTOCAST, args)  # under autocast: as the op casts them (precision.py)
    path = default_path(args[0].shape[0], vocab_size)
    return PATHS[paths.choose("linear_cross_entropy", PATHS, args, path, untuned=() if path == "plain"
                              else ("plain",))](*args)
