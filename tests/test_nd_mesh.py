"""The whole N-D mesh: the trainer on meshes of up to 8 ranks equals one process.

Each mesh trains a few steps through ``tinymeg.train.trainer.train`` (which builds the model
through ``tm.parallelize``: pp, tp, cp, ep, dp in DESIGN.md's order) on the same global batch as
one process, and must log the same losses, gradient norms and validation loss (fp32, rel 1e-5);
where the parameters are cheap to gather, the final parameters too. One 8-rank pool call per
mesh. (Every pair of dims, through tinymeg.train.verify: tests/test_compose.py.)
"""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import tinymeg as tm
from rank_pool import get_ctx, world
from test_tensor_parallel import full
from tinymeg.train import TrainConfig, train

GLOBAL_BATCH = 8
BASE = dict(steps=3, n_layer=2, n_head=4, n_embd=32, seq_len=16, lr=3e-3, min_lr=3e-4, warmup=1,
            grad_clip=0.5, seed=3, eval_every=3, eval_iters=1, sample_tokens=0, progress=False)
RTOL = 1e-5  # also the parameters' atol, as tests/test_trainer_reference.py: AdamW amplifies float noise in tiny gradients


def _whole_params(model, ctx) -> dict | None:
    """Every parameter of the whole model, unsharded, on rank 0 (each pp stage sends its own)."""
    mine = {name: full(p).detach().clone() for name, p in model.named_parameters()}
    if ctx.pp_size > 1:
        stages = [None] * ctx.pp_size
        dist.all_gather_object(stages, mine, group=ctx.mesh["pp"].get_group())
        mine = {k: v for stage in stages for k, v in stage.items()}
    return mine if dist.get_rank() == 0 else None


def _train_body(runs: list[dict], with_params: bool):
    out = []
    for kw in runs:
        cfg = TrainConfig(**{**BASE, **kw})
        ctx = get_ctx(dp=cfg.dp, tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, ep=cfg.ep)
        result = train(cfg, ctx=ctx)
        norms = [r["grad_norm"] for r in result["records"]]
        params = _whole_params(result["model"], ctx) if with_params else None
        out.append((result["losses"], norms, result["val_loss"], params))
    return out


def _reference(**kw):
    """One process on the same global batch (GLOBAL_BATCH sequences in one micro-batch)."""
    return world(1).run(_train_body, [dict(micro_batch=GLOBAL_BATCH, **kw)], True)[0][0]


def _assert_equal(got, want, what, params=True):
    losses, norms, val, p = got
    assert losses == pytest.approx(want[0], rel=RTOL), (what, losses, want[0])
    assert norms == pytest.approx(want[1], rel=RTOL), (what, norms, want[1])
    assert val == pytest.approx(want[2], rel=RTOL), (what, val, want[2])
    if params and p is not None:
        assert p.keys() == want[3].keys(), what
        for name in p:
            torch.testing.assert_close(p[name], want[3][name], rtol=RTOL, atol=RTOL, msg=f"{what}: {name}")


def test_pp2_dp2_tp2_equals_one_process():
    """Pipeline (1F1B and interleaved) x data (ZeRO 0 and 2) x tensor parallel with sequence and
    loss parallelism, micro-batches of 2 sequences in 2 pipeline microbatches, 2 accumulated."""
    ref = _reference()
    runs = [dict(pp=2, dp=2, tp=2, micro_batch=2, grad_accum=2, sequence_parallel=True, loss_parallel=True),
            dict(pp=2, dp=2, tp=2, micro_batch=2, grad_accum=2, zero=2, pp_schedule="interleaved-1f1b",
                 pp_stages_per_rank=2, n_layer=4)]
    ref4 = _reference(n_layer=4)
    results = world(8).run(_train_body, runs, True)
    for rank_results in results:
        _assert_equal(rank_results[0], ref, "pp2 dp2 tp2 1f1b sp lp")
        _assert_equal(rank_results[1], ref4, "pp2 dp2 tp2 interleaved zero2", params=False)  # ZeRO: shards


def test_dp2_cp2_tp2_equals_one_process():
    ref = _reference()
    results = world(8).run(_train_body, [dict(dp=2, cp=2, tp=2, micro_batch=4, sequence_parallel=True)], True)
    for (got,) in results:
        _assert_equal(got, ref, "dp2 cp2 tp2 sp")


def test_dp4_ep2_tp2_moe_equals_one_process():
    moe = dict(n_experts=4, top_k=2)
    ref = _reference(**moe)
    results = world(8).run(_train_body, [dict(dp=4, ep=2, tp=2, micro_batch=2, **moe)], False)
    for (got,) in results:
        _assert_equal(got, ref, "dp4 ep2 tp2 moe", params=False)  # experts are laid out over ep


def test_pp2_with_moe_ep_and_with_zero3_equal_one_process():
    """pp2 dp2 ep2 with a MoE model: a forward is one pipeline microbatch of every dp rank (the
    batch is laid out so: tinymeg.data.get_batch's microbatches), so one process on the same global
    batch runs grad_accum x microbatches = 4 micro-steps of dp x micro_batch / microbatches = 2
    sequences. And pp2 dp2 with ZeRO-3: FSDP2 on each stage."""
    moe = dict(n_experts=4, top_k=2)
    ref_moe = world(1).run(_train_body, [dict(micro_batch=2, grad_accum=4, **moe)], False)[0][0]
    ref = _reference()
    runs = [dict(pp=2, dp=2, ep=2, micro_batch=2, grad_accum=2, **moe),
            dict(pp=2, dp=2, zero=3, micro_batch=2, grad_accum=2, pp_schedule="gpipe")]
    for moe_run, zero3_run in world(4).run(_train_body, runs, False):
        _assert_equal(moe_run, ref_moe, "pp2 dp2 ep2 moe", params=False)
        _assert_equal(zero3_run, ref, "pp2 dp2 zero3", params=False)


def test_parallelize_refuses_pipeline_options_without_pp():
    ctx = SimpleNamespace(pp_size=1)
    with pytest.raises(ValueError, match=r"pipeline options \['schedule'\] given, but the mesh has pp=1"):
        tm.parallelize(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx, pipeline=dict(schedule="gpipe"))
