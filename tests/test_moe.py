"""The MoE GPT-2 in one process: the layer against a token-by-token reference, the grouped
matmul op (opcheck, both kernels), the aux losses against their formulas, eval mode, the
dense model unchanged, bad configurations.

Tolerances: fp32, atol=rtol=1e-5 (float reassociation only: the grouped kernel and a per-token
loop sum the same products in another order).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from tinymeg.models.moe import MoE, moe_aux_loss
from tinymeg.ops import grouped
from tinymeg.train import build_optimizer
from tinymeg.train.routing import RoutingLog

TOL = dict(atol=1e-5, rtol=1e-5)


def _layer(E, k, C=16, hidden=32, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tm.models.GPTConfig.tiny(n_embd=C, n_experts=E, top_k=k, expert_hidden=hidden, bias=bias, **kw)
    layer = MoE(cfg, hidden, "gelu", bias)
    with torch.no_grad():  # non-zero biases and a router that is not near-uniform
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def _reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE written token by token: softmax, top-k, renormalised weights, k expert MLPs."""
    e = layer.experts
    probs = F.softmax(x @ layer.router.weight.T, dim=-1)
    weights, chosen = probs.topk(layer.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = []
    for t in range(x.shape[0]):
        y = 0
        for w, i in zip(weights[t], chosen[t]):
            h = x[t] @ e.fc_weight[i] + (e.fc_bias[i] if e.fc_bias is not None else 0)
            z = F.gelu(h, approximate="tanh") @ e.proj_weight[i] + (e.proj_bias[i] if e.proj_bias is not None else 0)
            y = y + w * z
        out.append(y)
    return torch.stack(out)


@given(E=st.integers(1, 6), k=st.integers(1, 6), n=st.integers(1, 20), hidden=st.sampled_from([32, 30]),
       bias=st.booleans(), impl=st.sampled_from(["grouped", "loop"]), seed=st.integers(0, 2**16))
def test_moe_layer_equals_token_by_token_reference(monkeypatch, E, k, n, hidden, bias, impl, seed):
    """Outputs and gradients (input, router, experts) of the grouped layer, with either kernel
    of tinymeg::grouped_mm (hidden=30 rows are unaligned: only the loop kernel can run)."""
    monkeypatch.setenv("TINYMEG_OP_IMPL", f"grouped_mm={impl if hidden == 32 else 'loop'}")
    layer = _layer(E, min(k, E), hidden=hidden, bias=bias, seed=seed)
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = _reference(layer, x_ref)
    torch.testing.assert_close(y, y_ref, **TOL)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *layer.parameters()], dy)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("dims,dtype", [((10, 8, 12), torch.float32), ((5, 3, 7), torch.float32),
                                        ((0, 8, 4), torch.float32), ((9, 8, 16), torch.bfloat16)])
def test_opcheck_grouped_mm(dims, dtype):
    M, K, N = dims
    x = torch.randn(M, K).to(dtype).requires_grad_()
    w = torch.randn(3, K, N).to(dtype).requires_grad_()
    offs = torch.tensor([min(M, 2), min(M, 2), M], dtype=torch.int32)  # an empty middle group
    torch.library.opcheck(torch.ops.tinymeg.grouped_mm.default, (x, w, offs))
    torch.library.opcheck(torch.ops.tinymeg.grouped_mm_backward.default,
                          (torch.randn(M, N).to(dtype), x.detach(), w.detach(), offs))


@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5), K=st.sampled_from([4, 8, 3]),
       N=st.sampled_from([4, 12, 5]), seed=st.integers(0, 2**16))
@example(sizes=[0, 0], K=4, N=4, seed=0)  # no rows at all (a rank no token was routed to)
def test_grouped_mm_kernels_agree(sizes, K, N, seed):
    """Both kernels, forward and backward, against a matmul per group (empty groups included).
    The candidates do not depend on the number of rows (the tuner leaves it out of the key: it
    differs by rank), so the grouped kernel takes no rows too, even with an empty gradient's
    zero strides (which torch._grouped_mm refuses)."""
    g = torch.Generator().manual_seed(seed)
    M = sum(sizes)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    if not M:
        x, dy = x.as_strided((0, K), (0, 0)), dy.as_strided((0, N), (0, 0))
    w = torch.randn(len(sizes), K, N, generator=g)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    parts = x.split(sizes)
    y_ref = torch.cat([p @ w[i] for i, p in enumerate(parts)])
    dx_ref = torch.cat([d @ w[i].T for i, d in enumerate(dy.split(sizes))])
    dw_ref = torch.stack([p.T @ d for p, d in zip(parts, dy.split(sizes))])
    impls, _ = grouped.candidates(grouped.FORWARD, x, w)
    assert set(impls) == ({"loop", "grouped"} if K % 4 == 0 and N % 4 == 0 else {"loop"})
    for name in impls:
        torch.testing.assert_close(grouped.FORWARD[name](x, w, offs), y_ref, **TOL)
        dx, dw = grouped.BACKWARD[name](dy, x, w, offs)
        torch.testing.assert_close(dx, dx_ref, **TOL)
        torch.testing.assert_close(dw, dw_ref, **TOL)


def test_aux_losses_follow_their_formulas():
    """Switch/GShard balance E * sum_e f_e P_e (f over the k*n slots, P the mean probability)
    and the z-loss mean(logsumexp^2), weighted, summed over layers into the training loss."""
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(n_experts=4, top_k=2, aux_loss_weight=0.3, z_loss_weight=0.2)
    model = tm.models.GPT2Model(cfg)
    seen = []
    for block in model.transformer.h:
        block.mlp.router.register_forward_hook(lambda _, args, out: seen.append(out.detach()))
    idx = torch.randint(0, 65, (3, 10))
    _, loss = model(idx, idx)
    expected = 0.0
    for logits in seen:
        probs = logits.softmax(-1)
        chosen = probs.topk(2, dim=-1).indices
        f = torch.bincount(chosen.flatten(), minlength=4).float() / chosen.numel()
        balance = 4 * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        expected = expected + 0.3 * balance + 0.2 * z
    torch.testing.assert_close(moe_aux_loss(model), expected, **TOL)
    model.eval()
    _, ce = model(idx, idx)
    torch.testing.assert_close(loss, ce + expected, **TOL)      # training loss = CE + aux
    assert all(b.mlp.aux_loss is None for b in model.transformer.h)  # eval: CE alone


def test_balance_loss_is_one_when_routing_is_uniform():
    """A router of zeros gives every expert probability 1/E; with k = E every expert gets every token."""
    layer = _layer(4, 4)
    layer.aux_loss_weight, layer.z_loss_weight = 1.0, 0.0
    torch.nn.init.zeros_(layer.router.weight)
    layer(torch.randn(6, 16))
    torch.testing.assert_close(layer.aux_loss, torch.tensor(1.0), **TOL)
    torch.testing.assert_close(layer.tokens_per_expert, torch.full((4,), 6.0))


def test_routing_log_reports_aux_loss_and_expert_fractions():
    torch.manual_seed(0)
    model = tm.models.GPT2Model(tm.models.GPTConfig.tiny(n_experts=4, top_k=1))
    log = RoutingLog(model)
    idx = torch.randint(0, 65, (2, 8))
    aux = []
    for _ in range(2):
        model(idx, idx)
        aux.append(moe_aux_loss(model).item())
        log.add()
    counts = torch.stack([b.mlp.tokens_per_expert for b in model.transformer.h])  # 16 tokens, k=1
    out = log.summary()
    assert out["aux_loss"] == pytest.approx(sum(aux) / 2)
    assert out["expert_frac_max"] == pytest.approx((counts.max() / 16).item())
    assert out["expert_frac_min"] == pytest.approx((counts.min() / 16).item())
    assert log.forwards == 0  # summary starts the next step afresh


def test_zero_experts_is_the_dense_model_bit_for_bit():
    cfg = tm.models.GPTConfig.tiny()
    torch.manual_seed(0)
    dense = tm.models.GPT2Model(cfg)
    torch.manual_seed(0)
    zero = tm.models.GPT2Model(tm.models.GPTConfig.tiny(n_experts=0, top_k=5))
    assert dense.state_dict().keys() == zero.state_dict().keys()
    for k, v in dense.state_dict().items():
        assert torch.equal(v, zero.state_dict()[k]), k
    idx = torch.randint(0, 65, (2, 8))
    assert torch.equal(dense(idx, idx)[1], zero(idx, idx)[1])


def test_moe_every_places_the_experts_and_sampling_works():
    torch.manual_seed(0)
    model = tm.models.GPT2Model(tm.models.GPTConfig.tiny(n_layer=4, n_experts=2, top_k=1, moe_every=2))
    kinds = [type(b.mlp).__name__ for b in model.transformer.h]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]
    out = model.eval().generate(torch.zeros(1, 1, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 6)
    # the optimizer keeps the experts' stacked biases out of weight decay
    opt = build_optimizer(model, 1e-3, 0.1)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    experts = model.transformer.h[1].mlp.experts
    assert id(experts.fc_bias) in no_decay and id(experts.fc_weight) not in no_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("kw,match", [
    (dict(n_experts=4, top_k=5), r"top_k=5 must be between 1 and n_experts=4"),
    (dict(n_experts=4, top_k=0), r"top_k=0 must be between 1 and n_experts=4"),
    (dict(n_experts=-1), r"need n_experts >= 0"),
    (dict(n_experts=2, moe_every=0), r"moe_every >= 1"),
])
def test_bad_moe_config_is_an_error(kw, match):
    with pytest.raises(ValueError, match=match):
        tm.models.GPTConfig.tiny(**kw)


def test_grouped_mm_bad_input_is_an_error():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"offs must be int32 of shape \(2,\)"):
        tm.ops.grouped_mm(x, w, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"x has K=8 columns but w has K=3"):
        tm.ops.grouped_mm(x, torch.randn(2, 3, 4), torch.tensor([1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x must be \(M, K\) and w \(G, K, N\)"):
        tm.ops.grouped_mm(x, torch.randn(8, 4), torch.tensor([4], dtype=torch.int32))


def test_expert_init_follows_gpt2():
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(n_layer=8, n_experts=8, n_embd=64, n_head=4)
    e = tm.models.GPT2Model(cfg).transformer.h[0].mlp.experts
    assert e.fc_weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert e.proj_weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(e.fc_bias, torch.zeros_like(e.fc_bias))


def _grouped_mm_sharding_body():
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode
    mesh = get_ctx(tp=2).mesh["tp"]
    torch.manual_seed(0)
    x, w, dy = torch.randn(7, 8), torch.randn(3, 8, 12), torch.randn(7, 12)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = tm.ops.grouped_mm(xr, wr, offs)
    y_ref.backward(dy)
    # replicated; column-parallel w (Shard(2)) -> y Shard(1); row-parallel x, w (Shard(1)) -> y Partial
    for px, pw, py in ((Replicate(), Replicate(), Replicate()), (Replicate(), Shard(2), Shard(1)),
                       (Shard(1), Shard(1), Partial())):
        xs = distribute_tensor(x, mesh, [px]).requires_grad_()
        ws = distribute_tensor(w, mesh, [pw]).requires_grad_()
        os_ = distribute_tensor(offs, mesh, [Replicate()])
        with CommDebugMode() as comm:
            y = tm.ops.grouped_mm(xs, ws, os_)
        assert comm.get_total_counts() == 0 and y.placements == (py,), (y.placements, comm.get_comm_counts())
        torch.testing.assert_close(y.full_tensor(), y_ref, **TOL)
        dy_r = distribute_tensor(dy, mesh, [Replicate()])
        y.backward(dy_r if py == Partial() else dy_r.redistribute(mesh, [py]))
        torch.testing.assert_close(xs.grad.full_tensor(), xr.grad, **TOL)
        torch.testing.assert_close(ws.grad.full_tensor(), wr.grad, **TOL)


def test_grouped_mm_sharding_rules():
    world(2).run(_grouped_mm_sharding_body)
