"""Expert parallelism, and MoE models under DP, TP and SP, proved against the one-process MoE
model on the same global batch: logits, loss (cross-entropy and aux losses), every gradient,
and every parameter after AdamW steps, fp32, atol=rtol=1e-5 (see test_tensor_parallel.py).

Routing is discrete. Top-k keeps the k largest router probabilities, and another batch split
sums in another order (float reassociation, ~1e-7), so two probabilities closer than that
could swap and send a token to another expert: an O(1) difference that is no bug. So every
test watches, in the one-process model, each token's margin between its k-th and (k+1)-th
router logit (the softmax keeps their order); a micro-step with a margin under TIE (1e-5, 100x
the noise) is a tie, and the example is discarded (``hypothesis.assume``) before anything is
compared. Above TIE the sharded model must route every token as the reference does, or its
outputs would differ by O(1).

The aux losses are statistics of the global batch of one micro-step (every dp rank's tokens):
with gradient accumulation the reference runs the same micro-steps on dp x micro_batch
sequences each (tinymeg/models/moe.py explains why).
"""
import contextlib

import pytest
import torch
import torch.distributed as dist
from hypothesis import assume, given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from test_tensor_parallel import assert_close
from tinymeg.models.moe import moe_aux_loss, moe_layers

TIE = 1e-5
SEQ = 8
# (dp, ep, tp, sequence_parallel): world = dp * tp
MESHES = [(2, 2, 1, False), (4, 4, 1, False), (4, 2, 1, False), (2, 2, 2, False), (2, 2, 2, True),
          (2, 1, 1, False), (1, 1, 2, True)]


def _global_batches(cfg, n_steps, global_batch, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, cfg.vocab_size, (global_batch, SEQ), generator=g),
             torch.randint(0, cfg.vocab_size, (global_batch, SEQ), generator=g)) for _ in range(n_steps)]


def _watch_routing(model) -> list:
    """Router logits of every MoE layer's forwards, appended to the returned list."""
    seen = []
    for m in moe_layers(model):
        m.router.register_forward_hook(lambda _, args, out: seen.append(out.detach().float()))
    return seen


def _min_margin(router_logits: list, k: int) -> float:
    """The smallest gap between a token's k-th and (k+1)-th router logit (the softmax keeps
    their order; float noise on a logit is ~1e-7 of it)."""
    margins = [float("inf")]
    for logits in router_logits:
        if k < logits.shape[-1]:
            top = logits.topk(k + 1, dim=-1).values
            margins.append((top[:, k - 1] - top[:, k]).min().item())
    return min(margins)


def _compare_grads_and_step(ref, model, opts, what):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, ref_params[name].grad, f"grad of {name} ({what})")
    for opt in opts:
        opt.step()
        opt.zero_grad()


def moe_vs_reference(ctx, cfg, sp, accum, micro, seed, steps, steer=None, batches=None):
    """Train the one-process model and the sharded one side by side (same seed, same global
    batch) and compare everything; 'tie' if a routing margin is too small to compare."""
    torch.manual_seed(seed)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(seed)
    model = tm.models.GPT2Model(cfg)
    if steer is not None:
        steer(ref)
        steer(model)
    model = tm.apply_hybrid_parallel(model, ctx, {**tm.gpt2_tp_config(cfg), "sequence_parallel": sp})
    routing = _watch_routing(ref)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1) for m in (ref, model)]
    dp, group = ctx.dp_size, ctx.dp_mesh.get_group()
    batches = batches or _global_batches(cfg, steps, dp * accum * micro, seed)
    for step, (x, y) in enumerate(batches):
        xs, ys = x.view(accum, dp, micro, SEQ), y.view(accum, dp, micro, SEQ)
        for m in range(accum):
            routing.clear()
            ref_logits, ref_loss = ref(xs[m].flatten(0, 1), ys[m].flatten(0, 1))
            if _min_margin(routing, cfg.top_k) < TIE:
                return "tie"
            (ref_loss / accum).backward()
            with model.no_sync() if m < accum - 1 else contextlib.nullcontext():
                logits, loss = model(xs[m, ctx.dp_rank], ys[m, ctx.dp_rank])
                (loss / accum).backward()
            assert_close(logits, ref_logits.view(dp, micro, SEQ, -1)[ctx.dp_rank], f"logits, step {step}")
            aux, ref_aux = moe_aux_loss(model), moe_aux_loss(ref)
            assert_close(aux, ref_aux, f"aux loss, step {step}")
            ce = (loss - aux).detach().clone()
            dist.all_reduce(ce, group=group)
            assert_close(ce / dp, (ref_loss - ref_aux).detach(), f"cross-entropy (dp mean), step {step}")
        if step == 0:
            _compare_grads_and_step(ref, model, opts, "first step")
        else:
            for opt in opts:
                opt.step()
                opt.zero_grad()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p, ref_params[name].detach(), f"{name} after {len(batches)} AdamW steps")
    return "ok"


def _property_body(dp, ep, tp, sp, cfg_kw, accum, micro, seed):
    return moe_vs_reference(get_ctx(dp=dp, tp=tp, ep=ep), tm.models.GPTConfig.tiny(**cfg_kw), sp,
                            accum, micro, seed, steps=2)


@given(mesh=st.sampled_from(MESHES), experts_per_rank=st.integers(1, 2), k=st.integers(1, 8),
       moe_every=st.integers(1, 2), hidden=st.sampled_from([32, 30]), bias=st.booleans(),
       accum=st.integers(1, 2), micro=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_moe_on_any_mesh_equals_one_process(mesh, experts_per_rank, k, moe_every, hidden, bias, accum, micro, seed):
    """ep=2, ep=4, (ep=2, dp=4), (ep=2, tp=2) with and without SP, and MoE under plain DP/TP+SP.
    hidden=30 makes the expert rows unaligned for torch._grouped_mm: the loop kernel runs."""
    dp, ep, tp, sp = mesh
    n_experts = max(2, ep * experts_per_rank)
    cfg_kw = dict(n_experts=n_experts, top_k=min(k, n_experts), moe_every=moe_every, expert_hidden=hidden,
                  bias=bias)
    out = world(dp * tp).run(_property_body, dp, ep, tp, sp, cfg_kw, accum, micro, seed)
    assume(out[0] != "tie")
    assert out == ["ok"] * (dp * tp)


# ---- routing edge cases: steered so that the routing is known ----

def steer(model):
    """Route token t to expert t % 4 (then to the lowest other expert), by construction: one
    block, attention's output and the position embedding zeroed, so ln_2 sees wte[t], a spike
    on dim 8 (t % 4); router row e reads dim 8e (logit ~56 vs ~-1.8), and dim 31 separates the
    other experts by 0.018 per expert (far above TIE)."""
    with torch.no_grad():
        block = model.transformer.h[0]
        model.transformer.wpe.weight.zero_()
        block.attn.c_proj.weight.zero_()
        block.attn.c_proj.bias.zero_()
        wte, router = model.transformer.wte.weight, block.mlp.router.weight
        wte.zero_()
        wte[torch.arange(wte.shape[0]), 8 * (torch.arange(wte.shape[0]) % 4)] = 3.0
        router.zero_()
        router[torch.arange(4), 8 * torch.arange(4)] = 10.0
        router[:, 31] = 0.1 * torch.arange(4.0)


def _tokens(classes, n=SEQ, offset=0):
    """n token ids whose classes (id % 4) cycle through classes."""
    return torch.tensor([4 * ((i + offset) % 16) + classes[i % len(classes)] for i in range(n)])


def _steered_body(dp, ep, tp, sp, top_k, rank_classes):
    """One step of the steered model; rank r's sequence holds tokens of classes rank_classes[r]."""
    cfg = tm.models.GPTConfig.tiny(n_layer=1, n_experts=4, top_k=top_k, expert_hidden=32)
    x = torch.stack([_tokens(c) for c in rank_classes])
    y = torch.stack([_tokens(c, offset=3) for c in rank_classes])
    # the steering does what it says: every token's first choice is its class
    probe = tm.models.GPT2Model(cfg)
    steer(probe)
    seen = _watch_routing(probe)
    probe(x, y)
    assert torch.equal(seen[0].argmax(-1), x.flatten() % 4), "steering failed"
    return moe_vs_reference(get_ctx(dp=dp, tp=tp, ep=ep), cfg, sp, accum=1, micro=1, seed=0, steps=1,
                            steer=steer, batches=[(x, y)])


@pytest.mark.parametrize("top_k", [1, 2])
def test_an_expert_that_gets_no_tokens_from_some_ranks(top_k):
    """dp=4, ep=2 (experts 0,1 on ep rank 0, 2,3 on ep rank 1): rank 0 sends nothing to experts
    2 and 3 (with k=1), rank 3 sends everything to expert 3."""
    assert world(4).run(_steered_body, 4, 2, 1, False, top_k, [[0, 1], [0, 1, 2], [0, 1, 2, 3], [3]]) == ["ok"] * 4


@pytest.mark.parametrize("mesh", [(4, 2, 1, False), (2, 2, 2, True)])
def test_all_tokens_to_one_expert(mesh):
    """Every token of every rank goes to expert 0 (k=1): the ep ranks holding experts 2 and 3
    receive no token at all (empty all-to-all splits, empty grouped matmuls); their experts'
    gradients are zeros, as in the one-process model."""
    dp, ep, tp, sp = mesh
    assert world(dp * tp).run(_steered_body, dp, ep, tp, sp, 1, [[0]] * dp) == ["ok"] * (dp * tp)


@pytest.mark.parametrize("mesh,n_experts", [((4, 4, 1, False), 4), ((2, 2, 2, True), 2)])
def test_top_k_equal_to_the_number_of_experts(mesh, n_experts):
    """k = E: every token goes to every expert, weighted by the full softmax."""
    dp, ep, tp, sp = mesh
    cfg_kw = dict(n_experts=n_experts, top_k=n_experts, expert_hidden=32)
    assert world(dp * tp).run(_property_body, dp, ep, tp, sp, cfg_kw, 1, 2, 7) == ["ok"] * (dp * tp)


# ---- context parallelism, and ranks that built the model differently (issue 23) ----

def _moe_under_cp_body():
    """dp=2 x cp=2 (ep=2), ignored targets uneven over the dp ranks and the cp chunks, one step
    inside tm.token_mean: logits, loss, aux loss and every gradient (the router's too) are one
    process's on the global batch. The balancing statistics are summed over dp x cp, so their
    gradient counts dp x cp ranks (dp alone passed every other test); the cp mean of the
    cross-entropy must not rescale the aux loss with its token weights."""
    ctx = get_ctx(dp=2, cp=2, ep=2)
    cfg = tm.models.GPTConfig.tiny(n_layer=1, n_experts=4, top_k=2, expert_hidden=32)
    torch.manual_seed(0)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(0)
    model = tm.parallelize(tm.models.GPT2Model(cfg), ctx)
    (x, y), = _global_batches(cfg, 1, 4, seed=3)
    y[:2, :2] = y[0, 6:] = -1   # dp rank 0, mostly cp rank 0's chunks (positions 0-1 and 6-7)
    mine = slice(2 * ctx.dp_rank, 2 * ctx.dp_rank + 2)
    routing = _watch_routing(ref)
    ref_logits, ref_loss = ref(x, y)
    assert _min_margin(routing, cfg.top_k) > TIE, "a routing tie: choose another seed"
    ref_loss.backward()
    with tm.token_mean(model, ctx, [y[mine]]):
        logits, loss = model(x[mine], y[mine])
        loss.backward()
    assert_close(logits, ref_logits[mine], "logits")
    assert_close(moe_aux_loss(model), moe_aux_loss(ref), "aux loss")
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=ctx.dp_mesh.get_group())
    assert_close(mean / 2, ref_loss.detach(), "loss (dp mean)")
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_params[name].grad, f"grad of {name}")


def _differently_built_body():
    """Every rank builds its model from its own seed: after tm.parallelize (tp=2 x dp=2, ep=2) the
    MoE layers' router and experts are rank 0's on every rank, like every other parameter, so the
    logits are those of rank 0's model."""
    ctx = get_ctx(dp=2, tp=2, ep=2)
    cfg = tm.models.GPTConfig.tiny(n_layer=1, n_experts=4, top_k=2, expert_hidden=32)
    torch.manual_seed(0)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(ctx.rank)
    model = tm.parallelize(tm.models.GPT2Model(cfg), ctx)
    (x, _), = _global_batches(cfg, 1, 2, seed=4)
    with torch.no_grad():
        assert_close(model(x)[0], ref(x)[0], "logits")


def test_moe_under_cp_and_across_tp_ranks_equals_one_process():
    world(4).run(_moe_under_cp_body)
    world(4).run(_differently_built_body)


# ---- torch.compile, checkpoints, the trainer, the recipe ----

def _compile_body():
    from test_compile import _batch, check_compiled_matches_eager
    ctx = get_ctx(dp=2, ep=2)
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(n_layer=1, n_experts=4, top_k=2, expert_hidden=32)
    model = tm.apply_hybrid_parallel(tm.models.GPT2Model(cfg), ctx, tm.gpt2_tp_config(cfg))
    check_compiled_matches_eager(model, *_batch(cfg, seed=ctx.dp_rank), return_logits=False)


def test_compile_expert_parallel_model():
    """fullgraph=True with the all-to-alls' data-dependent splits, the grouped matmul and the
    global balancing statistics in the graph: same loss and gradients as eager."""
    world(2).run(_compile_body)


MOE_TRAIN = dict(n_experts=4, top_k=2, n_layer=2, n_head=4, n_embd=32, seq_len=16, eval_every=0, eval_iters=2,
                 sample_tokens=0, progress=False, lr=3e-3, warmup=2)


def _trainer_body(**kw):
    from tinymeg.train import TrainConfig, train
    cfg = TrainConfig(**{**MOE_TRAIN, **kw})
    out = train(cfg, ctx=get_ctx(dp=cfg.dp, tp=cfg.tp, ep=cfg.ep, cp=cfg.cp))
    return out["losses"]


def test_trainer_losses_equal_one_process_on_any_expert_mesh():
    """The trainer (global-norm clipping at 1 is active: the first norms are ~2) on 1 process,
    (dp=2, ep=2), (dp=4, ep=2), (dp=2, ep=2, tp=2, SP, loss parallel) and (dp=2, ep=2, cp=2) on
    the same global batch: the same 6 losses (CE + aux), rel 1e-5; and with 2 accumulation steps."""
    runs = {"dp1": world(1).run(_trainer_body, steps=6, micro_batch=4)[0],
            "dp2 ep2": world(2).run(_trainer_body, steps=6, dp=2, ep=2, micro_batch=2)[0],
            "dp4 ep2": world(4).run(_trainer_body, steps=6, dp=4, ep=2, micro_batch=1)[0],
            "dp2 ep2 tp2 sp lp": world(4).run(_trainer_body, steps=6, dp=2, ep=2, tp=2, micro_batch=2,
                                              sequence_parallel=True, loss_parallel=True)[0],
            "dp2 ep2 cp2": world(4).run(_trainer_body, steps=6, dp=2, ep=2, cp=2, micro_batch=2)[0]}
    base = runs["dp1"]
    assert len(base) == 6 and base[-1] < base[0]
    for mesh, losses in runs.items():
        assert losses == pytest.approx(base, rel=1e-5), f"{mesh}: {losses} vs {base}"
    # accumulation: each micro-step's global batch is dp x micro_batch sequences
    accum = world(2).run(_trainer_body, steps=3, dp=2, ep=2, micro_batch=1, grad_accum=2)[0]
    assert accum == pytest.approx(world(1).run(_trainer_body, steps=3, micro_batch=2, grad_accum=2)[0],
                                  rel=1e-5)


def _load_body(path, dp, ep):
    """A fresh MoE model and optimizer on (dp, ep), loaded from the checkpoint at path."""
    from test_checkpoint import _full_state
    from tinymeg.train import TrainConfig, build_model, build_optimizer
    from tinymeg.train import checkpoint as ckpt
    cfg, ctx = TrainConfig(**{**MOE_TRAIN, "dp": dp, "ep": ep}), get_ctx(dp=dp, ep=ep)
    model = build_model(cfg, 65, ctx)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    ckpt.load(path, model, optimizer, ctx, cfg.seed)
    state = _full_state(model, optimizer)  # a collective: every rank
    return state if dist.get_rank() == 0 else None


def test_checkpoint_saved_with_ep2_resumes_with_ep1_and_ep4(tmp_path):
    """dp=4: a checkpoint of ep=2 (experts sharded on the expert dim, DCP) loads onto ep=1 and
    ep=4 with every parameter and optimizer state exactly, exports to one unsharded model, and
    the resumed runs continue with the straight run's losses (rel 1e-5)."""
    from test_tensor_parallel import full
    from tinymeg.train import checkpoint as ckpt
    from tinymeg.train import TrainConfig
    kw = dict(steps=6, dp=4, micro_batch=1, ckpt_every=3)
    straight = world(4).run(_trainer_body, ep=2, ckpt_dir=str(tmp_path / "ep2"), **kw)[0]
    path = str(tmp_path / "ep2" / ckpt.step_dir_name(3))
    saved = {ep: world(4).run(_load_body, path, 4, ep)[0] for ep in (2, 1, 4)}
    for ep in (1, 4):
        for key, value in saved[2].items():
            assert torch.equal(saved[ep][key], value), f"{key} loaded with ep={ep}"
    with pytest.raises(ValueError, match=r"holds another model \(n_experts=4; this one has n_experts=8\): "
                                         r"pass --n-experts 4"):
        ckpt.check_compatible(ckpt.verify(path), tm.models.GPT2Model(tm.models.GPTConfig(
            block_size=16, vocab_size=65, n_layer=2, n_head=4, n_embd=32, n_experts=8)), path)
    exported, meta = ckpt.load_model(path)
    assert meta["mesh"]["ep"] == 2 and TrainConfig(**meta["train_config"]).n_experts == 4
    for name, p in exported.named_parameters():
        assert torch.equal(full(p), saved[2][name]), f"exported {name}"
    for ep in (1, 4):
        resumed = world(4).run(_trainer_body, ep=ep, resume_from=path, ckpt_dir=str(tmp_path / f"ep{ep}"), **kw)[0]
        assert resumed == pytest.approx(straight[3:], rel=1e-5), f"resumed on ep={ep}"


def test_moe_recipe_trains_under_torchrun_and_logs_routing(tmp_path):
    from test_train import _torchrun
    records, stdout = _torchrun("moe.py", 2, "--n-layer", "2", tmp_path=tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))   # steps done
    for r in records:
        assert {"loss", "aux_loss", "expert_frac_max", "expert_frac_min"} <= r.keys()
        assert 0 <= r["expert_frac_min"] <= 0.25 <= r["expert_frac_max"] <= 1  # 4 experts
        assert 0 < r["aux_loss"] < r["loss"]
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert "--- sample ---" in stdout


def _comm_body():
    """Collectives of one forward + backward of a MoE model (dp=4, ep=2), counted."""
    from tinymeg.parallel.comm import CommCounter
    ctx = get_ctx(dp=4, ep=2)
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(n_experts=4, top_k=2, expert_hidden=32)
    model = tm.apply_hybrid_parallel(tm.models.GPT2Model(cfg), ctx, tm.gpt2_tp_config(cfg))
    idx = torch.randint(0, 65, (3, SEQ), generator=torch.Generator().manual_seed(ctx.rank))
    counter = CommCounter({ctx.ep_mesh.get_group().group_name: "ep", ctx.dp_mesh.get_group().group_name: "dp",
                           ctx.edp_mesh.get_group().group_name: "edp"})
    with counter:
        loss = model(idx, idx)[1]
        counter.phase = "backward"
        loss.backward()
    return [(r.phase, r.kind, r.dim, r.nbytes) for r in counter.records]


def test_expert_parallel_moves_the_token_slots_and_nothing_more():
    """Per MoE layer, forward: an all-to-all of the E counts, one of this rank's n k token slots
    to the experts and one back, one all-reduce of the 2E + 2 balancing sums; backward: the two
    token all-to-alls reversed; then DP's gradient all-reduces (over dp, and over edp for the
    experts). Summed over ranks the token bytes
    are tokens x k x width x 4 per layer and direction (a rank sends back what it received)."""
    records = world(4).run(_comm_body)
    L, E, k, C, n = 2, 4, 2, 32, 3 * SEQ
    for rank in records:
        kinds = [(phase, kind, dim) for phase, kind, dim, _ in rank]
        assert kinds.count(("forward", "all_to_all", "ep")) == 3 * L
        assert kinds.count(("forward", "all_reduce", "dp")) == L
        assert kinds.count(("backward", "all_to_all", "ep")) == 2 * L
        # DP: dense gradients over dp, expert gradients over edp (the ranks holding the same experts)
        assert {x for x in kinds if x[0] == "backward" and x[1] != "all_to_all"} == {
            ("backward", "all_reduce", "dp"), ("backward", "all_reduce", "edp")}
        assert len(kinds) == 6 * L + sum(kinds.count(("backward", "all_reduce", d)) for d in ("dp", "edp"))
        assert [b for p, kind, _, b in rank if p == "forward" and kind == "all_reduce"] == [(2 * E + 2) * 4] * L
        assert sorted(b for p, kind, _, b in rank if p == "forward" and kind == "all_to_all")[:L] == [E * 8] * L
    for phase in ("forward", "backward"):
        moved = sum(b for rank in records for p, kind, _, b in rank if p == phase and kind == "all_to_all"
                    and b != E * 8)
        assert moved == len(records) * 2 * L * n * k * C * 4, phase


# ---- bad input ----

def _raises(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def _ep_errors_body():
    ctx = get_ctx(dp=2, ep=2)
    moe = lambda E=2, k=1: tm.models.GPT2Model(tm.models.GPTConfig.tiny(n_experts=E, top_k=k))  # noqa: E731
    _raises(lambda: tm.apply_expert_parallel(moe(E=3), ctx), r"h.0.mlp has n_experts=3, not divisible by ep=2")
    _raises(lambda: tm.apply_expert_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx),
            r"GPT2Model has no MoE layers")
    done = tm.apply_expert_parallel(moe(), ctx)
    _raises(lambda: tm.apply_expert_parallel(done, ctx), r"already applied")
    _raises(lambda: tm.apply_data_parallel(moe(), ctx),
            r"transformer.h.0.mlp is a MoE layer: call tm.apply_expert_parallel\(model, ctx\)")
    _raises(lambda: tm.apply_expert_parallel(moe(), get_ctx(tp=2)),
            r"apply_tensor_parallel before apply_expert_parallel")


def test_expert_parallel_errors():
    world(2).run(_ep_errors_body)


def test_recipe_flags_errors(monkeypatch, capsys):
    from tinymeg.train.cli import parse_args
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        parse_args(["--dp", "4", "--ep", "3", "--n-experts", "6"])
    assert "ep=3 must divide dp=4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dp", "4", "--ep", "2", "--n-experts", "3", "--top-k", "1"])
    assert "--n-experts 3 is not divisible by --ep 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dp", "4", "--ep", "2"])
    assert "--ep 2 shards experts, but the model has none: add --n-experts" in capsys.readouterr().err
    cfg = parse_args(["--dp", "4", "--ep", "2", "--n-experts", "4", "--top-k", "2"])
    assert (cfg.dp, cfg.ep, cfg.n_experts, cfg.top_k) == (4, 2, 4, 2)
