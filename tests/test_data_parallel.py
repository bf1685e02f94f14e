"""Data parallel and hybrid TP x DP, proved against one process training on the global batch.

Tolerance: fp32, atol=rtol=1e-5 for gradients and for parameters after a few AdamW steps
(eps=1e-6, see test_tensor_parallel.py): the only differences are the order of float sums
(TP's partial sums, DP's all-reduce of per-rank means), ~1e-7 relative.
"""
import torch
from hypothesis import given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from test_tensor_parallel import assert_close
from tinymeg.train.optim import clip_grad_norm_

MESHES = [(1, 2), (2, 2), (1, 4), (4, 1)]  # (tp, dp)


def _global_batches(cfg, n_steps, global_batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, cfg.vocab_size, (global_batch, seq), generator=g),
             torch.randint(0, cfg.vocab_size, (global_batch, seq), generator=g)) for _ in range(n_steps)]


def _train_vs_reference_body(tp, dp, accum, micro, seed, n_steps):
    ctx = get_ctx(dp=dp, tp=tp)
    cfg = tm.models.GPTConfig.tiny()
    torch.manual_seed(seed)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(seed)
    model = tm.apply_hybrid_parallel(tm.models.GPT2Model(cfg), ctx)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1) for m in (ref, model)]
    seq = 8
    for step, (x, y) in enumerate(_global_batches(cfg, n_steps, dp * accum * micro, seq, seed)):
        ref(x, y)[1].backward()
        xs, ys = x.view(accum, dp, micro, seq), y.view(accum, dp, micro, seq)
        for m in range(accum):
            with model.no_sync() if m < accum - 1 else torch.enable_grad():
                loss = model(xs[m, ctx.dp_rank], ys[m, ctx.dp_rank])[1]
                (loss / accum).backward()
        if step == 0:
            ref_params = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                assert_close(p.grad, ref_params[name].grad, f"grad of {name}")
        for opt in opts:
            opt.step()
            opt.zero_grad()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p, ref_params[name].detach(), f"{name} after {n_steps} steps")


@given(mesh=st.sampled_from(MESHES), accum=st.integers(1, 2), micro=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_dp_and_hybrid_equal_single_process_on_global_batch(mesh, accum, micro, seed):
    tp, dp = mesh
    world(tp * dp).run(_train_vs_reference_body, tp, dp, accum, micro, seed, 3)


def _no_sync_body():
    """Inside no_sync the gradients stay local (they differ across dp ranks)."""
    ctx = get_ctx(dp=2)
    model = tm.apply_data_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx)
    x = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(ctx.dp_rank))
    with model.no_sync():
        model(x, x)[1].backward()
    local = model.lm_head.weight.grad.clone()
    gathered = [torch.empty_like(local) for _ in range(2)]
    torch.distributed.all_gather(gathered, local)
    assert not torch.equal(gathered[0], gathered[1])


def test_no_sync_skips_the_all_reduce():
    world(2).run(_no_sync_body)


def _bucket_body():
    ctx = get_ctx(dp=2, tp=2)
    torch.manual_seed(ctx.rank)  # different init per rank: the wrap must broadcast
    model = tm.apply_hybrid_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx, bucket_mb=0.01)
    for p in model.parameters():
        other = p.to_local().clone()
        torch.distributed.broadcast(other, group=ctx.mesh["dp"].get_group(), group_src=0)
        assert torch.equal(other, p.to_local()), "dp replicas must start identical"
    sync = model.grad_sync
    x = torch.randint(0, 65, (2, 8))
    model(x, x)[1].backward()
    assert len(sync.buckets) > 1
    assert len(sync.launch_log) == len(sync.buckets)
    # the first bucket went out while other gradients were still being computed
    assert sync.launch_log[0][1] > 0, sync.launch_log
    # bytes all-reduced == gradient bytes this rank holds, nothing more
    reduced = sum(b.buffer.numel() * b.buffer.element_size() for b in sync.buckets)
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    assert reduced == held


def test_buckets_overlap_backward_and_move_only_local_grad_bytes():
    world(4).run(_bucket_body)


def _clip_body(max_norm):
    ctx = get_ctx(dp=2, tp=2)
    cfg = tm.models.GPTConfig.tiny()
    torch.manual_seed(0)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(0)
    model = tm.apply_hybrid_parallel(tm.models.GPT2Model(cfg), ctx)
    (x, y), = _global_batches(cfg, 1, 4, 8, 0)
    ref(x, y)[1].backward()
    model(x.view(2, 2, 8)[ctx.dp_rank], y.view(2, 2, 8)[ctx.dp_rank])[1].backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    norm = clip_grad_norm_(model.parameters(), max_norm)
    assert_close(norm, ref_norm, "global grad norm")
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_params[name].grad, f"clipped grad of {name}")


@given(max_norm=st.sampled_from([1e-3, 0.1, 1e3]))
def test_global_norm_clipping_equals_unsharded(max_norm):
    world(4).run(_clip_body, max_norm)


def _apply_twice_body():
    ctx = get_ctx(dp=2)
    model = tm.apply_data_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx)
    try:
        tm.apply_data_parallel(model, ctx)
    except ValueError as e:
        assert "already applied" in str(e)
    else:
        raise AssertionError("applying DP twice must fail")


def test_apply_data_parallel_twice_is_an_error():
    world(2).run(_apply_twice_body)
