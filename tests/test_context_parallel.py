"""Context parallelism, proved against one process on the same sequences.

The ring op against F.scaled_dot_product_attention (outputs and dq/dk/dv, both block kernels);
GPT-2 under cp=2, cp=4, (cp=2, tp=2) with and without sequence/loss parallel, and (cp=2, dp=2)
against the unsharded model (logits, loss, every gradient, the parameters after an AdamW step);
sequence lengths down to one token per chunk; targets ignored unevenly across the cp ranks;
the bytes the ring sends against the theory; compile; checkpoints across cp sizes; sampling;
the trainer and the recipe; every error.

Tolerance: fp32, atol=rtol=1e-5 as in the TP tests (test_tensor_parallel.py explains why the
AdamW step uses a large eps). Here eps=1e-4: a bias gradient summed over cp ranks can cancel to
~1e-7 with ~2e-8 of reassociation noise, which eps=1e-6 turns into a 2e-5 step difference
(hypothesis found one: seed 12694); eps=1e-4 keeps it below 1e-6.
The ring merges attention blocks with the online-softmax rule, so outputs differ from
the one-process kernel by float reassociation only (~1e-7); a wrong chunk, mask or position is
off by O(1).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import tinymeg as tm
from tinymeg import compat
from rank_pool import get_ctx, world
from test_tensor_parallel import assert_close
from tinymeg.parallel.context_parallel import check_seq_len, layout_index, ring_attention, ring_stats
from tinymeg.train import TrainConfig, train
from tinymeg.train.cli import parse_args

# (dims, sequence parallel + loss parallel)
MESHES_4 = [({"cp": 4}, False), ({"cp": 2, "tp": 2}, False), ({"cp": 2, "tp": 2}, True), ({"cp": 2, "dp": 2}, False)]


# ---- the layout (no ranks) ----

@given(cp=st.integers(1, 8), chunk=st.integers(1, 6))
def test_layout_is_a_balanced_permutation(cp, chunk):
    T = 2 * cp * chunk
    held = [layout_index(T, cp, r) for r in range(cp)]
    assert torch.equal(torch.cat(held).sort().values, torch.arange(T)), "every token on exactly one rank"
    assert held[0].tolist() == [*range(chunk), *range(T - chunk, T)]   # chunks 0 and 2cp-1
    work = {int((h + 1).sum()) for h in held}                           # keys each rank's queries see
    assert len(work) == 1, f"causal work per rank differs: {work}"


def test_sequence_length_checks_name_the_length_and_the_multiple():
    check_seq_len(8, 2)
    with pytest.raises(ValueError, match=r"2 x cp = 4 equal chunks, but the sequence length is 6: use a multiple of 4"):
        check_seq_len(6, 2)
    check_seq_len(16, 2, tp_seq=4)
    with pytest.raises(ValueError, match=r"each rank's 6 of the 12 tokens are split again over tp: use a "
                                         r"sequence length that is a multiple of 8"):
        check_seq_len(12, 2, tp_seq=4)


# ---- the ring op against one process ----

def _ring_op_body(cp, B, H, chunk, D, seed, block):
    ctx = get_ctx(cp=cp)
    T = 2 * cp * chunk
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, T, D, generator=g)
    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)
    want = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)

    mine = layout_index(T, cp, ctx.cp_rank)
    ql, kl, vl = (t.detach()[:, :, mine].clone().requires_grad_() for t in (q, k, v))
    ring_stats().reset()
    out = ring_attention(ql, kl, vl, ctx.mesh["cp"], block)
    out.backward(dout[:, :, mine])
    assert_close(out, want[:, :, mine], "ring attention output")
    # SDPA's layout, (B, T, H, D) in memory: attention's transpose + reshape is then a view, so
    # c_proj saves the storage ring attention saves, not a copy (activations exactly 1/cp)
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    for name, local, full in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
        assert_close(local.grad, full.grad[:, :, mine], name)
    kv_bytes = 2 * B * H * (T // cp) * D * 4
    stats = ring_stats()
    # forward: k,v on cp-1 hops; backward: k,v again and dk,dv (fp32) on cp-1 hops each
    assert stats.per_phase == {"forward": (cp - 1) * kv_bytes, "backward": 2 * (cp - 1) * kv_bytes}, stats
    # the diagonal block (2 chunks x 2 chunks) and a half block per hop: fully masked blocks skipped
    assert stats.pairs == 4 * chunk * chunk + (cp - 1) * 2 * chunk * chunk, stats


@given(cp=st.sampled_from([2, 4]), B=st.integers(1, 2), H=st.integers(1, 3), chunk=st.integers(1, 5),
       D=st.sampled_from([4, 8]), seed=st.integers(0, 2**16), block=st.sampled_from(["flash", "math"]))
def test_ring_attention_equals_full_causal_attention(cp, B, H, chunk, D, seed, block):
    world(cp).run(_ring_op_body, cp, B, H, chunk, D, seed, block)


def _opcheck_body():
    ctx = get_ctx(cp=2)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, requires_grad=True) for _ in range(3))
    name = ctx.mesh["cp"].get_group().group_name
    for block in ("math", "flash"):
        torch.library.opcheck(torch.ops.tinymeg.ring_attention.default, (q, k, v, name, 0.5, block))


def test_ring_attention_passes_opcheck():
    """Schema, fake kernel (shapes, strides, dtypes), autograd registration, AOT dispatch."""
    world(2).run(_opcheck_body)


# ---- GPT-2 under cp, against one process on the same global batch ----

def _batch(cfg, n_seq, seq, seed, ignored):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (n_seq, seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (n_seq, seq), generator=g)
    y[:, :ignored] = -1  # all on cp rank 0: the loss must still be the mean over counted tokens
    return x, y


def _gpt2_body(dims, sp_lp, chunk, seed, ignored):
    ctx = get_ctx(**dims)
    tp_seq = ctx.tp_size if sp_lp else 1
    seq = 2 * ctx.cp_size * chunk * tp_seq
    cfg = tm.models.GPTConfig.tiny(block_size=seq)
    torch.manual_seed(seed)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(seed)
    model = tm.parallelize(tm.models.GPT2Model(cfg), ctx, sequence_parallel=sp_lp, loss_parallel=sp_lp)
    assert type(model.transformer.h[0].attn.core_attention).__name__ == "RingAttention"
    micro = 2
    x, y = _batch(cfg, ctx.dp_size * micro, seq, seed, min(ignored, seq - 1))
    mine = slice(ctx.dp_rank * micro, (ctx.dp_rank + 1) * micro)

    ref_logits, ref_loss = ref(x, y)
    with torch.no_grad():
        assert_close(model(x[mine])[0], ref_logits[mine], "logits")
    logits, loss = model(x[mine], y[mine])
    assert_close(logits, ref_logits[mine], "logits (with targets)")
    rank_loss = F.cross_entropy(ref_logits[mine].flatten(0, 1), y[mine].flatten(), ignore_index=-1)
    assert_close(loss, rank_loss.detach(), "loss")
    fused = model(x[mine], y[mine], return_logits=False)[1]   # the training path: no logits
    assert_close(fused, rank_loss.detach(), "loss (return_logits=False)")
    model.zero_grad(set_to_none=True)
    ref_loss.backward()
    fused.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, ref_params[name].grad, f"grad of {name}")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.1) for m in (ref, model)]
    for opt in opts:
        opt.step()
    for name, p in model.named_parameters():
        assert_close(p, ref_params[name].detach(), f"{name} after an AdamW step")


@given(chunk=st.integers(1, 3), seed=st.integers(0, 2**16), ignored=st.integers(0, 3))
@example(chunk=1, seed=12694, ignored=1)  # a cancelling bias gradient (see the tolerance note)
def test_cp2_equals_one_process(chunk, seed, ignored):
    world(2).run(_gpt2_body, {"cp": 2}, False, chunk, seed, ignored)


@given(mesh=st.sampled_from(MESHES_4), chunk=st.integers(1, 2), seed=st.integers(0, 2**16), ignored=st.integers(0, 3))
def test_cp_with_tp_sp_dp_equals_one_process(mesh, chunk, seed, ignored):
    dims, sp_lp = mesh
    world(4).run(_gpt2_body, dims, sp_lp, chunk, seed, ignored)


def _logits_backward_body():
    """A loss computed from the gathered logits (not the model's own): their backward keeps each
    rank's rows, scaled for DP's average over cp, and the gradients are the unsharded ones."""
    ctx = get_ctx(cp=2)
    cfg = tm.models.GPTConfig.tiny(block_size=8)
    torch.manual_seed(0)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(0)
    model = tm.parallelize(tm.models.GPT2Model(cfg), ctx)
    x, _ = _batch(cfg, 2, 8, 0, ignored=0)
    weights = torch.randn(2, 8, cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    for m in (ref, model):
        (m(x)[0] * weights).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_params[name].grad, f"grad of {name} through the logits")


def test_gradients_through_gathered_logits_equal_unsharded():
    world(2).run(_logits_backward_body)


def _compile_body():
    ctx = get_ctx(cp=2)
    cfg = tm.models.GPTConfig.tiny(n_layer=1, block_size=16)
    models = []
    for compiled in (False, True):
        torch.manual_seed(0)
        models.append(tm.parallelize(tm.models.GPT2Model(cfg), ctx, compile=compiled))
    x, y = _batch(cfg, 2, 16, 0, ignored=2)
    losses = []
    for model in models:
        loss = model(x, y, return_logits=False)[1]
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[1], losses[0], "compiled loss")
    eager = dict(models[0].named_parameters())
    for name, p in models[1].named_parameters():
        assert_close(p.grad, eager[name].grad, f"compiled grad of {name}")


def test_cp_model_compiles_fullgraph_and_matches_eager():
    """tm.parallelize(compile=True): one graph (fullgraph) around the ring op, DP hooks after."""
    world(2).run(_compile_body)


def _generate_body():
    ctx = get_ctx(cp=2)
    cfg = tm.models.GPTConfig.tiny()
    torch.manual_seed(0)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(0)
    model = tm.parallelize(tm.models.GPT2Model(cfg), ctx)
    prompt = torch.tensor([[1, 2, 3]])
    outs = [m.generate(prompt, 12, top_k=5, generator=torch.Generator().manual_seed(1)) for m in (ref, model)]
    assert torch.equal(outs[0], outs[1]), outs
    assert model.context_parallel.enabled, "generate must turn context parallelism back on"
    return outs[1].tolist()


def test_generation_runs_without_cp_and_equals_unsharded():
    out = world(2).run(_generate_body)
    assert out[0] == out[1]


# ---- errors ----

def _raises(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


class _NoPositions(torch.nn.Module):
    """Attention CP can reach, but a forward that cannot be told the tokens' positions."""

    def __init__(self):
        super().__init__()
        self.core_attention = tm.models.CausalAttention()

    def forward(self, idx, targets=None):
        return self.core_attention(idx, idx, idx)


def _errors_body():
    from test_foreign_model import LlamaForCausalLM
    ctx = get_ctx(cp=2)
    cfg = tm.models.GPTConfig.tiny()
    model = tm.parallelize(tm.models.GPT2Model(cfg), ctx)
    x = torch.randint(0, 65, (2, 6))
    _raises(lambda: model(x, x), ValueError, r"sequence length is 6: use a multiple of 4")
    _raises(lambda: model(torch.randint(0, 65, (1, 36))), ValueError, r"sequence length 36 exceeds block_size 32")
    model(x[:, :4], x[:, :4])[1].backward()   # the error happened before any communication: ranks go on
    _raises(lambda: tm.apply_context_parallel(model, ctx), ValueError, r"already applied to this model; apply it once")
    _raises(lambda: tm.apply_context_parallel(LlamaForCausalLM(), ctx), TypeError,
            r"module 'model.layers.0.self_attn' \(LlamaAttention\) computes attention itself.*"
            r"call a tinymeg.models.CausalAttention")
    _raises(lambda: tm.apply_context_parallel(torch.nn.Sequential(torch.nn.Linear(4, 4)), ctx), TypeError,
            r"Sequential has no tinymeg.models.CausalAttention module")
    _raises(lambda: tm.apply_context_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny(dropout=0.1)), ctx),
            ValueError, r"'transformer.h.0.attn.core_attention' has attention dropout 0.1.*GPTConfig\(dropout=0.0\)")
    _raises(lambda: tm.apply_context_parallel(_NoPositions(), ctx), TypeError,
            r"_NoPositions is not a tinymeg.models.CausalLM: context parallelism gives each rank its tokens and "
            r"their positions in the whole sequence")
    _raises(lambda: model(x[:, :4], pos=torch.arange(4)), ValueError, r"places its tokens itself")
    _raises(lambda: tm.apply_context_parallel(tm.models.GPT2Model(cfg), ctx, block="triton"),
            ValueError, r"'auto', 'math' or 'flash', got 'triton'")
    q = torch.zeros(1, 4, 4, 8)
    _raises(lambda: ring_attention(q, q[:, :2], q[:, :2], ctx.mesh["cp"]), ValueError,
            r"q, k and v of one shape.*repeat grouped k/v heads first")


def _bf16_count_body():
    """The cp ranks' token counts are summed in float32 whatever the loss's dtype: in bf16 (which
    holds integers exactly only up to 256) 1001 + 1003 tokens were counted as 2000."""
    from tinymeg.parallel.context_parallel import _MeanOverCP
    ctx = get_ctx(cp=2)
    mean = torch.tensor(2.0 + ctx.cp_rank, dtype=torch.bfloat16, requires_grad=True)
    loss, count = _MeanOverCP.apply(mean, torch.tensor(1001 + 2 * ctx.cp_rank), ctx.mesh["cp"])
    assert count.item() == 2004
    assert loss.item() == pytest.approx((2 * 1001 + 3 * 1003) / 2004, rel=1e-6)
    loss.backward()
    assert mean.grad.dtype == torch.bfloat16


def test_cp_mean_counts_tokens_exactly_under_bf16():
    world(2).run(_bf16_count_body)


def test_errors_name_the_problem_and_the_fix():
    world(2).run(_errors_body)


def _pp_ep_body():
    dense = tm.models.GPT2Model(tm.models.GPTConfig.tiny())
    _raises(lambda: tm.parallelize(dense, get_ctx(dp=2, ep=2)), ValueError, "ep=2 shards experts, but GPT2Model has no MoE")


def test_parallelize_refuses_what_it_cannot_apply():
    world(2).run(_pp_ep_body)


# ---- the trainer: losses, checkpoints across cp sizes ----

TINY = dict(steps=8, n_layer=2, n_head=4, n_embd=32, seq_len=16, eval_every=4, eval_iters=2, micro_batch=4,
            sample_tokens=0, progress=False, lr=3e-3, warmup=2)


def _train_body(dims, **kw):
    import torch.distributed as dist
    out = train(TrainConfig(**{**TINY, **dims, **kw}), ctx=get_ctx(**dims))
    state = {n: compat.full_tensor(p).detach().clone()
             for n, p in out["model"].named_parameters()}
    return {"losses": out["losses"], "val_loss": out["val_loss"], "state": state if dist.get_rank() == 0 else None}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return world(1).run(_train_body, {})[0]


def test_trainer_with_cp_logs_the_losses_of_one_process(one_process, tmp_path):
    """8 steps of AdamW (and eval) under cp=2 x tp=2 with sequence parallel and cp=4 against
    one process. rel 1e-5: float reassociation compounded over 8 steps stays ~1e-6 here."""
    for dims, kw in (({"cp": 2, "tp": 2}, {"sequence_parallel": True}), ({"cp": 4}, {})):
        got = world(4).run(_train_body, dims, **kw)[0]
        assert got["losses"] == pytest.approx(one_process["losses"], rel=1e-5), dims
        assert got["val_loss"] == pytest.approx(one_process["val_loss"], rel=1e-5), dims


def test_cp2_checkpoint_resumes_with_cp1(one_process, tmp_path):
    d = str(tmp_path / "ck")
    straight = world(2).run(_train_body, {"cp": 2}, ckpt_dir=d, ckpt_every=4)[0]
    assert straight["losses"] == pytest.approx(one_process["losses"], rel=1e-5)
    resumed = world(1).run(_train_body, {}, ckpt_dir=str(tmp_path / "ck1"), resume_from=f"{d}/step_000004")[0]
    assert resumed["losses"] == pytest.approx(straight["losses"][4:], rel=1e-5)
    for name, p in resumed["state"].items():
        torch.testing.assert_close(p, straight["state"][name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_recipe_flags_for_cp(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_args(["--cp", "2", "--tp", "2", "--seq-len", "128"]).cp == 2
    assert parse_args(["--cp", "2"]).dp == 2   # dp inferred: the ranks cp leaves
    with pytest.raises(SystemExit):
        parse_args(["--cp", "2", "--dp", "1"])
    assert "cp=2 x tp=1 = 2 ranks, but the world has 4 processes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--cp", "4", "--seq-len", "20"])
    assert "--seq-len 20: context parallelism cuts each sequence into 2 x cp = 8 equal chunks" in capsys.readouterr().err
