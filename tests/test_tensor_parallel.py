"""Tensor parallelism, proved against the unsharded model.

Tolerances (fp32): TP splits each row-parallel matmul's reduction into tp partial sums that
are added by an all-reduce, so results differ from the unsharded model by float reassociation
only: ~1e-7 relative per op, amplified through a few layers. atol=rtol=1e-5 is ~100x that
noise and far below any real bug (a wrong shard or a missing reduction is off by O(1)).
After one AdamW step the update is lr * g / (|g| + eps): a gradient that is zero in exact
arithmetic but ~1e-10 of float noise (q and k at T=1, where softmax has one entry) would become
a +-lr step of random sign, so the test's AdamW uses eps=1e-6, which leaves such noise at
<1e-7 and every real gradient's step unchanged.
"""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import tinymeg as tm
from tinymeg import compat
from rank_pool import get_ctx, world

ATOL = RTOL = 1e-5


def full(t):
    return compat.full_tensor(t)


def assert_close(actual, expected, what):
    torch.testing.assert_close(full(actual), expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def build_pair(cfg, seed, ctx, tp_config=None):
    torch.manual_seed(seed)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(seed)
    sharded = tm.apply_tensor_parallel(tm.models.GPT2Model(cfg), ctx, tp_config)
    return ref, sharded


def compare_training_step(ref, sharded, idx, targets, sharded_kwargs=None):
    """Logits, loss, every gradient and the parameters after one AdamW step must agree.
    sharded_kwargs: how the sharded model computes its loss (e.g. return_logits=False)."""
    ref_logits, ref_loss = ref(idx, targets)
    if sharded_kwargs:
        with torch.no_grad():
            assert_close(sharded(idx)[0], ref_logits, "logits")
        loss = sharded(idx, targets, **sharded_kwargs)[1]
    else:
        logits, loss = sharded(idx, targets)
        assert_close(logits, ref_logits, "logits")
    assert_close(loss, ref_loss, "loss")
    ref_loss.backward()
    loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, ref_params[name].grad, f"grad of {name}")
    for model in (ref, sharded):
        torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1).step()
    for name, p in sharded.named_parameters():
        assert_close(p, ref_params[name].detach(), f"{name} after AdamW")


def _gpt2_body(tp, cfg_kwargs, batch, seq, seed, tp_config=None, sharded_kwargs=None):
    ctx = get_ctx(tp=tp)
    cfg = tm.models.GPTConfig(**cfg_kwargs)
    ref, sharded = build_pair(cfg, seed, ctx, tp_config)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    if targets.numel() > 1:
        targets[0, 0] = -1  # ignored positions must stay ignored under TP
    compare_training_step(ref, sharded, idx, targets, sharded_kwargs)


@given(tp=st.sampled_from([1, 2, 4]), heads_per_rank=st.integers(1, 2), head_dim=st.sampled_from([4, 8]),
       n_layer=st.integers(1, 2), vocab=st.integers(5, 90), pad_to_tp=st.booleans(),
       batch=st.integers(1, 3), seq=st.integers(1, 12), seed=st.integers(0, 2**16), bias=st.booleans())
def test_gpt2_tp_equals_unsharded(tp, heads_per_rank, head_dim, n_layer, vocab, pad_to_tp, batch, seq, seed, bias):
    n_head = tp * heads_per_rank
    cfg = dict(block_size=16, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_head * head_dim,
               bias=bias, vocab_multiple=tp if pad_to_tp else 64)
    world(tp).run(_gpt2_body, tp, cfg, batch, seq, seed)


@given(tp=st.sampled_from([2, 4]), heads_per_rank=st.integers(1, 2), n_layer=st.integers(1, 2),
       batch=st.integers(1, 2), seq_per_rank=st.integers(1, 3), seed=st.integers(0, 2**16), bias=st.booleans())
def test_sequence_parallel_equals_unsharded(tp, heads_per_rank, n_layer, batch, seq_per_rank, seed, bias):
    n_head = tp * heads_per_rank
    cfg = dict(block_size=16, vocab_size=65, n_layer=n_layer, n_head=n_head, n_embd=n_head * 4, bias=bias)
    sp = {**tm.GPT2_TP_CONFIG, "sequence_parallel": True}
    world(tp).run(_gpt2_body, tp, cfg, batch, seq_per_rank * tp, seed, sp)


@given(tp=st.sampled_from([2, 4]), sp=st.booleans(), vocab=st.integers(5, 200), n_layer=st.integers(1, 2),
       batch=st.integers(1, 2), seq_per_rank=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_loss_parallel_equals_unsharded(tp, sp, vocab, n_layer, batch, seq_per_rank, seed):
    """The loss from vocab-sharded logits (the fused path, return_logits=False) against the
    unsharded model's F.cross_entropy; with and without sequence parallel."""
    cfg = dict(block_size=16, vocab_size=vocab, n_layer=n_layer, n_head=tp, n_embd=tp * 8)
    plan = {**tm.GPT2_TP_CONFIG, "loss_parallel": True, "sequence_parallel": sp}
    world(tp).run(_gpt2_body, tp, cfg, batch, seq_per_rank * tp, seed, plan, {"return_logits": False})


def _largest_loss_tensor(model, idx):
    """Bytes of the largest tensor any op creates in the loss's forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    Largest.nbytes = max(Largest.nbytes, t.numel() * t.element_size())
            return out
    x = torch.randn(idx.shape[0], idx.shape[1], model.config.n_embd, requires_grad=True)
    with Largest():
        from tinymeg.models.base import lm_head_loss
        lm_head_loss(model.lm_head, x, idx, model.config.vocab_size).backward()
    return Largest.nbytes


def _loss_memory_body(tp):
    ctx = get_ctx(tp=tp)
    cfg = tm.models.GPTConfig.tiny(vocab_size=2048, n_embd=16, n_head=tp)
    idx = torch.randint(0, cfg.vocab_size, (4, 32))
    _, gathered = build_pair(cfg, 0, ctx)
    _, sharded = build_pair(cfg, 0, ctx, {**tm.GPT2_TP_CONFIG, "loss_parallel": True})
    full_logits = idx.numel() * cfg.padded_vocab_size * 4
    assert _largest_loss_tensor(gathered, idx) >= full_logits          # the gathered logits exist
    assert _largest_loss_tensor(sharded, idx) <= full_logits // tp     # only this rank's vocab slice


@pytest.mark.parametrize("tp", [2, 4])
def test_loss_parallel_never_holds_the_full_logits(tp):
    world(tp).run(_loss_memory_body, tp)


def _module_body(tp, kind, rows, cols, batch, seed):
    """Each parallel module alone against its torch.nn twin: output, input grad, weight grads."""
    from tinymeg.nn import ColumnParallelLinear, LayerNorm, RowParallelLinear, VocabParallelEmbedding
    from tinymeg.nn.layers import replicate_module
    ctx = get_ctx(tp=tp)
    mesh, r = ctx.mesh["tp"], ctx.tp_rank
    torch.manual_seed(seed)
    if kind == "embedding":
        ref = torch.nn.Embedding(rows, cols)
        par = VocabParallelEmbedding.from_embedding(ref, mesh)
        x = torch.randint(0, rows, (batch, 5))
        x_par = x
    elif kind == "layernorm":
        ref = torch.nn.LayerNorm(cols)
        with torch.no_grad():
            ref.weight.normal_(), ref.bias.normal_()
        par = replicate_module(copy.deepcopy(ref), mesh)
        assert isinstance(par, LayerNorm)
        x = torch.randn(batch, 3, cols, requires_grad=True)
        x_par = x.detach().clone().requires_grad_()
    else:
        ref = torch.nn.Linear(cols, rows)
        x = torch.randn(batch, 3, cols, requires_grad=True)
        if kind == "row":
            par = RowParallelLinear.from_linear(ref, mesh)
            x_par = x.detach().chunk(tp, -1)[r].clone().requires_grad_()
        else:  # column / column_qkv: gather the output to compare it whole
            par = ColumnParallelLinear.from_linear(ref, mesh, 3 if kind == "column_qkv" else 1, gather_output=True)
            x_par = x.detach().clone().requires_grad_()
    y_ref, y = ref(x), par(x_par)
    if kind == "column_qkv":  # gathered rank by rank, [q0 k0 v0 | q1 k1 v1 ...]: back to [q0 q1 .. | k.. | v..]
        y = torch.cat([torch.cat(y.chunk(3 * tp, -1)[i::3], -1) for i in range(3)], -1)
    assert_close(y, y_ref, f"{kind} output")
    y_ref.pow(2).sum().backward()
    y.pow(2).sum().backward()
    if kind != "embedding":
        expected = x.grad.chunk(tp, -1)[r] if kind == "row" else x.grad
        assert_close(x_par.grad, expected, f"{kind} input grad")
    for name, p in par.named_parameters():
        assert_close(p.grad, dict(ref.named_parameters())[name].grad, f"{kind} grad of {name}")


@given(tp=st.sampled_from([1, 2, 4]), kind=st.sampled_from(["column", "column_qkv", "row", "embedding", "layernorm"]),
       rows_per_rank=st.integers(1, 4), cols_per_rank=st.integers(1, 4), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_each_parallel_module_equals_torch_nn(tp, kind, rows_per_rank, cols_per_rank, batch, seed):
    rows = rows_per_rank * tp * (3 if kind == "column_qkv" else 1)
    world(tp).run(_module_body, tp, kind, rows, cols_per_rank * tp, batch, seed)


def _placements_body():
    ctx = get_ctx(tp=2)
    ref, sharded = build_pair(tm.models.GPTConfig.tiny(), 0, ctx)
    expected = {"attn.c_attn.weight": _StridedShard(0, split_factor=3), "attn.c_attn.bias": _StridedShard(0, split_factor=3),
                "mlp.c_fc.weight": Shard(0), "mlp.c_fc.bias": Shard(0),
                "c_proj.weight": Shard(1), "c_proj.bias": Replicate(),
                "wte.weight": Shard(0), "wpe.weight": Replicate()}
    for name, p in sharded.named_parameters():
        assert isinstance(p, DTensor), name
        want = next((v for k, v in expected.items() if name.endswith(k)), Replicate())  # LayerNorms
        assert p.placements == (want,), f"{name}: {p.placements} != {want}"
    assert sharded.lm_head.weight is sharded.transformer.wte.weight, "lm_head must stay tied to wte"
    # the local q|k|v shard holds this rank's heads of q, of k and of v
    w = ref.transformer.h[0].attn.c_attn.weight
    mine = torch.cat([c.chunk(2)[ctx.tp_rank] for c in w.chunk(3)])
    assert torch.equal(sharded.transformer.h[0].attn.c_attn.weight.to_local(), mine)
    ref_sd, sd = ref.state_dict(), sharded.state_dict()
    assert ref_sd.keys() == sd.keys()
    for k in sd:
        assert torch.equal(full(sd[k]), ref_sd[k]), f"state_dict[{k}] differs when gathered"


def test_placements_and_global_state_dict():
    world(2).run(_placements_body)


def _local_grads_body(seed):
    """tinymeg.nn.layers.local (its cheaper backward) gives a parameter the gradient that
    DTensor.to_local gives it: the same placements, shape, stride and values."""
    from torch.distributed.tensor import distribute_tensor
    from tinymeg.nn.layers import local
    mesh = get_ctx(tp=2).mesh["tp"]
    torch.manual_seed(seed)
    full_w = torch.randn(12, 8)
    placements = [Shard(0), Shard(1), Replicate()]
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13):  # the reference, torch 2.11's
        placements.append(_StridedShard(0, split_factor=3))                  # to_local backward, fails on it
    for placement in placements:
        p = torch.nn.Parameter(distribute_tensor(full_w, mesh, [placement]))
        c = torch.randn(p.to_local().t().shape)
        # as is, transposed (a non-contiguous gradient), and both (a tied weight: the grads accumulate)
        for loss in (lambda get: get(p).pow(2).sum(), lambda get: (get(p).t() * c).sum(),
                     lambda get: get(p).pow(2).sum() + (get(p).t() * c).sum()):
            grads = []
            for get in (local, lambda t: t.to_local()):
                loss(get).backward()
                grads.append(p.grad)
                p.grad = None
            mine, want = grads
            assert isinstance(mine, DTensor) and mine.placements == want.placements, placement
            assert (mine.shape, mine.stride()) == (want.shape, want.stride()), placement
            assert mine.to_local().stride() == want.to_local().stride(), placement
            assert torch.equal(mine.to_local(), want.to_local()), placement
    with torch.no_grad():  # no graph: the plain to_local
        assert local(p).grad_fn is None


@given(seed=st.integers(0, 2**16))
def test_local_parameter_gradient_equals_to_local(seed):
    world(2).run(_local_grads_body, seed)


def _comm_body(tp):
    from torch.distributed.tensor.debug import CommDebugMode
    c10d = torch.ops.c10d_functional
    ctx = get_ctx(tp=tp)
    cfg = tm.models.GPTConfig.tiny(n_layer=3)
    _, model = build_pair(cfg, 0, ctx)
    x = torch.randn(2, 8, cfg.n_embd, requires_grad=True)

    block = model.transformer.h[0]
    with CommDebugMode() as fwd:
        y = block(x)
    with CommDebugMode() as bwd:
        y.sum().backward()
    assert fwd.get_comm_counts() == {c10d.all_reduce: 2}, fwd.get_comm_counts()
    assert bwd.get_comm_counts() == {c10d.all_reduce: 2}, bwd.get_comm_counts()

    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    with CommDebugMode() as step:
        model(idx, idx)[1].backward()
    # per block 2+2 all-reduces; embedding: 1 forward; lm_head: 1 all-gather forward and the
    # all-reduce of its input's gradient in backward.
    assert step.get_comm_counts() == {c10d.all_reduce: 4 * cfg.n_layer + 2, c10d.all_gather_into_tensor: 1}


def test_megatron_communication_counts():
    world(2).run(_comm_body, 2)


def _sp_dropout_body():
    import torch.distributed as dist
    ctx = get_ctx(tp=2)
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(dropout=0.5)
    model = tm.apply_tensor_parallel(tm.models.GPT2Model(cfg), ctx, {**tm.GPT2_TP_CONFIG, "sequence_parallel": True})
    seen = {}
    for name in ("transformer.drop", "transformer.h.0.mlp.dropout"):
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out == 0))
    idx = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    model(idx)
    first = dict(seen)
    torch.manual_seed(5)
    model(idx)
    for name in first:
        assert torch.equal(first[name], seen[name]), f"{name}: masks must be reproducible from the seed"
    masks = [None, None]
    dist.all_gather_object(masks, first)
    replicated, sharded = "transformer.drop", "transformer.h.0.mlp.dropout"
    assert torch.equal(masks[0][replicated], masks[1][replicated]), "replicated region: same mask on every TP rank"
    assert first[sharded].shape[1] == 4, "the MLP dropout runs on a sequence shard"
    assert not torch.equal(masks[0][sharded], masks[1][sharded]), "sequence shards: a different mask per rank"


def test_sequence_parallel_dropout_masks():
    world(2).run(_sp_dropout_body)


def _replicas_body():
    """Each rank builds its model from another seed (as a script that seeds nothing would): after
    apply_tensor_parallel on (dp2, tp2), the dp replicas hold dp rank 0's shards, so the same input
    gives the same loss everywhere, and each tp shard is its dp-rank-0 counterpart's."""
    ctx = get_ctx(dp=2, tp=2)
    torch.manual_seed(100 + ctx.rank)
    model = tm.apply_tensor_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx)
    idx = torch.arange(16).view(1, 16) % 65
    loss = model(idx, idx)[1].item()
    first = {n: p.to_local().clone() for n, p in model.named_parameters()}
    for t in first.values():
        torch.distributed.broadcast(t, group=ctx.mesh["dp"].get_group(), group_src=0)
    same = all(torch.equal(t, p.to_local()) for t, p in zip(first.values(), model.parameters()))
    return loss, same


def test_tensor_parallel_on_a_mesh_with_dp_makes_the_replicas_agree():
    """The README's first example applied TP on (tp2, dp2): before, the dp replicas kept their own
    random weights and gave other losses for one input (10.0958 vs 10.0367), silently."""
    results = world(4).run(_replicas_body)
    assert all(same for _, same in results), results
    assert len({loss for loss, _ in results}) == 1, results
