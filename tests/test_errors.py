"""Every bad input gets a clear error that says what is wrong; one test each."""
import os
import subprocess
import sys

import pytest
import torch

import tinymeg as tm
from rank_pool import get_ctx, world


def _raises(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def _context_errors_body():
    _raises(lambda: tm.ParallelContext(tp=4), ValueError, r"cannot infer dp: the world has 2 processes, "
            r"which pp=1 x cp=1 x tp=4 = 4 does not divide")
    _raises(lambda: tm.ParallelContext(tp=4, dp=1), ValueError, r"tp=4 = 4 ranks, but the world has 2 processes")
    _raises(lambda: tm.ParallelContext({"tp": 2, "dp": 2}), ValueError, r"world has 2 processes")
    _raises(lambda: tm.ParallelContext(zp=2), ValueError, r"unknown mesh dim 'zp'")
    _raises(lambda: tm.ParallelContext(ep=2, dp=1, tp=2), ValueError, r"ep=2 must divide dp=1")
    _raises(lambda: tm.ParallelContext(dp=-2), ValueError, r"'dp' must be an integer >= 1 \(or -1")
    _raises(lambda: tm.ParallelContext(tp=0, dp=2), ValueError, r"'tp' must be an integer >= 1")
    _raises(lambda: tm.ParallelContext({"tp": 2}, tp=2), ValueError, r"given twice")


def test_parallel_context_errors():
    world(2).run(_context_errors_body)


def _context_attrs_body():
    ctx = tm.ParallelContext({"tp": 2, "dp": 2})
    ctx_kw = get_ctx(dp=2, tp=2)
    assert (ctx.dp_size, ctx.tp_size) == (ctx_kw.dp_size, ctx_kw.tp_size) == (2, 2)
    assert ctx.mesh["tp"].size() == 2 and ctx.mesh["dp"].size() == 2
    assert ctx.device == torch.device("cpu")
    return ctx.dp_rank, ctx.tp_rank


def test_parallel_context_layout():
    # (dp, tp) layout: tp ranks are neighbours
    assert world(4).run(_context_attrs_body) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_single_process_without_torchrun_is_a_one_rank_world():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    code = "import tinymeg as tm; c = tm.ParallelContext(); print(c.tp_size, c.dp_size, c.world_size, c.device)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1", "cpu"]


def _tp_errors_body():
    ctx = get_ctx(tp=2)
    tiny = tm.models.GPTConfig.tiny
    model = lambda **kw: tm.models.GPT2Model(tiny(**kw))  # noqa: E731
    _raises(lambda: tm.apply_tensor_parallel(model(), ctx, {"column_linear_patterns": ["attn.q_proj"]}),
            ValueError, r"pattern 'attn.q_proj' matches no module")
    _raises(lambda: tm.apply_tensor_parallel(model(), ctx, {"column_linear_patterns": ["ln_1"]}),
            TypeError, r"'transformer.h.0.ln_1' is a LayerNorm; ColumnParallel shards nn.Linear \(or a subclass")
    _raises(lambda: tm.apply_tensor_parallel(model(), ctx, {"vocab_embedding_patterns": ["c_fc"]}),
            TypeError, r"VocabParallel shards nn.Embedding \(or a subclass")
    # 3 heads of width 8: 24 features split in 2, but heads cannot be
    _raises(lambda: tm.apply_tensor_parallel(model(n_head=3, n_embd=24), ctx),
            ValueError, r"n_head=3, not divisible by tp=2")
    _raises(lambda: tm.apply_tensor_parallel(model(n_embd=15, n_head=1), ctx, {"row_linear_patterns": ["attn.c_proj"]}),
            ValueError, r"15 input features, not divisible by tp=2")
    _raises(lambda: tm.apply_tensor_parallel(model(n_embd=15, n_head=1), ctx, {"column_linear_patterns": ["attn.c_attn"]}),
            ValueError, r"45 output features in 3 chunk\(s\), not divisible by tp=2")
    _raises(lambda: tm.apply_tensor_parallel(model(vocab_multiple=1), ctx, {**tm.GPT2_TP_CONFIG, "vocab_embedding_patterns": ["wte"]}),
            ValueError, r"has 65 rows, not divisible by tp=2: pad the vocabulary")
    done = tm.apply_tensor_parallel(model(), ctx)
    _raises(lambda: tm.apply_tensor_parallel(done, ctx), ValueError, r"applied to it before")
    _raises(lambda: tm.apply_tensor_parallel(model().to("meta"), ctx), ValueError, r"is on meta but the mesh is on cpu")
    _raises(lambda: tm.apply_tensor_parallel(model(), ctx, {"column_linear_patterns": "attn.c_attn"}),
            TypeError, r"must be a list of patterns")
    _raises(lambda: tm.apply_tensor_parallel(model(), ctx, {"colum_linear_patterns": ["attn.c_attn"]}),
            ValueError, r"key 'colum_linear_patterns' is neither")

    sp = {**tm.GPT2_TP_CONFIG, "sequence_parallel": True}
    _raises(lambda: tm.apply_tensor_parallel(model(), ctx, sp)(torch.zeros(1, 3, dtype=torch.long)),
            ValueError, r"sequence length is 3: use a multiple of 2")
    _raises(lambda: tm.apply_tensor_parallel(model(), ctx, {**sp, "sequence_parallel_entry": "transformer.blocks.0"}),
            ValueError, r"sequence_parallel_entry 'transformer.blocks.0' is not a module")


def test_apply_tensor_parallel_errors():
    world(2).run(_tp_errors_body)


def test_pattern_matching_rules():
    from tinymeg.parallel.plan import matches
    assert matches("attn.c_attn", "transformer.h.3.attn.c_attn")
    assert not matches("attn.c_attn", "transformer.h.3.xattn.c_attn")  # dot boundary
    assert matches("h.*.mlp.c_fc", "transformer.h.11.mlp.c_fc")
    assert not matches("c_fc", "transformer.h.0.mlp.c_fc_extra")


def _context_nd_body(dims):
    import torch.distributed as dist
    ctx = tm.ParallelContext(dims)
    # every view's group holds the ranks its mesh says, in the world mesh's (pp, dp, cp, tp) layout
    views = {"pp": ctx.mesh["pp"], "dp": ctx.mesh["dp"], "cp": ctx.mesh["cp"], "tp": ctx.mesh["tp"],
             "dp_cp": ctx.dp_cp_mesh, "ep": ctx.ep_mesh, "edp": ctx.edp_mesh}
    out = {}
    for name, mesh in views.items():
        ranks = torch.tensor([float(ctx.rank)])
        gathered = [torch.zeros(1) for _ in range(mesh.size())]
        dist.all_gather(gathered, ranks, group=mesh.get_group())
        out[name] = [int(t) for t in gathered]
    return ctx.sizes, out


def test_parallel_context_nd_layout():
    """4 ranks as (dp=2, ep=2, tp=1) and (cp=2, tp=2): dp inferred, ep carved out of dp,
    dp_cp the flattened data-parallel ranks; every view's group has the ranks of its row."""
    res = world(4).run(_context_nd_body, {"ep": 2})
    sizes, views = res[0]
    assert sizes == {"pp": 1, "dp": 4, "ep": 2, "cp": 1, "tp": 1}
    assert [r[1]["ep"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[1]["edp"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r[1]["dp_cp"] for r in res] == [[0, 1, 2, 3]] * 4
    res = world(4).run(_context_nd_body, {"cp": 2, "tp": 2})
    assert res[0][0] == {"pp": 1, "dp": 1, "ep": 1, "cp": 2, "tp": 2}
    assert [r[1]["tp"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[1]["cp"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r[1]["dp_cp"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]


@pytest.mark.parametrize("dims,world_size,want", [
    ({}, 4, {"dp": 4}), ({"tp": 2}, 4, {"dp": 2, "tp": 2}), ({"pp": 2, "tp": 2}, 8, {"pp": 2, "dp": 2, "tp": 2}),
    ({"dp": -1, "cp": 2}, 2, {"dp": 1, "cp": 2}), ({"dp": 4, "ep": 4}, 4, {"dp": 4, "ep": 4}),
])
def test_mesh_sizes_infer_dp_from_the_world(dims, world_size, want):
    from tinymeg.context import resolve_sizes
    assert resolve_sizes(dims, world_size) == {**{d: 1 for d in ("pp", "dp", "ep", "cp", "tp")}, **want}
