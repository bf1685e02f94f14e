"""torch.compile(fullgraph=True) on GPT-2, unsharded and tensor-parallel, gives eager's results.

fullgraph=True turns any graph break into an error, so passing means one graph with tinymeg's
ops (by default their plain paths, which inductor fuses; forced, the custom ops, opaque to the
compiler: their fake kernels are traced), the functional collectives and the DTensor
parameters' to_local() inside it. Compiling on CPU costs seconds (inductor
writes and builds C++), so the models are tiny and the tests few.

Tolerance: inductor fuses and reorders float32 arithmetic in the ops it generates, so results
differ from eager by reassociation only; atol=rtol=1e-5 as in the TP tests.
"""
import pytest
import torch

import tinymeg as tm
from rank_pool import get_ctx, world
from tinymeg.nn import local as _local

ATOL = RTOL = 1e-5


def _step(fn, model, idx, targets, return_logits):
    model.zero_grad(set_to_none=True)
    logits, loss = fn(idx, targets, return_logits=return_logits)
    loss.backward()
    return logits, loss.detach(), {n: _local(p.grad).clone() for n, p in model.named_parameters()}


def check_compiled_matches_eager(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                                 return_logits: bool = True) -> None:
    """Reusable for any built (sharded or not) model with GPT2Model's forward: one training
    step eager, one compiled with fullgraph=True, and logits, loss and every gradient agree."""
    eager = _step(model, model, idx, targets, return_logits)
    compiled = _step(torch.compile(model, fullgraph=True), model, idx, targets, return_logits)
    if return_logits:
        torch.testing.assert_close(compiled[0], eager[0], atol=ATOL, rtol=RTOL, msg=lambda m: f"logits: {m}")
    else:
        assert compiled[0] is None and eager[0] is None
    torch.testing.assert_close(compiled[1], eager[1], atol=ATOL, rtol=RTOL, msg=lambda m: f"loss: {m}")
    for name, g in eager[2].items():
        torch.testing.assert_close(compiled[2][name], g, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad of {name}: {m}")


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    targets[0, :2] = -1
    return idx, targets


@pytest.mark.parametrize("force", ["", "layer_norm=op,bias_gelu=op,linear_cross_entropy=op"])
def test_compile_unsharded_model(monkeypatch, force):
    """Default: the plain paths, which inductor fuses. Forced: tinymeg's custom ops inside the
    compiled graph (what a compiled model runs where an op is kept, e.g. the loss of a big vocabulary)."""
    monkeypatch.setenv("TINYMEG_OP_IMPL", force)
    previous = tm.ops.set_default_tuner(tm.ops.RuntimeAutoTuner())  # one that reads this environment
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(n_layer=1)
    model = tm.models.GPT2Model(cfg)
    idx, targets = _batch(cfg)
    try:
        check_compiled_matches_eager(model, idx, targets, return_logits=True)
        check_compiled_matches_eager(model, idx, targets, return_logits=False)  # the fused loss
    finally:
        tm.ops.set_default_tuner(previous)


def _tp_compile_body():
    ctx = get_ctx(tp=2)
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(n_layer=1)
    model = tm.apply_tensor_parallel(tm.models.GPT2Model(cfg), ctx)
    check_compiled_matches_eager(model, *_batch(cfg))


def test_compile_tensor_parallel_model():
    world(2).run(_tp_compile_body)


def _hybrid_compile_body():
    ctx = get_ctx(dp=2, tp=2)
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(n_layer=1)
    plan = {**tm.GPT2_TP_CONFIG, "sequence_parallel": True, "loss_parallel": True}
    model = tm.apply_hybrid_parallel(tm.models.GPT2Model(cfg), ctx, plan)
    idx, targets = _batch(cfg, seed=ctx.dp_rank)  # dp ranks see different data
    check_compiled_matches_eager(model, idx, targets, return_logits=False)


def test_compile_hybrid_tp_dp_model_with_sequence_and_loss_parallel():
    world(4).run(_hybrid_compile_body)


def _sp_dropout_compile_body():
    """SP with dropout > 0 compiles with fullgraph=True (per-rank masks are plain tensor code,
    no torch.Generator), trains reproducibly from the seed, and a bad token id still fails
    the compiled step (an async assert, no graph break). Compiled and eager dropout draw
    different numbers (inductor's RNG), so the two are not compared value for value."""
    ctx = get_ctx(tp=2)
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(n_layer=1, dropout=0.3)
    model = tm.apply_tensor_parallel(tm.models.GPT2Model(cfg), ctx, {**tm.GPT2_TP_CONFIG, "sequence_parallel": True})
    idx, targets = _batch(cfg)
    compiled_model = torch.compile(model, fullgraph=True)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(_step(compiled_model, model, idx, targets, False))
    assert torch.isfinite(runs[0][1])
    assert torch.equal(runs[0][1], runs[1][1]), "same seed, same masks"
    assert all(torch.equal(runs[0][2][n], runs[1][2][n]) for n in runs[0][2])
    assert not torch.equal(runs[0][1], runs[2][1]), "another seed, other masks"
    bad = idx.clone()
    bad[0, 0] = 1000
    try:
        compiled_model(bad, targets, return_logits=False)
    except RuntimeError as e:
        assert "token id is outside [0, 128)" in str(e), e
    else:
        raise AssertionError("an id outside the vocabulary must fail the compiled step")


def test_compile_sequence_parallel_with_dropout():
    world(2).run(_sp_dropout_compile_body)
