"""Llama's custom ops, tinymeg::rms_norm and tinymeg::swiglu: registration (opcheck), every
implementation against the reference (forward and backward, fp32 and bf16), the plain path
against the op, DTensor sharding rules (no communication), bad input; Triton kernels on CUDA.

Tolerances as in test_ops.py: fp32 implementations differ by float reassociation only (1e-5);
bf16 by a few bf16 ulps where one implementation rounds an intermediate (3e-2). A parameter's
gradient sums rounding over the rows (as a random walk): its tolerance grows with sqrt(rows).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from tinymeg.ops import glu, rmsnorm

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
HAS_CUDA_TRITON = torch.cuda.is_available() and tm.ops._triton.AVAILABLE

pytestmark = pytest.mark.usefixtures("fresh_tuner")  # tests/conftest.py


def close(actual, expected, dtype, what, k=1.0):
    tol = {name: v * k for name, v in TOL[dtype].items()}
    if dtype == torch.bfloat16:  # an ulp of the operands, not of the result: a product that nearly
        # cancels (SwiGLU's dgate where silu' ~ 0) keeps its operands' absolute rounding
        tol["atol"] *= max(1.0, float(expected.float().abs().max()))
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def cpu_impls(table):
    return {k: f for k, f in table.items() if k != "triton"}


@pytest.mark.parametrize("shape,weight,dtype", [((3, 8), True, torch.float32), ((2, 5, 16), False, torch.float32),
                                                ((1, 1, 7), True, torch.float32), ((4, 32), True, torch.bfloat16)])
def test_opcheck(shape, weight, dtype):
    x = torch.randn(*shape).to(dtype).requires_grad_()
    w = torch.randn(shape[-1]).to(dtype).requires_grad_() if weight else None
    torch.library.opcheck(torch.ops.tinymeg.rms_norm.default, (x, w, 1e-6))
    # a backward op is not differentiable itself: it is checked with plain (no-grad) inputs
    wd = None if w is None else w.detach()
    rstd = torch.ops.tinymeg.rms_norm(x.detach(), wd, 1e-6)[1]
    torch.library.opcheck(torch.ops.tinymeg.rms_norm_backward.default, (torch.randn_like(x), x.detach(), wd, rstd))
    gate, up = (torch.randn(*shape).to(dtype).requires_grad_() for _ in range(2))
    torch.library.opcheck(torch.ops.tinymeg.swiglu.default, (gate, up))
    torch.library.opcheck(torch.ops.tinymeg.swiglu_backward.default,
                          (torch.randn_like(gate), gate.detach(), up.detach()))


lead_shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3)
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


@given(lead=lead_shapes, c=st.integers(1, 70), dtype=dtypes, weight=st.booleans(), seed=st.integers(0, 2**16),
       chunk=st.sampled_from([1, 7, 1 << 16]))
def test_rms_norm_implementations(lead, c, dtype, weight, seed, chunk):
    """Every kernel against the reference, chunks cut anywhere; inputs are never written."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, c, generator=g) * 3).to(dtype)
    w = torch.randn(c, generator=g).to(dtype) if weight else None
    dy = torch.randn(*lead, c, generator=g).to(dtype)
    x0, dy0 = x.clone(), dy.clone()
    y_ref, rstd_ref = rmsnorm.forward_ref(x, w, 1e-6)
    rows = math.sqrt(x.numel() // c)
    impls = {**cpu_impls(rmsnorm.FORWARD), "chunked": lambda *a: rmsnorm.forward_chunked(*a, chunk_elements=chunk)}
    for name, f in impls.items():
        y, rstd = f(x, w, 1e-6)
        close(y, y_ref, dtype, f"rms_norm {name} y")
        close(rstd, rstd_ref, torch.float32, f"rms_norm {name} rstd")
    dx_ref, dw_ref = rmsnorm.backward_ref(dy, x, w, rstd_ref)
    backs = {**cpu_impls(rmsnorm.BACKWARD),
             "chunked": lambda *a: rmsnorm.backward_chunked(*a, chunk_elements=chunk)}
    for name, f in backs.items():
        dx, dw = f(dy, x, w, rstd_ref)
        close(dx, dx_ref, dtype, f"rms_norm {name} dx")
        close(dw, dw_ref, dtype, f"rms_norm {name} dw", rows)
    assert torch.equal(x, x0) and torch.equal(dy, dy0), "a kernel wrote into its inputs"
    xr = x.float().requires_grad_()
    wr = None if w is None else w.float().requires_grad_()
    F.rms_norm(xr, (c,), wr, 1e-6).backward(dy.float())  # aten's autograd: the plain path's math
    close(dx_ref.float(), xr.grad, dtype, "rms_norm reference dx vs aten")


@given(lead=lead_shapes, c=st.integers(1, 70), dtype=dtypes, seed=st.integers(0, 2**16),
       chunk=st.sampled_from([1, 7, 1 << 16]))
def test_swiglu_implementations(lead, c, dtype, seed, chunk):
    g = torch.Generator().manual_seed(seed)
    gate, up, dy = ((torch.randn(*lead, c, generator=g) * 3).to(dtype) for _ in range(3))
    y_ref = glu.forward_ref(gate, up)
    impls = {**cpu_impls(glu.FORWARD), "chunked": lambda *a: glu.forward_chunked(*a, chunk_elements=chunk)}
    for name, f in impls.items():
        close(f(gate, up), y_ref, dtype, f"swiglu {name}")
    grads_ref = glu.backward_ref(dy, gate, up)
    backs = {**cpu_impls(glu.BACKWARD), "chunked": lambda *a: glu.backward_chunked(*a, chunk_elements=chunk)}
    for name, f in backs.items():
        for got, want, what in zip(f(dy, gate, up), grads_ref, ("dgate", "dup")):
            close(got, want, dtype, f"swiglu {name} {what}")
    gr, ur = gate.float().requires_grad_(), up.float().requires_grad_()
    (F.silu(gr) * ur).backward(dy.float())
    close(grads_ref[0].float(), gr.grad, dtype, "swiglu reference dgate vs aten")
    close(grads_ref[1].float(), ur.grad, dtype, "swiglu reference dup vs aten")


@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
def test_plain_path_is_what_the_op_computes(op):
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(3, 5, 24, generator=g), torch.randn(24, generator=g), 1e-6) if op == "rms_norm" else \
        (torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 24, generator=g))
    module = tm.ops.LLAMA_OPS[op]
    results = []
    for path in ("plain", "op"):
        leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        out = module.PATHS[path](*leaves)
        out.backward(out.detach())
        results.append([out.detach()] + [a.grad for a in leaves if isinstance(a, torch.Tensor)])
    for i, (p, o) in enumerate(zip(*results)):
        close(p, o, torch.float32, f"{op} output/grad {i}", math.sqrt(15) if i == 2 else 1.0)


def test_bad_input_errors_on_both_paths(monkeypatch):
    bad = [(tm.ops.rms_norm, (torch.randn(4, 8), torch.ones(7)), ValueError, r"rms_norm: weight must have shape \(8,\)"),
           (tm.ops.rms_norm, (torch.ones(4, 8, dtype=torch.long),), TypeError, "rms_norm: x must be floating point"),
           (tm.ops.swiglu, (torch.randn(4, 8), torch.randn(4, 7)), ValueError,
            r"swiglu: gate and up must have one shape, got \(4, 8\) and \(4, 7\)"),
           (tm.ops.swiglu, (torch.randn(4, 8), torch.ones(4, 8, dtype=torch.long)), TypeError,
            "swiglu: gate and up must be floating point")]
    for path in ("plain", "op"):
        monkeypatch.setenv("TINYMEG_OP_IMPL", f"rms_norm={path},swiglu={path}")
        tm.ops.get_default_tuner().forget()
        for fn, args, error, message in bad:
            with pytest.raises(error, match=message):
                fn(*args)
    tm.ops.get_default_tuner().forget()


def _dtensor_body():
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode
    mesh = get_ctx(tp=2).mesh["tp"]
    torch.manual_seed(0)  # same seed on both ranks: the same global tensors

    def dt(t, placement, grad=True):
        return distribute_tensor(t, mesh, [placement]).requires_grad_(grad)

    def no_comm(fn):
        with CommDebugMode() as comm:
            out = fn()
        assert comm.get_total_counts() == 0, comm.get_comm_counts()
        return out

    def check(actual, expected, what):
        torch.testing.assert_close(actual.full_tensor(), expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")

    x, w = torch.randn(4, 6, 8), torch.randn(8)
    for d in (0, 1):  # rms_norm: rows sharded on a non-normalised dim, the weight replicated
        xs, ws = dt(x, Shard(d)), dt(w, Replicate())
        torch.library.opcheck(torch.ops.tinymeg.rms_norm.default, (xs, ws, 1e-6))
        y = no_comm(lambda: tm.ops.rms_norm(xs, ws))
        assert y.placements == (Shard(d),)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y_ref = F.rms_norm(xr, (8,), wr, 1e-6)
        check(y, y_ref, f"rms_norm Shard({d})")
        dy = torch.randn_like(y_ref)
        dy_sharded = dt(dy, Shard(d), grad=False)
        no_comm(lambda: y.backward(dy_sharded))
        y_ref.backward(dy)
        assert xs.grad.placements == (Shard(d),) and ws.grad.placements == (Partial(),)
        check(xs.grad, xr.grad, f"rms_norm Shard({d}) dx")
        check(ws.grad, wr.grad, f"rms_norm Shard({d}) dw")
    up = torch.randn(4, 6, 8)
    for d in (0, 1, 2):  # swiglu: elementwise, gate and up sharded alike (column-parallel outputs: the last dim)
        gs, us = dt(x, Shard(d)), dt(up, Shard(d))
        torch.library.opcheck(torch.ops.tinymeg.swiglu.default, (gs, us))
        y = no_comm(lambda: tm.ops.swiglu(gs, us))
        assert y.placements == (Shard(d),)
        gr, ur = x.clone().requires_grad_(), up.clone().requires_grad_()
        y_ref = F.silu(gr) * ur
        check(y, y_ref, f"swiglu Shard({d})")
        dy = torch.randn_like(y_ref)
        dy_sharded = dt(dy, Shard(d), grad=False)
        no_comm(lambda: y.backward(dy_sharded))
        y_ref.backward(dy)
        check(gs.grad, gr.grad, f"swiglu Shard({d}) dgate")
        check(us.grad, ur.grad, f"swiglu Shard({d}) dup")


def test_dtensor_sharding_rules():
    world(2).run(_dtensor_body)


@pytest.mark.skipif(not HAS_CUDA_TRITON, reason="Triton kernels need CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 768), (5, 1000), (2, 4096), (1, 3, 16384)])
def test_triton_rms_norm_and_swiglu(dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 3 + 1).to(dtype)
    c = shape[-1]
    w, dy, up = torch.randn(c, device="cuda").to(dtype), torch.randn_like(x), torch.randn_like(x)
    rows = math.sqrt(x.numel() // c)
    for weight in (w, None):
        y_ref, rstd_ref = rmsnorm.forward_ref(x, weight, 1e-6)
        y, rstd = rmsnorm.FORWARD["triton"](x, weight, 1e-6)
        close(y, y_ref, dtype, "triton rms_norm y")
        close(rstd, rstd_ref, torch.float32, "triton rms_norm rstd")
        for got, want, what, k in zip(rmsnorm.BACKWARD["triton"](dy, x, weight, rstd_ref),
                                      rmsnorm.backward_ref(dy, x, weight, rstd_ref), ("dx", "dw"), (1, rows)):
            close(got, want, dtype, f"triton rms_norm {what}", k)
    close(glu.FORWARD["triton"](x, up), glu.forward_ref(x, up), dtype, "triton swiglu")
    for got, want, what in zip(glu.BACKWARD["triton"](dy, x, up), glu.backward_ref(dy, x, up), ("dgate", "dup")):
        close(got, want, dtype, f"triton swiglu {what}")
