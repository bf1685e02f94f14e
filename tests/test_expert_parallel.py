"""Expert parallelism, and MoE models under DP, TP and SP, proved against the one-process MoE
model on the same global batch: logits, loss (cross-entropy and aux losses), every gradient,
and every parameter after AdamW steps, fp32, atol=rtol=1e-5 (see test_tensor_parallel.py).

Routing is discrete. Top-k keeps the k largest router probabilities, and another batch split
sums in another order (float reassociation, ~1e-7), so two probabilities closer than that
could swap and send a token to another expert: an O(1) difference that is no bug. So every
test watches, in the one-process model, each token's margin between its k-th and (k+1)-th
probability; a micro-step with a margin under TIE (1e-5, 100x the noise) is a tie and the
example is discarded (``hypothesis.assume``) before anything is compared. Above TIE the sharded
model must route every token exactly as the reference does, or the outputs would differ by O(1).

The aux losses are statistics of the global batch of one micro-step (every dp rank's tokens):
with gradient accumulation the reference runs the same micro-steps on dp x micro_batch
sequences each (tinymeg/models/moe.py explains why).
"""
import contextlib

import pytest
import torch
import torch.distributed as dist
from hypothesis import assume, given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from test_tensor_parallel import assert_close
from tinymeg.models.moe import moe_aux_loss, moe_layers

TIE = 1e-5
SEQ = 8
# (dp, ep, tp, sequence_parallel): world = dp * tp
MESHES = [(2, 2, 1, False), (4, 4, 1, False), (4, 2, 1, False), (2, 2, 2, False), (2, 2, 2, True),
          (2, 1, 1, False), (1, 1, 2, True)]


def _global_batches(cfg, n_steps, global_batch, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, cfg.vocab_size, (global_batch, SEQ), generator=g),
             torch.randint(0, cfg.vocab_size, (global_batch, SEQ), generator=g)) for _ in range(n_steps)]


def _watch_routing(model) -> list:
    """Router logits of every MoE layer's forwards, appended to the returned list."""
    seen = []
    for m in moe_layers(model):
        m.router.register_forward_hook(lambda _, args, out: seen.append(out.detach().float()))
    return seen


def _min_margin(router_logits: list, k: int) -> float:
    margins = [float("inf")]
    for logits in router_logits:
        if k < logits.shape[-1]:
            top = logits.softmax(-1).topk(k + 1, dim=-1).values
            margins.append((top[:, k - 1] - top[:, k]).min().item())
    return min(margins)


def _compare_grads_and_step(ref, model, opts, what):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, ref_params[name].grad, f"grad of {name} ({what})")
    for opt in opts:
        opt.step()
        opt.zero_grad()


def moe_vs_reference(ctx, cfg, sp, accum, micro, seed, steps, steer=None, batches=None):
    """Train the one-process model and the sharded one side by side (same seed, same global
    batch) and compare everything; 'tie' if a routing margin is too small to compare."""
    torch.manual_seed(seed)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(seed)
    model = tm.models.GPT2Model(cfg)
    if steer is not None:
        steer(ref)
        steer(model)
    model = tm.apply_hybrid_parallel(model, ctx, {**tm.gpt2_tp_config(cfg), "sequence_parallel": sp})
    routing = _watch_routing(ref)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1) for m in (ref, model)]
    dp, group = ctx.dp_size, ctx.dp_mesh.get_group()
    batches = batches or _global_batches(cfg, steps, dp * accum * micro, seed)
    for step, (x, y) in enumerate(batches):
        xs, ys = x.view(accum, dp, micro, SEQ), y.view(accum, dp, micro, SEQ)
        for m in range(accum):
            routing.clear()
            ref_logits, ref_loss = ref(xs[m].flatten(0, 1), ys[m].flatten(0, 1))
            if _min_margin(routing, cfg.top_k) < TIE:
                return "tie"
            (ref_loss / accum).backward()
            with model.no_sync() if m < accum - 1 else contextlib.nullcontext():
                logits, loss = model(xs[m, ctx.dp_rank], ys[m, ctx.dp_rank])
                (loss / accum).backward()
            assert_close(logits, ref_logits.view(dp, micro, SEQ, -1)[ctx.dp_rank], f"logits, step {step}")
            aux, ref_aux = moe_aux_loss(model), moe_aux_loss(ref)
            assert_close(aux, ref_aux, f"aux loss, step {step}")
            ce = (loss - aux).detach().clone()
            dist.all_reduce(ce, group=group)
            assert_close(ce / dp, (ref_loss - ref_aux).detach(), f"cross-entropy (dp mean), step {step}")
        if step == 0:
            _compare_grads_and_step(ref, model, opts, "first step")
        else:
            for opt in opts:
                opt.step()
                opt.zero_grad()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p, ref_params[name].detach(), f"{name} after {len(batches)} AdamW steps")
    return "ok"


def _property_body(dp, ep, tp, sp, cfg_kw, accum, micro, seed):
    return moe_vs_reference(get_ctx(dp=dp, tp=tp, ep=ep), tm.models.GPTConfig.tiny(**cfg_kw), sp,
                            accum, micro, seed, steps=2)


@given(mesh=st.sampled_from(MESHES), experts_per_rank=st.integers(1, 2), k=st.integers(1, 8),
       moe_every=st.integers(1, 2), hidden=st.sampled_from([32, 30]), bias=st.booleans(),
       accum=st.integers(1, 2), micro=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_moe_on_any_mesh_equals_one_process(mesh, experts_per_rank, k, moe_every, hidden, bias, accum, micro, seed):
    """ep=2, ep=4, (ep=2, dp=4), (ep=2, tp=2) with and without SP, and MoE under plain DP/TP+SP.
    hidden=30 makes the expert rows unaligned for torch._grouped_mm: the loop kernel runs."""
    dp, ep, tp, sp = mesh
    n_experts = max(2, ep * experts_per_rank)
    cfg_kw = dict(n_experts=n_experts, top_k=min(k, n_experts), moe_every=moe_every, expert_hidden=hidden,
                  bias=bias)
    out = world(dp * tp).run(_property_body, dp, ep, tp, sp, cfg_kw, accum, micro, seed)
    assume(out[0] != "tie")
    assert out == ["ok"] * (dp * tp)
