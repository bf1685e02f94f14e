"""ZeRO stages 1-3 and mixed precision, proved against plain DP and the one-process model.

Tolerances as in test_data_parallel.py (fp32, atol=rtol=1e-5): every stage reduces the same
gradients in another order (reduce-scatter instead of all-reduce, FSDP2's own buckets), so they
differ from the one-process model by float reassociation only. bf16 runs are compared with each
other (the same bf16 values and fp32 reductions at every stage) and, loosely, with fp32.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.tensor import DTensor

import tinymeg as tm
from rank_pool import get_ctx, world
from test_data_parallel import (_raise_then_retry_body, _rank_dependent_body, _unfreeze_body,
                                assert_matches_reference, build_dp_pair, full_value)
from test_tensor_parallel import assert_close
from tinymeg.nn import local as _local
from tinymeg.parallel.zero import whole_value
from tinymeg.train.optim import clip_grad_norm_

MESHES = [(1, 2), (1, 4), (2, 2)]   # (tp, dp)


def _accumulate_step(model, x, y, dp, dp_rank, accum):
    """One optimizer step's forward/backward on this rank's share of the global batch, over
    `accum` micro-steps (no_sync on all but the last). Returns the mean loss on this rank."""
    xs, ys = x.view(accum, dp, -1, x.size(-1)), y.view(accum, dp, -1, y.size(-1))
    total = 0.0
    for m in range(accum):
        with model.no_sync() if m < accum - 1 else torch.enable_grad():
            loss = model(xs[m, dp_rank], ys[m, dp_rank], return_logits=False)[1]
            (loss / accum).backward()
        total += loss.item() / accum
    return total


def _dp_mean(value, ctx):
    t = torch.tensor(value)
    torch.distributed.all_reduce(t, group=ctx.dp_cp_mesh.get_group())
    return t.item() / ctx.dp_size


def _stage_vs_dp_and_reference_body(tp, dp, zero, accum, seed, clip, optimizer="adamw", steps=3):
    """A ZeRO model, a plain DP model (zero=0) and the one-process model train on the same global
    batches with gradient accumulation and global-norm clipping: same losses, norms, gradients of
    the first step, and parameters after every step."""
    ctx = get_ctx(dp=dp, tp=tp)
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, eps=1e-6, weight_decay=0.1),
            "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-6),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)}[optimizer]
    ref, model, ref_opt, opt = build_dp_pair(ctx, seed, zero, optimizer=make)
    _, plain, _, plain_opt = build_dp_pair(ctx, seed, 0, optimizer=make)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, y = (torch.randint(0, 65, (accum * dp * 2, 8), generator=g) for _ in range(2))
        ref_loss = ref(x, y, return_logits=False)[1]
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        losses, norms = [], []
        for m, o in ((model, opt), (plain, plain_opt)):
            losses.append(_dp_mean(_accumulate_step(m, x, y, dp, ctx.dp_rank, accum), ctx))
            norms.append(clip_grad_norm_(m.parameters(), clip).item())
        assert losses[0] == pytest.approx(ref_loss.item(), rel=1e-5), (step, losses, ref_loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        assert norms[0] == pytest.approx(ref_norm.item(), rel=1e-5) and norms[0] == pytest.approx(norms[1], rel=1e-5)
        if step == 0:
            assert_matches_reference(model, ref, "step 0 (clipped)", grads=True)
        for o in (opt, plain_opt, ref_opt):
            o.step()
            o.zero_grad()
        assert_matches_reference(model, ref, f"after step {step}")
    ours, theirs = dict(model.named_parameters()), dict(plain.named_parameters())
    for name, p in ours.items():
        assert_close(full_value(p), full_value(theirs[name]), f"{name}: zero={zero} vs plain DP")


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"tp{m[0]}-dp{m[1]}")
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_every_stage_equals_plain_dp_and_one_process(zero, mesh):
    """Every stage on (dp=2), (dp=4), (tp=2, dp=2), with accumulation 2 and clipping."""
    tp, dp = mesh
    world(tp * dp).run(_stage_vs_dp_and_reference_body, tp, dp, zero, 2, 0, 0.05)


@given(zero=st.sampled_from([1, 2, 3]), mesh=st.sampled_from(MESHES), accum=st.integers(1, 3),
       seed=st.integers(0, 2**16), clip=st.sampled_from([1e-3, 0.1, 1e3]))
def test_stages_property(zero, mesh, accum, seed, clip):
    tp, dp = mesh
    world(tp * dp).run(_stage_vs_dp_and_reference_body, tp, dp, zero, accum, seed, clip, steps=2)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_other_torch_optimizers_at_every_stage(zero, optimizer):
    """Adam and SGD with momentum (and weight decay) shard like AdamW."""
    world(2).run(_stage_vs_dp_and_reference_body, 1, 2, zero, 1, 0, 1.0, optimizer, 2)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_rank_dependent_unused_raising_and_unfrozen_parameters_at_every_stage(zero):
    """Issue 10's findings 1-4 hold under ZeRO too (stage 3: see README for unused parameters)."""
    pool = world(4)
    pool.run(_rank_dependent_body, 2, 2, zero, {0: {1}, 1: {0, 1}}, 3)
    pool.run(_raise_then_retry_body, 2, 2, zero)
    pool.run(_unfreeze_body, 2, 2, zero)


# ---- what each rank holds ----

def _held_body(tp, dp, zero, dtype):
    """Shards are 1/dp of each parameter, as DTensors whose global shape is the parameter's; masters
    and optimizer states are fp32; bf16 parameters compute; the fp32 model's shards are views of
    the parameters (no copy)."""
    from tinymeg.parallel.grad_sync import GradientElsewhere
    from tinymeg.parallel.zero import memory_mb, optimizer_param
    ctx = get_ctx(dp=dp, tp=tp)
    _, model, _, opt = build_dp_pair(ctx, 0, zero, dtype=dtype)
    x = torch.randint(0, 65, (2, 8))
    model(x, x, return_logits=False)[1].backward()
    opt.step()
    compute = torch.bfloat16 if dtype else torch.float32
    for name, p in model.named_parameters():
        held = optimizer_param(p)
        assert held.dtype == torch.float32, name
        assert held.grad is not None and held.grad.dtype == torch.float32, name
        assert all(v.dtype == torch.float32 for v in opt.state[held].values() if v.dim()), name
        if zero in (1, 2):
            assert isinstance(held, DTensor) and held.shape == p.shape, name
            assert held.device_mesh.mesh_dim_names[0] == "dp"
            pieces = torch.tensor(_local(held).numel())      # the dp shards partition the parameter
            torch.distributed.all_reduce(pieces, group=ctx.dp_cp_mesh.get_group())
            assert pieces.item() == _local(p).numel() and _local(held).numel() <= math.ceil(_local(p).numel() / dp) * 2, name
            assert p.dtype == compute and isinstance(p.grad, GradientElsewhere), name
            if dtype is None:   # a view of the parameter itself
                assert _local(held).untyped_storage().data_ptr() == _local(p).untyped_storage().data_ptr()
        if zero == 3:
            assert held is p and p.dtype == torch.float32   # FSDP2 keeps fp32 sharded parameters
    return memory_mb(model, opt)


@pytest.mark.parametrize("zero,dtype", [(1, None), (2, None), (1, "bf16"), (2, "bf16"), (3, "bf16"), (0, "bf16")])
def test_what_each_rank_holds(zero, dtype):
    mem = world(4).run(_held_body, 2, 2, zero, dtype)
    assert mem[0]["param_mb"] > 0


# ---- mixed precision ----

def _bf16_body(tp, dp, zeros):
    """bf16 at every stage: the same losses at every stage (the same bf16 values, fp32
    reductions), close to fp32's (bf16 rounding), and gradient reductions in fp32."""
    ctx = get_ctx(dp=dp, tp=tp)
    runs = {}
    for zero in zeros:
        ref, model, ref_opt, opt = build_dp_pair(ctx, 0, zero, dtype="bf16")
        if zero != 3:
            assert all(b.dtype == torch.float32 for b in model.grad_sync.buckets)
        g = torch.Generator().manual_seed(0)
        losses, ref_losses = [], []
        for step in range(3):
            x, y = (torch.randint(0, 65, (2 * 2 * dp, 8), generator=g) for _ in range(2))
            ref_losses.append(ref(x, y, return_logits=False)[1].item())
            ref(x, y, return_logits=False)[1].backward()
            losses.append(_dp_mean(_accumulate_step(model, x, y, dp, ctx.dp_rank, 2), ctx))
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad()
        runs[zero] = losses
        assert losses == pytest.approx(ref_losses, rel=2e-2), (zero, losses, ref_losses)
    for zero in zeros:
        assert runs[zero] == pytest.approx(runs[zeros[0]], rel=1e-3), runs


def test_bf16_at_every_stage():
    world(4).run(_bf16_body, 2, 2, [0, 1, 2, 3])


# ---- communication ----

def _comm_body(tp, dp, zero, dtype):
    """Stages 1-2 send DP's all-reduce bytes (a reduce-scatter in backward, an all-gather after
    the step); stage 3 one all-gather per block in forward and one in backward, one reduce-scatter
    per block. Checked against the parameters' sizes, not only against the library's theory."""
    from tinymeg.parallel.comm import comm_report, expected_dp_comm, format_comm_table
    ctx = get_ctx(dp=dp, tp=tp)
    torch.manual_seed(0)
    cfg = tm.models.GPTConfig.tiny(n_layer=3)
    model = tm.apply_hybrid_parallel(tm.models.GPT2Model(cfg), ctx, bucket_mb=0.02, zero=zero, param_dtype=dtype)
    opt = tm.shard_optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    idx = torch.randint(0, 65, (2, 8))
    measured = comm_report(model, idx, idx, ctx, optimizer=opt, return_logits=False)
    dp_measured = {k: n for k, n in measured.items() if k.dim == "dp"}
    assert dp_measured == dict(expected_dp_comm(model, ctx)), format_comm_table(measured, expected_dp_comm(model, ctx))
    params = list(model.parameters())
    local = [_local(p) for p in params]
    size = dtype and 2 or 4
    by = {}
    for k, n in dp_measured.items():
        by[(k.phase, k.kind)] = by.get((k.phase, k.kind), 0) + k.nbytes * n
    if zero == 3:   # per block: forward and backward all-gathers of its parameters, one reduce-scatter
        groups = 1 + cfg.n_layer
        assert sum(n for k, n in dp_measured.items() if (k.phase, k.kind) == ("forward", "all_gather")) == groups
        assert sum(n for k, n in dp_measured.items() if (k.phase, k.kind) == ("backward", "all_gather")) == groups - 1
        assert sum(n for k, n in dp_measured.items() if k.kind == "reduce_scatter") == groups
        assert by[("backward", "reduce_scatter")] >= 4 * dp * sum(t.numel() for t in local) >= by[("backward", "reduce_scatter")] * 0.9
        return
    grads = 4 * sum(_local(p).numel() for p in params)     # fp32 reduction, whatever the dtype
    flags = 4 * len(params) * (dp if zero else 1)         # one used flag per parameter per row
    if zero == 0:
        assert by == {("backward", "all_reduce"): grads + flags}
    else:
        padding = by[("backward", "reduce_scatter")] - grads - flags
        assert 0 <= padding < 0.02 * grads
        assert by[("step", "all_gather")] == (grads + padding) // 4 * size
        wire = sum(k.wire_bytes * n for k, n in dp_measured.items())
        plain = 2 * (dp - 1) / dp * (grads + padding + 4 * len(params))  # DP's all-reduce of the same buffers
        if dtype is None:
            assert wire == pytest.approx(plain, rel=0.02)


@pytest.mark.parametrize("zero,dtype", [(0, None), (1, None), (2, None), (2, "bf16"), (3, None), (3, "bf16")])
def test_communication_contract(zero, dtype):
    world(4).run(_comm_body, 2, 2, zero, dtype)


# ---- p.grad where the gradient is elsewhere (issue 23) ----

def _torch_clip_body():
    """Under ZeRO-1/2 or bf16 masters the gradient lives where the optimizer steps, not in p.grad:
    torch's clip_grad_norm_(model.parameters()) found no gradient and clipped nothing; now it
    raises, saying where the gradient is, and so does an optimizer not handed to shard_optimizer.
    tinymeg's clip reads it there; a second backward and zero_grad(set_to_none=False) still work."""
    from tinymeg.train.optim import clip_grad_norm_
    ctx = get_ctx(dp=2)
    x = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(ctx.dp_rank))
    for zero, dtype in ((1, None), (2, None), (0, "bf16")):
        model = tm.apply_data_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx, zero=zero, param_dtype=dtype)
        model(x, x, return_logits=False)[1].backward()
        where = r"optimizer_param\(p\).grad. Clip with tinymeg.train.clip_grad_norm_"
        with pytest.raises(RuntimeError, match=where):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with pytest.raises(RuntimeError, match=where):
            torch.optim.AdamW(model.parameters()).step()
        assert clip_grad_norm_(model.parameters(), 1e-3) > 0
        model(x, x, return_logits=False)[1].backward()   # a second synced backward, before any step
        model.zero_grad(set_to_none=False)


def test_torch_clip_on_gradients_that_live_elsewhere_is_an_error():
    world(2).run(_torch_clip_body)


# ---- errors ----

def _errors_body():
    ctx = get_ctx(dp=2)
    for bad in (4, -1, True, "1", 1.0):
        with pytest.raises(ValueError, match=f"zero={bad!r}.*0, 1, 2, 3"):
            tm.apply_data_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx, zero=bad)
    with pytest.raises(ValueError, match="param_dtype='fp16'.*bf16"):
        tm.apply_data_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx, param_dtype="fp16")
    with pytest.raises(ValueError, match="build the model in float32"):
        tm.apply_data_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()).to(torch.bfloat16), ctx,
                               param_dtype="bf16")
    for zero in (1, 2):
        model = tm.apply_data_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx, zero=zero)
        with pytest.raises(ValueError, match=f"ZeRO stage {zero} cannot shard Adafactor.*zero=3"):
            tm.shard_optimizer(model, torch.optim.Adafactor(model.parameters()))
        with pytest.raises(ValueError, match="not parameters of this model"):
            tm.shard_optimizer(model, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]))
        stepped = torch.optim.AdamW(model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        stepped.step()
        with pytest.raises(ValueError, match="already stepped"):
            tm.shard_optimizer(model, stepped)


def test_bad_zero_stage_dtype_or_optimizer_is_a_clear_error():
    world(2).run(_errors_body)


def test_recipe_flags_reject_a_bad_stage(capsys):
    from tinymeg.train.cli import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--zero", "4"])
    assert "--zero: invalid choice: 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "fp16"])
    assert "--dtype: invalid choice: 'fp16'" in capsys.readouterr().err
    cfg = parse_args(["--zero", "2", "--dtype", "bf16"])
    assert (cfg.zero, cfg.dtype) == (2, "bf16")


# ---- checkpoints across stages and meshes ----

TINY = dict(n_layer=2, n_head=4, n_embd=32, seq_len=16, eval_every=0, eval_iters=2, sample_tokens=0,
            progress=False, lr=3e-3, warmup=2, steps=6, ckpt_every=2)


def _train_body(tp, dp, zero, dtype="fp32", **kw):
    from tinymeg.train import TrainConfig, train
    out = train(TrainConfig(tp=tp, dp=dp, zero=zero, dtype=dtype, micro_batch=4 // dp, **{**TINY, **kw}),
                ctx=get_ctx(dp=dp, tp=tp))
    held = (lambda p: p) if dtype == "fp32" else tm.parallel.zero.optimizer_param   # fp32 masters
    return out["losses"], {n: full_value(held(p)).detach() for n, p in out["model"].named_parameters()}


def test_checkpoint_resumes_across_stages_and_meshes(tmp_path):
    """(dp=4, zero=3) -> (tp=2, dp=2, zero=1) -> one process, zero=0: the losses of the
    uninterrupted run, and its parameters at the end."""
    a, b, c = (str(tmp_path / n) for n in "abc")
    straight, final = world(4).run(_train_body, 1, 4, 3, ckpt_dir=a)[0]
    resumed, _ = world(4).run(_train_body, 2, 2, 1, ckpt_dir=b, resume_from=f"{a}/step_000002")[0]
    assert resumed == pytest.approx(straight[2:], rel=1e-5), (resumed, straight)
    last, params = world(1).run(_train_body, 1, 1, 0, ckpt_dir=c, resume_from=f"{b}/step_000004")[0]
    assert last == pytest.approx(straight[4:], rel=1e-5), (last, straight)
    for name, p in params.items():
        torch.testing.assert_close(p, final[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_zero3_with_tp_checkpoint_resumes_at_stage_2(tmp_path):
    """FSDP2 x TP shards (a _StridedShard inside each TP shard, c_attn split on dim 1) save and
    resume like any other: (tp=2, dp=2, zero=3) -> (tp=2, dp=2, zero=2)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    straight, _ = world(4).run(_train_body, 2, 2, 3, ckpt_dir=a, steps=4)[0]
    resumed, _ = world(4).run(_train_body, 2, 2, 2, ckpt_dir=b, steps=4, resume_from=f"{a}/step_000002")[0]
    assert resumed == pytest.approx(straight[2:], rel=1e-5), (resumed, straight)


def test_bf16_checkpoint_holds_the_fp32_master_weights(tmp_path):
    """A bf16 run saves its fp32 masters: an fp32 one-process run resumed from it starts from them."""
    d = str(tmp_path / "bf16")
    _, masters = world(2).run(_train_body, 1, 2, 2, "bf16", ckpt_dir=d, steps=2)[0]
    _, loaded = world(1).run(_train_body, 1, 1, 0, ckpt_dir=str(tmp_path / "fp32"),
                             resume_from=f"{d}/step_000002", steps=2)[0]
    for name, p in masters.items():
        assert p.dtype == torch.float32
        assert torch.equal(loaded[name], p), name


# ---- the trainer: every stage, SP + loss parallel, eval, sampling, compile, memory ----

def _trainer_body(tp, dp, zero, log=None, **kw):
    from tinymeg.train import TrainConfig, train
    cfg = TrainConfig(tp=tp, dp=dp, zero=zero, micro_batch=4 // dp, log_jsonl=log,
                      **{**TINY, "ckpt_every": 0, "steps": 10, "eval_every": 5, "sample_tokens": 24, **kw})
    out = train(cfg, ctx=get_ctx(dp=dp, tp=tp))
    return out["losses"], out["val_loss"], out["sample"]


def test_trainer_at_every_stage_logs_the_losses_of_zero_0():
    """The must-show, in-process: tp=2 x dp=2 with sequence and loss parallel, 10 steps: every
    stage logs zero 0's losses (rel 1e-5), the same val loss and the same sample."""
    pool = world(4)
    runs = {z: pool.run(_trainer_body, 2, 2, z, sequence_parallel=True, loss_parallel=True)[0] for z in range(4)}
    for zero, (losses, val, sample) in runs.items():
        assert losses == pytest.approx(runs[0][0], rel=1e-5), (zero, losses, runs[0][0])
        assert val == pytest.approx(runs[0][1], rel=1e-5) and sample == runs[0][2], zero
    assert runs[0][0][-1] < runs[0][0][0]


def test_memory_fields_shrink_with_the_stage_at_dp4(tmp_path):
    """At dp=4: optimizer states <= 0.3x zero 0 from stage 1, gradients from stage 2, parameters at 3."""
    import json
    mem = {}
    for zero in range(4):
        log = tmp_path / f"z{zero}.jsonl"
        world(4).run(_trainer_body, 1, 4, zero, str(log), steps=2, sample_tokens=0)
        mem[zero] = json.loads(log.read_text().splitlines()[-1])
    base = mem[0]
    assert all(base[k] > 0 for k in ("param_mb", "grad_mb", "optim_mb"))
    assert mem[1]["optim_mb"] <= 0.3 * base["optim_mb"] and mem[1]["grad_mb"] >= base["grad_mb"]
    assert mem[2]["grad_mb"] <= 0.3 * base["grad_mb"] and mem[2]["optim_mb"] <= 0.3 * base["optim_mb"]
    assert mem[3]["param_mb"] <= 0.3 * base["param_mb"] and mem[3]["grad_mb"] <= 0.3 * base["grad_mb"]
    assert mem[2]["param_mb"] == base["param_mb"]


def _compile_body(zero):
    """torch.compile(fullgraph=True) (per block at stage 3) trains like eager, with TP, SP and
    loss parallel."""
    ctx = get_ctx(dp=2, tp=2)
    cfg = tm.models.GPTConfig.tiny(n_layer=1)
    plan = {**tm.GPT2_TP_CONFIG, "sequence_parallel": True, "loss_parallel": True}
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tm.apply_hybrid_parallel(tm.models.GPT2Model(cfg), ctx, plan, zero=zero)
        opt = tm.shard_optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        step = tm.parallel.compile_model(model) if compiled else model
        g = torch.Generator().manual_seed(ctx.dp_rank)
        losses = []
        for _ in range(2):
            x = torch.randint(0, 65, (2, 16), generator=g)
            loss = step(x, x, return_logits=False)[1]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs.append((losses, {n: full_value(p).detach() for n, p in model.named_parameters()}))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    for name, p in runs[0][1].items():
        assert_close(runs[1][1][name], p, f"{name} compiled vs eager")


@pytest.mark.parametrize("zero", [2, 3])
def test_compiled_model_trains_like_eager(zero):
    world(4).run(_compile_body, zero)


# ---- a parameter that declares its own data-parallel mesh (expert parallelism's hook) ----

def _own_mesh_body(zero):
    """Under dp=4, `extra` declares a 2-rank data-parallel mesh (as expert weights declare the
    expert-dp ranks): its gradient is summed over those 2 ranks only and divided by dp=4 (each
    rank's loss is a quarter of the global one), the rest's averaged over all 4. Checked with SGD
    (lr 1: the step is minus the reduced gradient) against local gradients computed by a plain
    copy of the model. At stage 3 FSDP2 divides by dp after summing over the parameter's own mesh
    (on gloo, which has no PREMUL_SUM, a forced sum and then the division)."""
    ctx, pairs = get_ctx(dp=4), get_ctx(dp=2, tp=2)   # pairs.mesh["dp"]: ranks {0, 2} and {1, 3}

    def build():
        torch.manual_seed(0)
        model = tm.models.GPT2Model(tm.models.GPTConfig.tiny(n_layer=1))
        model.extra = torch.nn.Linear(32, 32)
        return model

    def loss(model):
        x = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(ctx.rank))
        return model(x, x, return_logits=False)[1] + model.extra(model.transformer.wte(x)).square().mean()
    plain, model = build(), build()
    loss(plain).backward()
    for p in model.extra.parameters():
        p.data_parallel_mesh = pairs.mesh["dp"]
    model = tm.apply_data_parallel(model, ctx, zero=zero, bucket_mb=0.002)
    opt = tm.shard_optimizer(model, torch.optim.SGD(model.parameters(), lr=1.0))
    loss(model).backward()
    opt.step()
    ours = {name: whole_value(p) for name, p in model.named_parameters()}   # FSDP2 shards at stage 3
    for name, p in plain.named_parameters():
        group = (pairs.mesh["dp"] if name.startswith("extra") else ctx.mesh["dp"]).get_group()
        share = p.grad.clone()   # summed over the parameter's mesh, divided by the model's dp size
        torch.distributed.all_reduce(share, group=group)
        share /= ctx.dp_size
        assert_close(p.detach() - ours[name].detach(), share, f"{name}: step vs summed local gradient / dp")


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_a_parameter_reduced_over_its_own_mesh(zero):
    world(4).run(_own_mesh_body, zero)


# ---- any nn.Module: uneven shards, a 0-dim parameter, no ModuleList; a checkpoint round trip ----

class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 7)                     # 7 rows: uneven over dp=2 (4 + 3)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))    # 0-dim

    def forward(self, x):
        return (self.proj(x) * self.scale).square().mean()


def _small_body(zero, path):
    import torch.distributed.checkpoint as dcp
    from tinymeg.parallel.zero import get_state_dict, set_state_dict
    ctx = get_ctx(dp=2)
    torch.manual_seed(0)
    ref = _Small()
    torch.manual_seed(0)
    model = tm.apply_data_parallel(_Small(), ctx, zero=zero)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = tm.shard_optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(4, 6, generator=g)
        ref(x).backward()   # the mean over 4 rows = the mean of the two ranks' means over 2
        model(x.chunk(2)[ctx.dp_rank]).backward()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    assert_matches_reference(model, ref, f"zero={zero}")
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, opt))), checkpoint_id=path)
    torch.manual_seed(1)   # another init: everything must come from the checkpoint
    fresh = tm.apply_data_parallel(_Small(), ctx, zero=0)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for name, p in ref.named_parameters():
        assert torch.equal(dict(fresh.named_parameters())[name], full_value(dict(model.named_parameters())[name]))
        for key, value in ref_opt.state[p].items():
            assert_close(fresh_opt.state[dict(fresh.named_parameters())[name]][key], value, f"{name}:{key}")


@pytest.mark.parametrize("zero", [1, 2])
def test_any_module_with_uneven_and_0_dim_parameters_and_its_checkpoint(zero, tmp_path):
    world(2).run(_small_body, zero, str(tmp_path / "ck"))


def _scalar_at_stage_3_body():
    with pytest.raises(ValueError, match=r"zero=3 \(FSDP2\) cannot shard 0-dim parameters \(scale\).*zero=1 or 2"):
        tm.apply_data_parallel(_Small(), get_ctx(dp=2), zero=3)


def test_a_0_dim_parameter_at_stage_3_is_a_clear_error():
    world(2).run(_scalar_at_stage_3_body)
