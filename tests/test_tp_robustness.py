"""Tensor parallelism off the happy path: bad ids and targets, every target ignored, dropout
(masks per rank where the ranks hold different data, evaluation that leaves training alone,
compile), exceptions in the middle of a forward.

Dropout cannot be compared with the unsharded model bit for bit (a sharded model draws its
masks in other shapes), so those tests check the structure: which masks differ across TP
ranks, which are equal, and that training is reproducible from the seed.
"""
import copy

import pytest
import torch
import torch.distributed as dist

import tinymeg as tm
from rank_pool import get_ctx, world
from test_tensor_parallel import assert_close, build_pair, compare_training_step

SP = {**tm.GPT2_TP_CONFIG, "sequence_parallel": True}
LP = {**tm.GPT2_TP_CONFIG, "loss_parallel": True}


def _raises(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- finding 5: token ids outside the vocabulary

def _bad_ids_body():
    ctx = get_ctx(tp=2)
    cfg = tm.models.GPTConfig.tiny()                  # 65 tokens, 128 embedding rows
    ref, sharded = build_pair(cfg, 0, ctx)
    for bad in (128, 1000, -1):
        idx = torch.tensor([[1, 2, bad, 3]])
        _raises(lambda: ref(idx), IndexError, "index out of range")    # the unsharded model
        _raises(lambda: sharded(idx), IndexError, rf"token id {bad} is outside \[0, 128\)")


def test_out_of_range_token_ids_are_an_error_not_zero_embeddings():
    world(2).run(_bad_ids_body)


# ---- finding 6: targets outside the vocabulary, with and without loss parallel

def _bad_targets_body(plan):
    ctx = get_ctx(tp=2)
    cfg = tm.models.GPTConfig.tiny()
    ref, sharded = build_pair(cfg, 0, ctx, plan)
    idx = torch.randint(0, 65, (2, 4))
    for bad in (65, 1000, -100, -2):
        targets = idx.clone()
        targets[1, 2] = bad
        _raises(lambda: ref(idx, targets, return_logits=False), ValueError, f"target {bad} is outside")
        hint = r"Hugging Face's ignore index is -100: replace it" if bad == -100 else r"\(ignored\)"
        _raises(lambda: sharded(idx, targets, return_logits=False), ValueError,
                rf"target {bad} is outside \[0, 65\) or the ignore index -1: .*{hint}")


@pytest.mark.parametrize("plan", [LP, tm.GPT2_TP_CONFIG], ids=["loss_parallel", "gathered_logits"])
def test_out_of_range_targets_are_an_error_with_the_fix(plan):
    world(2).run(_bad_targets_body, plan)


# ---- finding 7: every target ignored

def _all_ignored_body(plan):
    ctx = get_ctx(tp=2)
    cfg = tm.models.GPTConfig.tiny()
    ref, sharded = build_pair(cfg, 0, ctx, plan)
    idx = torch.randint(0, 65, (2, 4))
    targets = torch.full_like(idx, -1)
    ref_loss, loss = ref(idx, targets, return_logits=False)[1], sharded(idx, targets, return_logits=False)[1]
    assert ref_loss.item() == 0.0 and loss.item() == 0.0, (ref_loss, loss)
    loss.backward()
    for name, p in sharded.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad.to_local()).all() and not p.grad.to_local().any(), name
    # and a partly ignored batch still equals the unsharded model
    targets[0, :3] = idx[0, :3]
    compare_training_step(*build_pair(cfg, 1, ctx, plan), idx, targets, {"return_logits": False})


@pytest.mark.parametrize("plan", [tm.GPT2_TP_CONFIG, LP], ids=["gathered_logits", "loss_parallel"])
def test_every_target_ignored_gives_zero_not_nan(plan):
    world(2).run(_all_ignored_body, plan)


# ---- finding 13: attention dropout masks differ across TP ranks

def _same_heads_model(cfg):
    """GPT-2 whose heads all have the same weights: head outputs differ only by their masks."""
    torch.manual_seed(0)
    model = tm.models.GPT2Model(cfg)
    hd = cfg.n_embd // cfg.n_head
    with torch.no_grad():
        for block in model.transformer.h:
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
            for part in range(3):  # q, k, v: copy head 0 into every head
                rows = slice(part * cfg.n_embd, (part + 1) * cfg.n_embd)
                w[rows] = w[rows][:hd].repeat(cfg.n_head, 1)
                b[rows] = b[rows][:hd].repeat(cfg.n_head)
    return model


def _attention_dropout_body(sp):
    ctx = get_ctx(tp=2)
    cfg = tm.models.GPTConfig.tiny(n_head=4, dropout=0.5)   # 2 heads per rank
    ref = _same_heads_model(cfg)
    model = tm.apply_tensor_parallel(copy.deepcopy(ref), ctx, SP if sp else tm.GPT2_TP_CONFIG)
    seen = {}
    model.transformer.h[0].attn.c_proj.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("heads", args[0].detach().clone()))
    model.transformer.h[0].attn.resid_dropout.register_forward_hook(
        lambda m, args, out: seen.__setitem__("resid", out == 0))
    idx = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    model(idx)
    first = {k: v.clone() for k, v in seen.items()}
    torch.manual_seed(7)
    model(idx)
    assert all(torch.equal(first[k], seen[k]) for k in first), "masks must be reproducible from the seed"
    hd = cfg.n_embd // cfg.n_head
    heads = [h.view(*h.shape[:2], -1, hd) for h in _gather(first["heads"])]   # (B, T, local heads, hd)
    assert not torch.equal(heads[0][:, :, 0], heads[0][:, :, 1]), "two heads of a rank: different masks"
    for j in range(2):  # head j of rank 0 is global head j, of rank 1 global head j + 2
        assert not torch.equal(heads[0][:, :, j], heads[1][:, :, j]), f"head {j} and {j + 2} share a mask"
    resid = _gather(first["resid"])
    if sp:
        assert resid[0].shape[1] == 4 and not torch.equal(resid[0], resid[1]), "sequence shards: own masks"
    else:
        assert torch.equal(resid[0], resid[1]), "replicated activations: the same mask on every rank"
    # in eval mode dropout is off: the sharded model equals the unsharded one
    model.eval(), ref.eval()
    assert_close(model(idx)[0], ref(idx)[0], "eval logits with dropout > 0")


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_attention_dropout_masks_differ_across_tp_ranks(sp):
    world(2).run(_attention_dropout_body, sp)


# ---- finding 11: evaluation does not change the training trajectory

def _eval_trajectory_body(eval_between):
    ctx = get_ctx(tp=2)
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(dropout=0.2)
    model = tm.apply_tensor_parallel(tm.models.GPT2Model(cfg), ctx, SP)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 65, (2, 8), generator=g) for _ in range(4)]
    torch.manual_seed(11)
    losses = []
    for step, idx in enumerate(data):
        loss = model(idx, idx, return_logits=False)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if eval_between:
            model.eval()
            with torch.no_grad():
                model(data[0], data[0])
            model.train()
    return losses


def test_evaluation_does_not_change_the_training_trajectory():
    plain = world(2).run(_eval_trajectory_body, False)[0]
    with_eval = world(2).run(_eval_trajectory_body, True)[0]
    assert plain == with_eval, (plain, with_eval)


# ---- exceptions in the middle of a forward leave nothing behind

def _exception_body(sp):
    ctx = get_ctx(tp=2)
    cfg = tm.models.GPTConfig.tiny()
    plan = SP if sp else tm.GPT2_TP_CONFIG
    ref, sharded = build_pair(cfg, 0, ctx, plan)
    boom = sharded.transformer.h[1].mlp.register_forward_hook(lambda *_: 1 / 0)
    idx = torch.randint(0, 65, (2, 8))
    _raises(lambda: sharded(idx, idx), ZeroDivisionError, "")   # inside a TP region, in the SP span
    boom.remove()
    compare_training_step(ref, sharded, idx, idx)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_an_exception_mid_forward_leaves_no_state_behind(sp):
    world(2).run(_exception_body, sp)
