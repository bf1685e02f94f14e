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


# ---- the loss of a step is the token mean of its global batch, whatever the split

def _token_mean_body():
    """Ignored targets (-1) spread unevenly over the dp ranks, the cp ranks' chunks, the pipeline's
    microbatches and the accumulation micro-steps: the trainer's step (forward_backward, inside
    tm.token_mean) gives the loss and gradients of one process on the whole batch, on every mesh.
    Averaging the forwards' own means (DDP's habit) gave dp=2 and cp=2 different losses."""
    from tinymeg.train.trainer import forward_backward
    cfg = tm.models.GPTConfig.tiny(n_layer=2)
    seq, micro = 8, 2
    meshes = [dict(dp=4), dict(dp=2, cp=2), dict(dp=2, pp=2), dict(dp=2, tp=2)]
    for accum, dims in [(1, meshes[0]), *[(2, d) for d in meshes[1:]]]:
        ctx = get_ctx(**dims)
        g = torch.Generator().manual_seed(accum)
        n = ctx.dp_size * accum * micro
        x = torch.randint(0, cfg.vocab_size, (n, seq), generator=g)
        y = torch.randint(0, cfg.vocab_size, (n, seq), generator=g)
        y[0, 1:] = y[1:n // 2, :2] = y[:, 5:7] = -1   # uneven over sequences, dp ranks, micro-steps and chunks
        torch.manual_seed(0)
        ref = tm.models.GPT2Model(cfg)
        ref_loss = ref(x, y, return_logits=False)[1]
        ref_loss.backward()
        torch.manual_seed(0)
        pipeline = dict(schedule="gpipe", microbatches=2) if ctx.pp_size > 1 else None
        model = tm.parallelize(tm.models.GPT2Model(cfg), ctx, pipeline=pipeline)
        xs, ys = x.view(accum, ctx.dp_size, micro, seq), y.view(accum, ctx.dp_size, micro, seq)
        loss = forward_backward(model, [(xs[m, ctx.dp_rank], ys[m, ctx.dp_rank]) for m in range(accum)], ctx)
        assert_close(torch.tensor(loss), ref_loss.detach(), f"loss under {dims}")
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert_close(p.grad, ref_params[name].grad, f"grad of {name} under {dims}")
        assert not model.loss_tokens.any(), "token_mean leaves the model as it found it"


def test_loss_is_the_token_mean_of_the_global_batch_on_every_mesh():
    world(4).run(_token_mean_body)


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
    # bytes all-reduced == gradient bytes this rank holds + one 4-byte used flag per parameter
    reduced = sum(b.buffer.numel() * b.buffer.element_size() for b in sync.buckets)
    params = list(model.parameters())
    held = sum(p.to_local().numel() * p.element_size() for p in params)
    assert reduced == held + 4 * len(params)
    # and the gradients are views of the buckets: no second copy
    in_buckets = {b.buffer.untyped_storage().data_ptr() for b in sync.buckets}
    assert all(p.grad.to_local().untyped_storage().data_ptr() in in_buckets for p in params)
    # every backward overlaps, not only the first (each bucket's count of ready gradients starts over)
    model.zero_grad()
    model(x, x)[1].backward()
    assert len(sync.launch_log) == len(sync.buckets) and sync.launch_log[0][1] > 0, sync.launch_log


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


# ---- off the happy path (issue 10, findings 1-4), at every ZeRO stage (test_zero.py reuses these) ----

class _FailOnce(torch.autograd.Function):
    """Identity whose backward raises the first time it runs after arming (a simulated OOM)."""
    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if _FailOnce.armed:
            _FailOnce.armed = False
            raise RuntimeError("simulated out-of-memory in backward")
        return grad


def full_value(t):
    """The global value of a parameter, gradient or state, however it is sharded (TP and/or over
    dp by ZeRO/FSDP2, whose dp dim is the first of the mesh)."""
    from tinymeg.parallel.zero import whole_value
    return whole_value(t)


def build_dp_pair(ctx, seed, zero=0, n_layer=2, unused=False, frozen=(), bucket_mb=0.002, dtype=None,
                  optimizer=None):
    """The one-process reference and the same model under TP (tp > 1) + DP/ZeRO, each with a
    torch optimizer (AdamW with weight decay by default) built on all its parameters."""
    cfg = tm.models.GPTConfig.tiny(n_layer=n_layer)

    def build():
        torch.manual_seed(seed)
        model = tm.models.GPT2Model(cfg)
        if unused:
            model.extra = torch.nn.Linear(cfg.n_embd, cfg.n_embd)   # never called: no gradient anywhere
        for name, p in model.named_parameters():
            p.requires_grad_(not any(name.startswith(f) for f in frozen))
        return model
    ref, model = build(), build()
    if ctx.tp_size > 1:
        model = tm.apply_tensor_parallel(model, ctx)
    model = tm.apply_data_parallel(model, ctx, bucket_mb=bucket_mb, zero=zero, param_dtype=dtype)
    make = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3, eps=1e-6, weight_decay=0.1))
    return ref, model, make(ref.parameters()), tm.shard_optimizer(model, make(model.parameters()))


class skipping:
    """Blocks `skip` of the model return their input unchanged (stochastic depth): their
    parameters get no gradient from this forward."""

    def __init__(self, model, skip):
        self.blocks = [model.transformer.h[i] for i in skip]

    def __enter__(self):
        for block in self.blocks:
            block.forward = lambda x: x

    def __exit__(self, *exc):
        for block in self.blocks:
            del block.forward


def reference_step(ref, ref_opt, x, y, dp, skips, clip=None):
    """One step of the one-process model on the global batch: rank r's sequences go through the
    model with rank r's skipped blocks; the loss is the mean over ranks, as DP computes it."""
    loss = 0
    for r, (xr, yr) in enumerate(zip(x.chunk(dp), y.chunk(dp))):
        with skipping(ref, skips.get(r, ())):
            loss = loss + ref(xr, yr, return_logits=False)[1] / dp
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    ref_opt.step()


def assert_matches_reference(model, ref, what, grads=False, skip_names=()):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if any(name.startswith(s) for s in skip_names):
            continue
        if grads:
            from tinymeg.parallel.zero import optimizer_param
            g, r = optimizer_param(p).grad, ref_params[name].grad
            assert (g is None) == (r is None), f"{what}: grad of {name} is {g is None and 'None'} " \
                                               f"but the one-process model's is {r is None and 'None'}"
            if g is not None:
                assert_close(full_value(g), r, f"{what}: grad of {name}")
        else:
            assert_close(full_value(p).float(), ref_params[name].detach(), f"{what}: {name}")


def _rank_dependent_body(tp, dp, zero, skips, seed, steps=2):
    """Some blocks are skipped on some dp ranks (skips: dp rank -> blocks), and `extra` is used
    nowhere: the gradients (None where no rank used a parameter) and the parameters after AdamW
    steps with weight decay equal the one-process model's."""
    ctx = get_ctx(dp=dp, tp=tp)
    ref, model, ref_opt, opt = build_dp_pair(ctx, seed, zero, n_layer=3, unused=True)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, y = (torch.randint(0, 65, (2 * dp, 8), generator=g) for _ in range(2))
        reference_step(ref, ref_opt, x, y, dp, skips)
        with skipping(model, skips.get(ctx.dp_rank, ())):
            model(x.chunk(dp)[ctx.dp_rank], y.chunk(dp)[ctx.dp_rank], return_logits=False)[1].backward()
        # stage 3 (FSDP2) reduces zeros for a parameter no rank used (see README: ZeRO)
        unused = ["extra."] + [f"transformer.h.{i}." for i in range(3)
                               if all(i in skips.get(r, ()) for r in range(dp))] if zero == 3 else []
        if step == 0:
            assert_matches_reference(model, ref, "step 0", grads=True, skip_names=unused)
        opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert_matches_reference(model, ref, f"after {steps} steps", skip_names=unused)
    if zero != 3:   # the unused parameter did not move: no gradient, so no decay and no momentum
        assert torch.equal(full_value(model.extra.weight), ref.extra.weight.detach())


@given(mesh=st.sampled_from([(1, 2), (2, 2), (1, 4)]), data=st.data(), seed=st.integers(0, 2**16))
def test_parameters_used_on_some_ranks_or_none_equal_one_process(mesh, data, seed):
    """Issue 10 findings 1-2: buckets launch in one order everywhere; a parameter used on one
    rank only is averaged with the others' zeros; one used nowhere keeps grad None."""
    tp, dp = mesh
    skips = {r: data.draw(st.sets(st.integers(0, 2)), label=f"blocks skipped on dp rank {r}") for r in range(dp)}
    world(tp * dp).run(_rank_dependent_body, tp, dp, 0, skips, seed)


def test_parameter_used_on_one_rank_only_equals_one_process():
    """The issue's must-show: block 1 is used on dp rank 1 only; blocks 0 and 2 everywhere."""
    world(2).run(_rank_dependent_body, 1, 2, 0, {0: {1}}, 0)


def _raise_then_retry_body(tp, dp, zero):
    """A backward raises half-way (after some buckets were launched), the step is retried after
    zero_grad, and this and the following steps still equal the one-process model."""
    ctx = get_ctx(dp=dp, tp=tp)
    ref, model, ref_opt, opt = build_dp_pair(ctx, 0, zero)
    model.transformer.h[0].register_forward_hook(lambda mod, args, out: _FailOnce.apply(out))
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x, y = (torch.randint(0, 65, (2 * dp, 8), generator=g) for _ in range(2))
        reference_step(ref, ref_opt, x, y, dp, {})
        mine = x.chunk(dp)[ctx.dp_rank], y.chunk(dp)[ctx.dp_rank]
        if step == 0:
            _FailOnce.armed = True
            try:
                model(*mine, return_logits=False)[1].backward()
            except RuntimeError as e:
                assert "simulated out-of-memory" in str(e)
            else:
                raise AssertionError("the armed backward did not raise")
            opt.zero_grad()
        model(*mine, return_logits=False)[1].backward()
        assert_matches_reference(model, ref, f"step {step}", grads=True)
        opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert_matches_reference(model, ref, "after 3 steps")


def test_backward_that_raises_is_retried_and_later_steps_still_sync():
    """Issue 10 finding 3: no stale sync state after an exception in backward."""
    world(4).run(_raise_then_retry_body, 2, 2, 0)


def _unfreeze_body(tp, dp, zero):
    """Parameters frozen when DP is applied and unfrozen later (fine-tuning) are averaged over
    dp from then on, like the rest; the optimizer was built on all parameters."""
    ctx = get_ctx(dp=dp, tp=tp)
    frozen = ("transformer.h.0.", "transformer.ln_f.")
    ref, model, ref_opt, opt = build_dp_pair(ctx, 0, zero, frozen=frozen)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        if step == 1:   # unfreeze in both
            for m in (ref, model):
                for name, p in m.named_parameters():
                    p.requires_grad_(True)
        x, y = (torch.randint(0, 65, (2 * dp, 8), generator=g) for _ in range(2))
        reference_step(ref, ref_opt, x, y, dp, {})
        model(x.chunk(dp)[ctx.dp_rank], y.chunk(dp)[ctx.dp_rank], return_logits=False)[1].backward()
        assert_matches_reference(model, ref, f"step {step}", grads=True)
        opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert_matches_reference(model, ref, "after 3 steps")


def test_parameter_unfrozen_after_wrapping_is_synchronised():
    """Issue 10 finding 4: a parameter unfrozen after apply_data_parallel is averaged too."""
    world(4).run(_unfreeze_body, 2, 2, 0)
