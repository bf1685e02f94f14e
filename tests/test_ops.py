"""tinymeg's custom ops: registration (opcheck), every implementation against the reference,
DTensor sharding rules, bad input, and the runtime autotuner's logic (with a fake clock).

Tolerances. fp32: the implementations differ from the reference by float reassociation only
(aten's fused kernels, chunked sums), ~1e-7 relative; atol=rtol=1e-5 leaves 100x room and
catches any real error (O(1e-2) and up). bf16 (8 bits of mantissa, one rounding = 2^-9
relative): every implementation computes in float32 but some round an intermediate to bf16
(x + bias before the GELU; LayerNorm's statistics in aten's bf16 kernel), so results may be a
few bf16 ulps apart: atol=rtol=3e-2 (about 8 ulps). The cross-entropy loss and gradients come
back in float32 / the inputs' dtype from float32 math: 1e-4 for fp32 (sums over the vocabulary).

The autotuner is tested with an injected clock only: no test depends on real timings.
"""
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from tinymeg.ops import autotune, cross_entropy, gelu, norm
from tinymeg.ops.autotune import RuntimeAutoTuner
from tinymeg.ops.autotune_timing import MIN_ROUNDS

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
HAS_CUDA_TRITON = torch.cuda.is_available() and tm.ops._triton.AVAILABLE


pytestmark = pytest.mark.usefixtures("fresh_tuner")  # tests/conftest.py


def cpu_impls(table):
    return {k: f for k, f in table.items() if k != "triton"}


def close(actual, expected, dtype, what, cond=1.0):
    """cond: the problem's amplification of rounding noise (LayerNorm: 1/std of a row)."""
    tol = {k: v * cond for k, v in TOL[dtype].items()}
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- opcheck

def randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape).to(dtype).requires_grad_(grad)


# A backward op is not differentiable itself: it is checked with plain (no-grad) inputs.

@pytest.mark.parametrize("shape,affine,dtype", [((3, 8), True, torch.float32), ((2, 5, 16), False, torch.float32),
                                                ((1, 1, 7), True, torch.float32), ((4, 32), True, torch.bfloat16)])
def test_opcheck_layer_norm(shape, affine, dtype):
    x = randn(*shape, dtype=dtype, grad=True)
    w, b = (randn(shape[-1], dtype=dtype, grad=True) for _ in range(2)) if affine else (None, None)
    torch.library.opcheck(torch.ops.tinymeg.layer_norm.default, (x, w, b, 1e-5))
    _, mean, rstd = torch.ops.tinymeg.layer_norm(x.detach(), w, b, 1e-5)
    w = None if w is None else w.detach()
    torch.library.opcheck(torch.ops.tinymeg.layer_norm_backward.default,
                          (randn(*shape, dtype=dtype), x.detach(), w, mean, rstd))


@pytest.mark.parametrize("shape,dtype", [((3, 8), torch.float32), ((2, 5, 16), torch.float32),
                                         ((1, 1, 7), torch.float32), ((4, 32), torch.bfloat16)])
def test_opcheck_bias_gelu(shape, dtype):
    x, b = randn(*shape, dtype=dtype, grad=True), randn(shape[-1], dtype=dtype, grad=True)
    torch.library.opcheck(torch.ops.tinymeg.bias_gelu.default, (x, b))
    torch.library.opcheck(torch.ops.tinymeg.bias_gelu_backward.default,
                          (randn(*shape, dtype=dtype), x.detach(), b.detach()))


@pytest.mark.parametrize("n,c,v,vocab,reduction,grad,dtype", [(7, 8, 16, 13, "mean", True, torch.float32),
                                                               (1, 4, 8, 8, "sum", True, torch.float32),
                                                               (5, 8, 16, 16, "mean", False, torch.float32),
                                                               (6, 8, 16, 10, "mean", True, torch.bfloat16)])
def test_opcheck_linear_cross_entropy(n, c, v, vocab, reduction, grad, dtype):
    h, w = randn(n, c, dtype=dtype, grad=grad), randn(v, c, dtype=dtype, grad=grad)
    t = torch.randint(0, vocab, (n,))
    t[0] = -1
    torch.library.opcheck(torch.ops.tinymeg.linear_cross_entropy.default, (h, w, t, vocab, -1, reduction, grad))
    torch.library.opcheck(torch.ops.tinymeg.linear_cross_entropy_backward.default,
                          (torch.tensor(0.5), randn(n, c, dtype=dtype), randn(v, c, dtype=dtype)))


# ---------------------------------------------------------------- implementations vs the reference

dtypes = st.sampled_from([torch.float32, torch.bfloat16])
lead_shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


# LayerNorm multiplies the rounding noise of x - mean by rstd = 1/std of the row, up to
# 1/sqrt(eps) = 316 for a row of one element or of near-equal values: tolerances scale with
# max(1, rstd) (ill-conditioning, not an implementation difference). In bf16, aten's kernel (the
# "fast" implementation, as PyTorch's own bf16 LayerNorm) keeps mean and rstd in bf16, an error
# of |mean| * 2^-9 that normalisation turns into |mean| / std * 2^-9: that factor too. grad_weight
# and grad_bias sum over the rows, whose rounding errors add up like a random walk: sqrt(rows).
@given(lead=lead_shapes, c=st.integers(1, 70), dtype=dtypes, affine=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_implementations(lead, c, dtype, affine, seed):
    torch.manual_seed(seed)
    x = torch.randn(*lead, c, dtype=dtype) * 3 + 1
    w = torch.randn(c, dtype=dtype) if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    dy = torch.randn(*lead, c, dtype=dtype)
    y_ref, mean_ref, rstd_ref = norm.forward_ref(x, w, b, 1e-5)
    cond = max(1.0, rstd_ref.max().item())
    if dtype == torch.bfloat16:
        cond *= max(1.0, (mean_ref.abs() * rstd_ref).max().item())
    expected = F.layer_norm(x.float(), (c,), None if w is None else w.float(), None if b is None else b.float())
    close(y_ref, expected.to(dtype), dtype, "reference vs F.layer_norm", cond)
    grads_ref = norm.backward_ref(dy, x, w, mean_ref, rstd_ref)
    for name, fwd in cpu_impls(norm.FORWARD).items():
        y, mean, rstd = fwd(x, w, b, 1e-5)
        assert mean.dtype == rstd.dtype == torch.float32, name
        close(y, y_ref, dtype, f"{name} y", cond)
        close(rstd, rstd_ref, dtype, f"{name} rstd", cond)
        for bname, bwd in cpu_impls(norm.BACKWARD).items():
            rows = math.sqrt(x.numel() // c)
            for g, g_ref, what, k in zip(bwd(dy, x, w, mean, rstd), grads_ref, ("dx", "dw", "db"), (1, rows, rows)):
                close(g, g_ref, dtype, f"{name}/{bname} {what}", cond * k)
    # the reference backward is the derivative of the reference forward
    if dtype == torch.float32:
        xs = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
        out = F.layer_norm(xs[0], (c,), *(xs[1:] or [None, None]))
        autograd = torch.autograd.grad(out, xs, dy)
        for g, g_ref in zip(autograd, grads_ref):
            close(g_ref, g, dtype, "reference backward vs autograd", cond)


@given(lead=lead_shapes, c=st.integers(1, 70), dtype=dtypes, seed=st.integers(0, 2**16),
       chunk=st.integers(1, 200))
def test_bias_gelu_implementations(lead, c, dtype, seed, chunk):
    torch.manual_seed(seed)
    x, b, dy = torch.randn(*lead, c, dtype=dtype) * 3, torch.randn(c, dtype=dtype), torch.randn(*lead, c, dtype=dtype)
    y_ref = gelu.forward_ref(x, b)
    close(y_ref, F.gelu(x.float() + b.float(), approximate="tanh").to(dtype), dtype, "reference vs F.gelu")
    dx_ref, db_ref = gelu.backward_ref(dy, x, b)
    impls = {**cpu_impls(gelu.FORWARD), "chunked(small)": lambda x, b: gelu.forward_chunked(x, b, chunk)}
    for name, fwd in impls.items():
        close(fwd(x, b), y_ref, dtype, f"{name} forward")
    impls = {**cpu_impls(gelu.BACKWARD), "chunked(small)": lambda *a: gelu.backward_chunked(*a, chunk_elements=chunk)}
    for name, bwd in impls.items():
        dx, db = bwd(dy, x, b)
        close(dx, dx_ref, dtype, f"{name} dx")
        # db sums dx over the rows: dx rounded to bf16 before the sum adds up like a random walk
        close(db, db_ref, dtype, f"{name} db", math.sqrt(x.numel() // c))
    if dtype == torch.float32:
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        gx, gb = torch.autograd.grad(F.gelu(xs + bs, approximate="tanh"), (xs, bs), dy)
        close(dx_ref, gx, dtype, "reference dx vs autograd")
        close(db_ref, gb, dtype, "reference db vs autograd")


LCE_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@given(n=st.integers(1, 40), c=st.integers(1, 24), vocab=st.integers(1, 90), pad=st.integers(0, 9),
       dtype=dtypes, reduction=st.sampled_from(["mean", "sum"]), ignored=st.sampled_from(["none", "some", "all"]),
       chunk=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_linear_cross_entropy_implementations(n, c, vocab, pad, dtype, reduction, ignored, chunk, seed):
    torch.manual_seed(seed)
    h = torch.randn(n, c, dtype=dtype)
    w = torch.randn(vocab + pad, c, dtype=dtype)  # pad rows: GPT-2's padded vocabulary
    t = torch.randint(0, vocab, (n,))
    if ignored == "some":
        t[torch.rand(n) < 0.3] = -1
    elif ignored == "all":
        t[:] = -1
    ref = cross_entropy.forward_ref(h, w, t, vocab, -1, reduction, True)
    # the reference against F.cross_entropy, through autograd (float32)
    hs, ws = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()  # (h, w stay leaves)
    expected = F.cross_entropy(hs @ ws[:vocab].T, t, ignore_index=-1, reduction=reduction)
    if (t == -1).all():
        assert ref[0].item() == 0.0 and not ref[1].any() and not ref[2].any(), "all ignored: 0 loss, zero grads"
    else:
        gh, gw = torch.autograd.grad(expected, (hs, ws))
        tol = LCE_TOL[dtype]
        torch.testing.assert_close(ref[0], expected.detach(), **tol)
        torch.testing.assert_close(ref[1].float(), gh, **tol)
        torch.testing.assert_close(ref[2].float(), gw, **tol)
    assert not ref[2][vocab:].any(), "padded rows get no gradient"
    impls = {**cpu_impls(cross_entropy.FORWARD),
             "chunked(small)": lambda *a: cross_entropy.forward_chunked(*a, chunk_elements=chunk)}
    for name, fwd in impls.items():
        loss, gh, gw = fwd(h, w, t, vocab, -1, reduction, True)
        assert (loss.dtype, gh.dtype, gw.dtype) == (torch.float32, dtype, dtype), name
        for a, e, what in zip((loss, gh, gw), ref, ("loss", "grad_hidden", "grad_weight")):
            torch.testing.assert_close(a, e, **LCE_TOL[dtype], msg=lambda m: f"{name} {what}: {m}")
        no_grad = fwd(h, w, t, vocab, -1, reduction, False)
        assert no_grad[1].numel() == no_grad[2].numel() == 0, f"{name}: compute_grad=False must skip grads"
        torch.testing.assert_close(no_grad[0], loss)
    g = torch.tensor(0.37)
    for name, bwd in cpu_impls(cross_entropy.BACKWARD).items():
        dh, dw = bwd(g, ref[1], ref[2])
        close(dh, (ref[1].float() * g).to(dtype), dtype, f"{name} backward")
        close(dw, (ref[2].float() * g).to(dtype), dtype, f"{name} backward")


@given(n=st.integers(1, 12), v=st.integers(2, 40), shards=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_loss_pieces_compose_over_vocab_shards(n, v, shards, seed):
    """The pieces a vocab-parallel loss will use: per-shard stats, combined as the all-reduces
    would (MAX, then SUM of rescaled sum-exp and of target logits), give the whole-vocab loss
    and d loss / d logits."""
    torch.manual_seed(seed)
    logits, t = torch.randn(n, v) * 4, torch.randint(0, v, (n,))
    t[0] = -1
    bounds = torch.linspace(0, v, shards + 1).long().tolist()
    parts = [logits[:, lo:hi].clone() for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    starts = [lo for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    stats = [cross_entropy.chunk_stats(p, t, s) for p, s in zip(parts, starts)]
    global_max = torch.stack([m for m, _, _ in stats]).max(0).values
    sum_exp = sum(se * (m - global_max).exp() for m, se, _ in stats)
    lse = global_max + sum_exp.log()
    valid = t != -1
    losses = (lse - sum(tl for _, _, tl in stats)) * valid
    expected = F.cross_entropy(logits, t, ignore_index=-1, reduction="none")
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    scale = valid.float()
    grads = torch.cat([cross_entropy.chunk_grad_(p, lse, t, scale, s) for p, s in zip(parts, starts)], 1)
    x = logits.clone().requires_grad_()
    F.cross_entropy(x, t, ignore_index=-1, reduction="sum").backward()
    torch.testing.assert_close(grads, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["layer_norm=ref,bias_gelu=ref,linear_cross_entropy=ref",
                                  "layer_norm=fast,bias_gelu=chunked,linear_cross_entropy=chunked,"
                                  "linear_cross_entropy_backward=ref"])
def test_forced_implementations_run_through_the_ops(monkeypatch, spec):
    """TINYMEG_OP_IMPL reaches each op's kernel, forward and backward, and nothing else runs."""
    calls = set()
    for op, module in tm.ops.OPS.items():
        for table, suffix in ((module.FORWARD, ""), (module.BACKWARD, "_backward")):
            for impl, f in list(table.items()):
                monkeypatch.setitem(table, impl, lambda *a, f=f, tag=(op + suffix, impl): calls.add(tag) or f(*a))
    monkeypatch.setenv("TINYMEG_OP_IMPL", spec)
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    y = tm.ops.bias_gelu(tm.ops.layer_norm(x, w, w), w)
    tm.ops.linear_cross_entropy(y, torch.randn(5, 8, requires_grad=True), torch.tensor([0, 1, 2, -1])).backward()
    forced = dict(item.split("=") for item in spec.split(","))
    assert calls == {(op + sfx, forced.get(op + sfx, forced[op])) for op in tm.ops.OPS for sfx in ("", "_backward")}


# ---------------------------------------------------------------- the model

def test_model_uses_fused_ops_with_the_same_module_api():
    torch.manual_seed(0)
    model = tm.models.GPT2Model(tm.models.GPTConfig.tiny(vocab_size=65))
    assert isinstance(model.transformer.ln_f, torch.nn.LayerNorm)
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.h.0.ln_1.weight" in names and "transformer.h.0.mlp.c_fc.bias" in names
    idx = torch.randint(0, 65, (2, 12))
    targets = torch.randint(0, 65, (2, 12))
    targets[0, :3] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 12, 65)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    none, fused = model(idx, targets, return_logits=False)
    assert none is None
    torch.testing.assert_close(fused, loss, atol=1e-5, rtol=1e-5)
    fused.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {n}: {m}")
    # every target ignored: a defined 0 and zero gradients, not NaN
    model.zero_grad()
    _, zero = model(idx, torch.full_like(targets, -1), return_logits=False)
    zero.backward()
    assert zero.item() == 0.0 and all(not p.grad.any() for p in model.parameters())
    with pytest.raises(ValueError, match="needs targets"):
        model(idx, return_logits=False)


def _tp_fused_loss_body():
    ctx = get_ctx(tp=2)
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny()
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(0)
    sharded = tm.apply_tensor_parallel(tm.models.GPT2Model(cfg), ctx)
    idx = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    none, loss = sharded(idx, idx, return_logits=False)  # TP head: the gathered-logits path
    assert none is None
    torch.testing.assert_close(loss, ref(idx, idx, return_logits=False)[1], atol=1e-5, rtol=1e-5)


def test_tp_model_return_logits_false():
    world(2).run(_tp_fused_loss_body)


# ---------------------------------------------------------------- bad input

def test_bad_input_errors(monkeypatch):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        tm.ops.layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="non-empty last dim"):
        tm.ops.layer_norm(torch.randn(4, 0))
    with pytest.raises(TypeError, match="floating point"):
        tm.ops.layer_norm(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        tm.ops.bias_gelu(x, torch.ones(4))
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -1])
    with pytest.raises(ValueError, match="hidden has 8 features but weight has 6"):
        tm.ops.linear_cross_entropy(h, torch.randn(10, 6), t)
    with pytest.raises(ValueError, match="3 targets for 4 tokens"):
        tm.ops.linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match=r"vocab_size=11 must be in \[1, 10\]"):
        tm.ops.linear_cross_entropy(h, w, t, vocab_size=11)
    with pytest.raises(ValueError, match=r"target 9 is outside \[0, 5\)"):
        tm.ops.linear_cross_entropy(h, w, torch.tensor([1, 9, 2, 3]), vocab_size=5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        tm.ops.linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(TypeError, match="targets must be int64"):
        tm.ops.linear_cross_entropy(h, w, t.float())
    hr = h.clone().requires_grad_()
    loss, _, _ = torch.ops.tinymeg.linear_cross_entropy(hr, w, t, 10, -1, "mean", False)
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()
    monkeypatch.setenv("TINYMEG_OP_IMPL", "layer_norm=nope")
    tm.ops.get_default_tuner().forget()  # the environment is read when a choice is made
    with pytest.raises(ValueError, match=r"forces layer_norm='nope'.*\['fast', 'ref'\]"):
        tm.ops.layer_norm(x)
    monkeypatch.setenv("TINYMEG_OP_IMPL", "layer_norm")
    tm.ops.get_default_tuner().forget()  # the environment is read when a choice is made
    with pytest.raises(ValueError, match="expected 'op=impl,op=impl'"):
        tm.ops.layer_norm(x)
    monkeypatch.delenv("TINYMEG_OP_IMPL")
    monkeypatch.setenv("TINYMEG_AUTOTUNE", "yes")
    tm.ops.get_default_tuner().forget()  # the environment is read when a choice is made
    with pytest.raises(ValueError, match="TINYMEG_AUTOTUNE must be 0 or 1"):
        tm.ops.layer_norm(x)
    with pytest.raises(ValueError, match="measure_iterations >= 1"):
        RuntimeAutoTuner(measure_iterations=0)


# ---------------------------------------------------------------- DTensor sharding rules

def _dtensor_body():
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode
    mesh = get_ctx(tp=2).mesh["tp"]
    torch.manual_seed(0)  # same seed on both ranks: the same global tensors

    def dt(t, placement, grad=True):
        return distribute_tensor(t, mesh, [placement]).requires_grad_(grad and t.is_floating_point())

    def no_comm(fn):
        with CommDebugMode() as comm:
            out = fn()
        assert comm.get_total_counts() == 0, comm.get_comm_counts()
        return out

    def check(actual, expected, what):
        torch.testing.assert_close(actual.full_tensor(), expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")

    # layer_norm: rows sharded on any non-normalised dim, weight/bias replicated
    x, w, b = torch.randn(4, 6, 8), torch.randn(8), torch.randn(8)
    for d in (0, 1):
        xs, ws, bs = dt(x, Shard(d)), dt(w, Replicate()), dt(b, Replicate())
        torch.library.opcheck(torch.ops.tinymeg.layer_norm.default, (xs, ws, bs, 1e-5))
        y = no_comm(lambda: tm.ops.layer_norm(xs, ws, bs))
        assert y.placements == (Shard(d),)
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        y_ref = F.layer_norm(xr, (8,), wr, br)
        check(y, y_ref, f"layer_norm Shard({d})")
        dy = torch.randn_like(y_ref)
        dy_sharded = dt(dy, Shard(d), grad=False)
        no_comm(lambda: y.backward(dy_sharded))
        y_ref.backward(dy)
        assert xs.grad.placements == (Shard(d),) and ws.grad.placements == (Partial(),)
        for g, g_ref, what in ((xs.grad, xr.grad, "dx"), (ws.grad, wr.grad, "dw"), (bs.grad, br.grad, "db")):
            check(g, g_ref, f"layer_norm Shard({d}) {what}")

    # bias_gelu: any dim; sharded on the last dim, the bias is sharded alongside
    for d, bias_placement in ((0, Replicate()), (1, Replicate()), (2, Shard(0))):
        xs, bs = dt(x, Shard(d)), dt(b, bias_placement)
        torch.library.opcheck(torch.ops.tinymeg.bias_gelu.default, (xs, bs))
        y = no_comm(lambda: tm.ops.bias_gelu(xs, bs))
        assert y.placements == (Shard(d),)
        xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
        y_ref = F.gelu(xr + br, approximate="tanh")
        check(y, y_ref, f"bias_gelu Shard({d})")
        dy = torch.randn_like(y_ref)
        dy_sharded = dt(dy, Shard(d), grad=False)
        no_comm(lambda: y.backward(dy_sharded))
        y_ref.backward(dy)
        check(xs.grad, xr.grad, f"bias_gelu Shard({d}) dx")
        check(bs.grad, br.grad, f"bias_gelu Shard({d}) db")

    # linear_cross_entropy: replicated; or token-sharded with reduction="sum" (Partial loss)
    h, wt = torch.randn(6, 8), torch.randn(12, 8)
    t = torch.randint(0, 10, (6,))
    t[1] = -1
    for reduction, hp in (("mean", Replicate()), ("sum", Shard(0))):
        hs, ws, ts = dt(h, hp), dt(wt, Replicate()), dt(t, hp)
        torch.library.opcheck(torch.ops.tinymeg.linear_cross_entropy.default, (hs, ws, ts, 10, -1, reduction, True))
        loss = no_comm(lambda: tm.ops.linear_cross_entropy(hs, ws, ts, vocab_size=10, reduction=reduction))
        assert loss.placements == ((Partial(),) if reduction == "sum" else (Replicate(),))
        hr, wr = h.clone().requires_grad_(), wt.clone().requires_grad_()
        loss_ref = F.cross_entropy(hr @ wr[:10].T, t, ignore_index=-1, reduction=reduction)
        check(loss, loss_ref, f"linear_cross_entropy {reduction}")
        loss.full_tensor().backward()
        loss_ref.backward()
        check(hs.grad, hr.grad, f"linear_cross_entropy {reduction} grad_hidden")
        check(ws.grad, wr.grad, f"linear_cross_entropy {reduction} grad_weight")

    # a rule that needs data moved: x sharded on the normalised dim is gathered first
    x_last = dt(x, Shard(2), grad=False)
    with CommDebugMode() as comm:
        y = tm.ops.layer_norm(x_last)
    assert comm.get_comm_counts() == {torch.ops.c10d_functional.all_gather_into_tensor: 1}, comm.get_comm_counts()
    check(y, F.layer_norm(x, (8,)), "layer_norm after the gather")


def test_dtensor_sharding_rules():
    world(2).run(_dtensor_body)


# ---------------------------------------------------------------- the autotuner

class FakeClock:
    """Time moves only when a fake kernel says it ran: kernel costs are exact and free."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def __call__(self):
        return self.now

    def kernel(self, name, cost):
        """A kernel that costs ``cost`` seconds a call, or costs[i % len(costs)] on its i-th call."""
        costs = cost if isinstance(cost, (list, tuple)) else [cost]
        calls = []

        def run(x):
            self.now += costs[len(calls) % len(costs)]
            calls.append(name)
            self.calls.append(name)
            return x * 1.0
        return run


def _tuner(tmp_path, clock, measure_iterations=MIN_ROUNDS):
    """A tuner on the fake clock, whose kernels cost seconds: no budget (budget_s is tested alone),
    by default the fewest timed rounds in which a pick can beat the default."""
    return RuntimeAutoTuner(warmup_iterations=2, measure_iterations=measure_iterations, clock=clock,
                            enabled=True, cache_dir=tmp_path, budget_s=None)



def test_autotuner_picks_fastest_and_caches(tmp_path):
    clock = FakeClock()
    cands = {"slow": clock.kernel("slow", 3.0), "fast": clock.kernel("fast", 1.0), "mid": clock.kernel("mid", 2.0)}
    tuner = _tuner(tmp_path, clock)
    x = torch.ones(4, 8)
    assert tuner.choose("op", cands, (x,), default="slow") == "fast"
    key = tuner.key("op", (x,))
    assert tuner.timings[key] == pytest.approx({"slow": 3.0, "fast": 1.0, "mid": 2.0})
    # 1 verification call per non-default candidate + 1 for the default, then 2 warmup + 5 timed each
    assert len(clock.calls) == 1 + 2 + 3 * (2 + MIN_ROUNDS)
    clock.calls.clear()
    assert tuner.choose("op", cands, (x,), default="slow") == "fast"
    assert tuner.run("op", cands, (x,), default="slow") is not None
    assert clock.calls == ["fast"], "a cached choice is reused without timing"
    # another process (a fresh tuner) reads the disk cache
    clock.calls.clear()
    assert _tuner(tmp_path, clock).choose("op", cands, (x,), default="slow") == "fast"
    assert clock.calls == []
    assert json.loads((tmp_path / "autotune.json").read_text())["entries"] == {key: "fast"}
    # another shape or dtype is another key: timed again; shapes count in powers of two
    tuner.choose("op", cands, (x.double(),), default="slow")
    tuner.choose("op", cands, (torch.ones(2, 8),), default="slow")
    assert len(tuner.timings) == 3
    assert tuner.key("op", (torch.ones(3, 7),)) == tuner.key("op", (x,)) != tuner.key("op", (torch.ones(5, 8),))


def test_autotuner_never_times_untuned_candidates(tmp_path, monkeypatch):
    clock = FakeClock()
    cands = {"ref": clock.kernel("ref", 0.5), "chunked": clock.kernel("chunked", 1.0)}
    x = torch.ones(3)
    tuner = _tuner(tmp_path, clock)
    assert tuner.choose("op", cands, (x,), default="chunked", untuned=("ref",)) == "chunked"
    assert clock.calls == [], "ref is never run, and one candidate left is not timed"
    monkeypatch.setenv("TINYMEG_OP_IMPL", "op=ref")
    tuner.forget()
    assert tuner.choose("op", cands, (x,), default="chunked", untuned=("ref",)) == "ref", "forcing still works"


def test_autotuner_environment(tmp_path, monkeypatch):
    clock = FakeClock()
    cands = {"a": clock.kernel("a", 3.0), "b": clock.kernel("b", 1.0)}
    x = torch.ones(3)
    monkeypatch.setenv("TINYMEG_AUTOTUNE", "0")
    assert _tuner(tmp_path, clock).choose("op", cands, (x,), default="a") == "a"
    assert clock.calls == [], "TINYMEG_AUTOTUNE=0: the default, no timing"
    monkeypatch.setenv("TINYMEG_AUTOTUNE", "1")
    assert RuntimeAutoTuner(clock=clock, enabled=False, cache_dir=tmp_path).is_enabled(torch.device("cpu"))
    monkeypatch.delenv("TINYMEG_AUTOTUNE")
    assert RuntimeAutoTuner().is_enabled(torch.device("cpu")), "unset: on, on CPU as on CUDA"
    assert RuntimeAutoTuner().is_enabled(torch.device("cuda"))
    assert not RuntimeAutoTuner(enabled=False).is_enabled(torch.device("cpu"))
    monkeypatch.setenv("TINYMEG_OP_IMPL", "op=a, other=x")
    tuner = _tuner(tmp_path, clock)
    assert tuner.choose("op", cands, (x,), default="b") == "a"
    assert tuner.choose("op_backward", cands, (x,), default="b") == "a", "op=... also forces op_backward"
    monkeypatch.setenv("TINYMEG_OP_IMPL", "op=a,op_backward=b")
    assert tuner.choose("op_backward", cands, (x,), default="a") == "a", "read when the choice was made..."
    tuner.forget()
    assert tuner.choose("op_backward", cands, (x,), default="a") == "b", "...and again after forget()"
    assert clock.calls == []
    # TINYMEG_CACHE_DIR moves the default cache
    monkeypatch.setenv("TINYMEG_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert autotune.cache_path() == tmp_path / "elsewhere" / "autotune.json"


def test_autotuner_recovers_from_a_corrupt_cache(tmp_path):
    (tmp_path / "autotune.json").write_text('{"version": 1, "entries": {"op|cpu')
    clock = FakeClock()
    cands = {"a": clock.kernel("a", 3.0), "b": clock.kernel("b", 1.0)}
    with pytest.warns(RuntimeWarning, match="corrupt autotune cache"):
        assert _tuner(tmp_path, clock).choose("op", cands, (torch.ones(2),), default="a") == "b"
    data = json.loads((tmp_path / "autotune.json").read_text())  # rewritten, valid
    assert list(data["entries"].values()) == ["b"]
    assert not list(tmp_path.glob(".autotune.*")), "no temporary file left behind"


def test_autotuner_leaves_out_broken_and_wrong_candidates(tmp_path):
    clock = FakeClock()

    def broken(x):
        raise RuntimeError("kernel failed to compile")

    cands = {"ref": clock.kernel("ref", 3.0), "wrong": lambda x: x + 1, "broken": broken}
    with pytest.warns(RuntimeWarning) as record:
        assert _tuner(tmp_path, clock).choose("op", cands, (torch.ones(2),), default="ref") == "ref"
    messages = " ".join(str(r.message) for r in record)
    assert "'wrong' disagrees" in messages and "'broken' failed" in messages


def test_autotuner_keeps_the_default_unless_another_wins_beyond_the_noise(tmp_path):
    """A pick is cached for good, so one that may lose to the default must not be kept: a
    candidate faster by less than the margin, or faster at the median but not in 3 rounds of 4,
    leaves the default; one faster in every round by more than the margin is kept."""
    clock = FakeClock()
    default = clock.kernel("default", 1.0)
    near = clock.kernel("near", 0.97)                 # 3% faster: within the margin
    # any 8 calls in a row: 5 at 0.8 and 3 at 1.25, so 8 rounds have median 0.8 but 5 wins of 8
    erratic = clock.kernel("erratic", [0.8] * 5 + [1.25] * 3)
    clear = clock.kernel("clear", 0.9)                # 10% faster, every round
    x = torch.ones(2)
    for name, cand in (("near", near), ("erratic", erratic)):
        tuner = _tuner(tmp_path / name, clock, measure_iterations=8)
        assert tuner.choose("op", {"default": default, name: cand}, (x,), default="default") == "default"
        assert tuner.timings[tuner.key("op", (x,))][name] < 1.0, "faster at the median, yet not kept"
        assert json.loads((tmp_path / name / "autotune.json").read_text())["entries"] == {
            tuner.key("op", (x,)): "default"}, "the default is what is cached"
    tuner = _tuner(tmp_path / "all", clock)
    cands = {"default": default, "near": near, "erratic": erratic, "clear": clear}
    assert tuner.choose("op", cands, (x,), default="default") == "clear"


def test_a_tuning_failure_never_stops_a_run(tmp_path):
    """A candidate that passes its check and then raises while it is timed (out of memory on a
    later call, say) leaves the key to its default with one line of warning; nothing is cached
    (the next process tries again), and the key is not timed again in this one."""
    clock = FakeClock()
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) > 1:
            raise RuntimeError("out of memory\ntried to allocate 8.00 GiB")
        return x * 1.0

    tuner = _tuner(tmp_path, clock)
    cands, x = {"a": clock.kernel("a", 3.0), "flaky": flaky}, torch.ones(2)
    with pytest.warns(RuntimeWarning) as record:
        assert tuner.choose("op", cands, (x,), default="a") == "a"
    assert len(record) == 1, [str(r.message) for r in record]
    message = str(record[0].message)
    assert "\n" not in message and "RuntimeError: out of memory" in message and "keeps its default 'a'" in message
    assert not (tmp_path / "autotune.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n = len(calls)
        assert tuner.run("op", cands, (x,), default="a") is not None
        assert len(calls) == n, "decided: neither timed nor warned about again"


def test_bad_input_is_the_ops_error_not_tuner_warnings():
    """Where every candidate fails, the inputs are wrong: the user sees the op's error alone."""
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="reduction must be one of"):
            tm.ops.linear_cross_entropy(h, w, torch.tensor([1, 2, 3, -1]), vocab_size=10, reduction="none")


def test_bf16_candidates_agree_within_bf16_rounding(tmp_path):
    """A correct bf16 kernel is not reported as disagreeing, one 10% off still is. A bf16 op's
    float32 outputs (LayerNorm's mean and rstd) carry bf16 rounding; and where rows have large
    means aten's bf16 LayerNorm backward (the default) is far off float32 math in the weight's
    gradient (tens of percent) while the float32 'ref' is close to it: candidates are checked
    against the default run on float32 copies, allowing twice the default's own error."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 64, 128, generator=g) * 3 + 1).bfloat16()
    w, b = torch.randn(128, generator=g).bfloat16(), torch.randn(128, generator=g).bfloat16()
    args, fast = (x, w, b, 1e-5), norm.FORWARD["fast"]
    shifted = (torch.randn(512, 128, generator=g) + 50 * torch.randn(512, 1, generator=g)).bfloat16()
    _, mean, rstd = norm.forward_ref(shifted, w, b, 1e-5)
    dy = torch.randn(512, 128, generator=g).bfloat16()
    # a budget too small to time anything: the check is what runs
    tuner = RuntimeAutoTuner(enabled=True, cache_dir=tmp_path, budget_s=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuner.choose("layer_norm", cpu_impls(norm.FORWARD), args, "fast")
        tuner.choose("layer_norm_backward", cpu_impls(norm.BACKWARD), (dy, shifted, w, mean, rstd), "fast")

    def off(*a):
        y, mean, rstd = fast(*a)
        return y * 1.1, mean, rstd
    with pytest.warns(RuntimeWarning, match=r"'off' disagrees with 'fast' .*an output off by 0\.1"):
        tuner.choose("layer_norm", {"fast": fast, "off": off}, (x[:1], w, b, 1e-5), "fast")


def test_autotuner_never_times_while_compiling(tmp_path, monkeypatch):
    clock = FakeClock()
    cands = {"a": clock.kernel("a", 3.0), "b": clock.kernel("b", 1.0)}
    tuner = _tuner(tmp_path, clock)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuner.choose("op", cands, (torch.ones(2),), default="a") == "a"
    assert clock.calls == [] and tuner.choices == {}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    tuner.choose("op", cands, (torch.ones(2),), default="a")  # decided outside the trace...
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuner.choose("op", cands, (torch.ones(2),), default="a") == "b"  # ...and kept inside it


def test_default_tuner_drives_the_ops(tmp_path, monkeypatch):
    """End to end through the op: each op's kernel is timed from its own table, the fastest is
    kept, written, and is what runs. The forward and backward tables use the same names, so every
    kernel call is tagged with its table and costs fake time by (table, name): the forward's
    winner (ref) is not the backward's (fast), and neither is both defaults."""
    clock = FakeClock()
    cost = {("forward", "ref"): 1.0, ("forward", "fast"): 2.0, ("backward", "ref"): 2.0, ("backward", "fast"): 1.0}
    ran = []

    def tagged(f, tag):
        def run(*a):
            ran.append(tag)
            clock.now += cost[tag]
            return f(*a)
        return run

    for table, name in ((norm.FORWARD, "forward"), (norm.BACKWARD, "backward")):
        for impl, f in list(table.items()):
            monkeypatch.setitem(table, impl, tagged(f, (name, impl)))
    tuner = _tuner(tmp_path, clock)
    previous = tm.ops.set_default_tuner(tuner)
    try:
        x, w = torch.randn(3, 8, requires_grad=True), torch.ones(8, requires_grad=True)
        torch.ops.tinymeg.layer_norm(x, w, torch.zeros(8), 1e-5)[0].sum().backward()  # tunes both
        ran.clear()
        torch.ops.tinymeg.layer_norm(x, w, torch.zeros(8), 1e-5)[0].sum().backward()  # runs the choices
    finally:
        tm.ops.set_default_tuner(previous)
    chosen = {k.split("|")[0]: v for k, v in tuner.choices.items()}
    assert chosen == {"layer_norm": "ref", "layer_norm_backward": "fast"}
    assert ran == [("forward", "ref"), ("backward", "fast")]
    assert json.loads((tmp_path / "autotune.json").read_text())["entries"] == tuner.choices


def test_autotuner_budget_bounds_the_timing(tmp_path):
    """budget_s bounds the time one key spends being timed, all candidates together: after one
    call each (the check) and one more (the estimate), as many interleaved rounds as fit."""
    clock = FakeClock()
    cands = {"a": clock.kernel("a", 0.125), "b": clock.kernel("b", 0.375)}  # a round costs 0.5 s
    tuner = RuntimeAutoTuner(warmup_iterations=10, measure_iterations=100, clock=clock, enabled=True,
                             cache_dir=tmp_path, budget_s=4.0)
    assert tuner.choose("op", cands, (torch.ones(2),), default="b") == "a"
    assert clock.now == pytest.approx(0.5 * (1 + 1 + 8)), "check + estimate + 8 rounds (7 timed, 1 warmup)"
    assert clock.calls[-4:] == ["b", "a", "b", "a"], "calls interleave, the default first"
    clock.now = 0.0
    tight = RuntimeAutoTuner(warmup_iterations=10, measure_iterations=100, clock=clock, enabled=True,
                             cache_dir=tmp_path / "tight", budget_s=2.0)
    assert tight.choose("op", cands, (torch.ones(2),), default="b") == "b"
    assert clock.now == pytest.approx(0.5 * (1 + 1)), f"{MIN_ROUNDS} rounds do not fit: check + estimate, the default"
    # calls that slow down after the estimate (load arriving): past the budget, no round beyond the
    # fifth starts (the estimate planned 2 warmup + 18 timed rounds)
    clock.calls.clear()
    slowed = {k: clock.kernel(k, [0.05, 0.05] + [1.0] * 30) for k in ("a", "b")}
    RuntimeAutoTuner(warmup_iterations=10, measure_iterations=100, clock=clock, enabled=True,
                     cache_dir=tmp_path / "slowed", budget_s=2.0).choose("op", slowed, (torch.ones(2),), default="b")
    assert len(clock.calls) == 2 * (1 + 1 + 2 + MIN_ROUNDS)
    clock.now = 0.0
    unbounded = RuntimeAutoTuner(warmup_iterations=10, measure_iterations=100, clock=clock, enabled=True,
                                 cache_dir=tmp_path / "other", budget_s=None)
    assert unbounded.choose("op", cands, (torch.ones(2),), default="b") == "a"
    assert clock.now == pytest.approx(0.5 * (1 + 10 + 100)), "no budget: check + warmup + measure"
    with pytest.raises(ValueError, match="budget_s must be > 0"):
        RuntimeAutoTuner(budget_s=0)


def test_autotune_cache_is_written_with_the_users_permissions(tmp_path):
    """A cache file is created as open() would create it (0o666 less the umask), and a rewrite
    keeps the mode the file has: a shared cache directory stays readable by everyone."""
    clock = FakeClock()
    cands = {"a": clock.kernel("a", 3.0), "b": clock.kernel("b", 1.0)}
    path = tmp_path / "autotune.json"
    previous = os.umask(0o022)
    try:
        _tuner(tmp_path, clock).choose("op", cands, (torch.ones(2),), default="a")
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o664)  # a group-writable shared cache
        _tuner(tmp_path, clock).choose("op", cands, (torch.ones(4),), default="a")  # a new key: rewritten
        assert path.stat().st_mode & 0o777 == 0o664
        assert len(json.loads(path.read_text())["entries"]) == 2
    finally:
        os.umask(previous)


def test_forcing_a_kernel_the_backward_lacks_leaves_the_backward_to_the_tuner(monkeypatch):
    """linear_cross_entropy=chunked forces the forward kernel; its backward has no "chunked"
    (it has ref and fast), so the backward keeps its own choice instead of failing."""
    monkeypatch.setenv("TINYMEG_OP_IMPL", "linear_cross_entropy=chunked")
    torch.manual_seed(0)
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True)
    t = torch.tensor([0, 3, -1, 8, 2, 1])
    tm.ops.linear_cross_entropy(h, w, t, vocab_size=9).backward()
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.cross_entropy(hr @ wr[:9].T, t, ignore_index=-1).backward()
    torch.testing.assert_close(h.grad, hr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-5, rtol=1e-5)
    assert autotune.forced_choice("linear_cross_entropy_backward", cross_entropy.BACKWARD) is None
    assert autotune.forced_choice("layer_norm_backward", norm.BACKWARD) is None
    monkeypatch.setenv("TINYMEG_OP_IMPL", "linear_cross_entropy=ref")
    assert autotune.forced_choice("linear_cross_entropy_backward", cross_entropy.BACKWARD) == "ref"


def _autotune_ranks_body(tmp_dir):
    import torch.distributed as dist
    rank = dist.get_rank()
    clock = FakeClock()
    # rank-dependent clocks: rank 0 sees "a" fastest, rank 1 sees "b" fastest
    costs = {"a": 1.0, "b": 2.0} if rank == 0 else {"a": 2.0, "b": 1.0}
    cands = {k: clock.kernel(k, c) for k, c in costs.items()}

    def flaky(x):  # passes its check, then fails while rank 0 times it
        if clock.calls.count("flaky") and rank == 0:
            raise RuntimeError("out of memory")
        clock.calls.append("flaky")
        return x * 1.0

    old = os.environ.pop("TINYMEG_AUTOTUNE", None)  # the pool may have started with another test's
    try:
        tuner = RuntimeAutoTuner(warmup_iterations=1, measure_iterations=MIN_ROUNDS, clock=clock, enabled=True,
                                 cache_dir=f"{tmp_dir}/rank{rank}", budget_s=None)
        x = torch.ones(4)
        outside = tuner.choose("op", cands, (x,), default="b")
        timed_outside = list(clock.calls)
        with warnings.catch_warnings(record=True) as caught, tuner.synchronized():
            warnings.simplefilter("always")
            inside = tuner.choose("op", cands, (x,), default="b")
            again = tuner.choose("op", cands, (x,), default="b")  # memory hit: no collective
            timed_inside = len(clock.calls)
            failed = tuner.choose("flaky_op", {"a": cands["a"], "flaky": flaky}, (x,), default="a")
            # a new key on both ranks, but not the same one: every rank sees it at that collective
            diverged = tuner.choose("op", cands, (torch.ones(16 * (rank + 1)),), default="b")
            # from then on no collective: a key that only rank 1 meets would hang in one
            alone = tuner.choose("op", cands, (torch.ones(64),), default="b") if rank == 1 else "b"
        return (outside, timed_outside, inside, again, timed_inside, failed, diverged, alone,
                [str(w.message) for w in caught])
    finally:
        if old is not None:
            os.environ["TINYMEG_AUTOTUNE"] = old


def test_autotuner_agrees_across_ranks(tmp_path):
    """Rank 0 decides inside synchronized(), every rank takes its choice; nothing rank 0's tuning
    meets stops the run: a timing that fails gives every rank the default, and ranks that ask
    different questions all take the default at that collective and make no more (rank 0 warns)."""
    r0, r1 = world(2).run(_autotune_ranks_body, str(tmp_path))
    (out0, timed0, in0, again0, _, failed0, diverged0, _, warned0) = r0
    (out1, timed1, in1, again1, timed_inside1, failed1, diverged1, alone1, warned1) = r1
    assert out0 == out1 == "b" and timed0 == timed1 == [], "outside synchronized(): default, no collective"
    assert in0 == in1 == again0 == again1 == "a", "rank 0 decides for everyone"
    assert timed_inside1 == 0, "only rank 0 times"
    assert failed0 == failed1 == "a", "rank 0's timing failed: the default everywhere"
    assert diverged0 == diverged1 == alone1 == "b"
    assert len(warned0) == 2 and "timing flaky_op" in warned0[0] and "ranks ran different ops" in warned0[1]
    assert warned1 == []


def _moe_tuning_body(tmp_dir):
    """One training step of a MoE model whose routing gives each rank another number of token
    rows (rank 0 holds the experts of 13 of the 16 tokens of both ranks, rank 1 of 3),
    from an empty cache, tuning on, as the trainer's first step: under synchronized()."""
    import torch.distributed as dist
    from test_expert_parallel import _tokens, steer
    rank = dist.get_rank()
    cfg = tm.models.GPTConfig.tiny(n_layer=1, n_experts=4, top_k=1, expert_hidden=32)
    torch.manual_seed(0)
    model = tm.models.GPT2Model(cfg)
    steer(model)  # token t goes to expert t % 4; experts 0 and 1 live on rank 0
    model = tm.apply_hybrid_parallel(model, get_ctx(dp=2, ep=2), tm.gpt2_tp_config(cfg))
    classes = [0, 1, 0, 1, 0, 1, 0, 2] if rank == 0 else [0, 1, 0, 3]
    x, y = _tokens(classes)[None], _tokens(classes, offset=3)[None]
    old = os.environ.pop("TINYMEG_AUTOTUNE", None)  # the pool may have started with another test's
    previous = tm.ops.set_default_tuner(RuntimeAutoTuner(cache_dir=tmp_dir, budget_s=0.05))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with tm.ops.synchronized():
                model(x, y, return_logits=False)[1].backward()
            model(x, y, return_logits=False)[1].backward()  # decided: no collective, the same choices
        return tm.ops.get_default_tuner().choices, [str(w.message) for w in caught if "autotune" in str(w.message)]
    finally:
        tm.ops.set_default_tuner(previous)
        if old is not None:
            os.environ["TINYMEG_AUTOTUNE"] = old


def test_autotuner_agrees_across_ranks_on_moe_routing(tmp_path):
    """The rows a MoE routes to a rank's experts differ by rank (and by step): they are not part
    of grouped_mm's key, so every rank asks the same question and takes the same choice."""
    (choices0, warned0), (choices1, warned1) = world(2).run(_moe_tuning_body, str(tmp_path))
    assert warned0 == warned1 == []
    assert choices0 == choices1
    grouped = sorted(k for k in choices0 if k.startswith("grouped_mm"))
    assert {k.split("|")[0] for k in grouped} == {"grouped_mm", "grouped_mm_backward"}
    assert all("float32[*, " in k for k in grouped), grouped


# ---------------------------------------------------------------- GPU only (CUDA + triton)

needs_triton = pytest.mark.skipif(not HAS_CUDA_TRITON, reason="the triton kernels need CUDA and triton")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 768), (5, 1000), (2, 4096), (1, 3, 16384)])
def test_triton_layer_norm_and_bias_gelu(dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 3 + 1).to(dtype)
    c = shape[-1]
    w, b, dy = torch.randn(c, device="cuda").to(dtype), torch.randn(c, device="cuda").to(dtype), torch.randn_like(x)
    for weight, bias in ((w, b), (None, None)):
        y_ref, mean_ref, rstd_ref = norm.forward_ref(x, weight, bias, 1e-5)
        y, mean, rstd = norm.FORWARD["triton"](x, weight, bias, 1e-5)
        cond = max(1.0, rstd_ref.max().item())
        close(y, y_ref, dtype, "triton layer_norm y", cond)
        close(rstd, rstd_ref, torch.float32, "triton layer_norm rstd", cond)
        rows = math.sqrt(x.numel() // c)
        for g, g_ref, what, k in zip(norm.BACKWARD["triton"](dy, x, weight, mean_ref, rstd_ref),
                                     norm.backward_ref(dy, x, weight, mean_ref, rstd_ref), ("dx", "dw", "db"),
                                     (1, rows, rows)):
            close(g, g_ref, dtype, f"triton layer_norm {what}", cond * k)
    close(gelu.FORWARD["triton"](x, b), gelu.forward_ref(x, b), dtype, "triton bias_gelu")
    rows = math.sqrt(x.numel() // c)
    grads = zip(gelu.BACKWARD["triton"](dy, x, b), gelu.backward_ref(dy, x, b), ("dx", "db"), (1, rows))
    for g, g_ref, what, k in grads:
        close(g, g_ref, dtype, f"triton bias_gelu {what}", k)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,v,vocab", [(1, 8, 64, 60), (37, 64, 1000, 999), (513, 768, 50304, 50257)])
@pytest.mark.parametrize("ignored", ["some", "all"])
def test_triton_linear_cross_entropy(dtype, n, c, v, vocab, ignored):
    torch.manual_seed(0)
    h = torch.randn(n, c, device="cuda").to(dtype)
    w = (torch.randn(v, c, device="cuda") * 0.05).to(dtype)
    t = torch.randint(0, vocab, (n,), device="cuda")
    t[::3] = -1
    if ignored == "all":
        t[:] = -1
    for reduction in ("mean", "sum"):
        ref = cross_entropy.forward_ref(h, w, t, vocab, -1, reduction, True)
        out = cross_entropy.FORWARD["triton"](h, w, t, vocab, -1, reduction, True)
        for a, e, what in zip(out, ref, ("loss", "grad_hidden", "grad_weight")):
            # bf16: the triton path keeps the logits in bf16 (as cuBLAS returns them)
            torch.testing.assert_close(a, e, **LCE_TOL[dtype], msg=lambda m: f"triton {reduction} {what}: {m}")
        assert not out[2][vocab:].any()
        no_grad = cross_entropy.FORWARD["triton"](h, w, t, vocab, -1, reduction, False)
        torch.testing.assert_close(no_grad[0], out[0])


@needs_triton
def test_autotuner_on_cuda_picks_a_verified_kernel(tmp_path):
    """CUDA events time every candidate; whichever wins, it agrees with the default. A training
    step of layer_norm then bias_gelu times, for each op, its two paths (plain aten vs the
    custom op, forward + backward) and, inside the op path, the forward and backward kernels,
    the triton ones among them."""
    tuner = RuntimeAutoTuner(warmup_iterations=2, measure_iterations=5, cache_dir=tmp_path)
    previous = tm.ops.set_default_tuner(tuner)
    try:
        x = torch.randn(8, 128, 768, device="cuda", requires_grad=True)
        w = torch.randn(768, device="cuda", requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a triton kernel that fails or disagrees is a test failure here
            tm.ops.bias_gelu(tm.ops.layer_norm(x, w, w), w).sum().backward()
    finally:
        tm.ops.set_default_tuner(previous)
    timed = {key.split("|")[0]: set(times) for key, times in tuner.timings.items()}
    paths = {name: t for name, t in timed.items() if name.endswith(":fwd+bwd")}
    kernels = {name: t for name, t in timed.items() if not name.endswith(":fwd+bwd")}
    assert paths == {"layer_norm:fwd+bwd": {"plain", "op"}, "bias_gelu:fwd+bwd": {"plain", "op"}}, timed
    assert set(kernels) == {"layer_norm", "layer_norm_backward", "bias_gelu", "bias_gelu_backward"}, timed
    assert all(t >= {"fast", "triton"} for t in kernels.values()), timed
