"""The plain path of every op (issue 17): it computes what the custom op computes, the tuner
picks it when it is faster (timed forward + backward, an injected clock here: never real
timings), every rank takes rank 0's decisions, a second run reads them from the disk cache
without timing, and compiled models take it with no graph break and no recompile across steps.

Tolerances as in test_ops.py: fp32 results differ by float reassociation only (1e-5); bf16 by
a few bf16 ulps where one path rounds an intermediate the other keeps in float32.
"""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from tinymeg.ops import cross_entropy, gelu, norm
from tinymeg.ops.autotune import RuntimeAutoTuner
from tinymeg.ops.autotune_timing import MIN_ROUNDS

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
OPS = {"layer_norm": norm, "bias_gelu": gelu, "linear_cross_entropy": cross_entropy}


pytestmark = pytest.mark.usefixtures("fresh_tuner")  # tests/conftest.py


def _args(op, lead, c, dtype, seed, vocab=None):
    """Inputs of op's wrapper, requiring grad where a model's do."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()
    if op == "layer_norm":
        return randn(*lead, c, scale=3), randn(c), randn(c), 1e-5
    if op == "bias_gelu":
        return randn(*lead, c, scale=3), randn(c)
    n = int(torch.tensor(lead).prod())
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::3] = -1  # some ignored
    return randn(n, c), randn(vocab + 3, c, scale=0.5), targets, vocab, -1, "mean"


def _run(fn, args):
    """fn's output and the gradients of every input that requires one (output gradient = output)."""
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a
              for a in args]
    out = fn(*leaves)
    out.backward(out.detach())
    return [out.detach()] + [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]


# ---------------------------------------------------------------- the plain path computes what the op does

@given(op=st.sampled_from(list(OPS)), lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       c=st.integers(1, 40), vocab=st.integers(1, 50), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_plain_path_is_what_the_op_computes(op, lead, c, vocab, dtype, seed):
    """Forward and backward, every op, the op's default kernels against aten's plain path."""
    args = _args(op, lead, c, dtype, seed, vocab)
    plain, fused = _run(OPS[op].PATHS["plain"], args), _run(OPS[op].PATHS["op"], args)
    # As in test_ops.py: LayerNorm amplifies rounding noise by 1/std of a row, and a parameter's
    # gradient sums rounding errors over the rows like a random walk.
    rows = args[0].detach().float().reshape(-1, args[0].shape[-1])
    cond = max(1.0, (1 / (rows.var(-1, unbiased=False) + 1e-5).sqrt()).max().item()) if op == "layer_norm" else 1.0
    for i, (p, f) in enumerate(zip(plain, fused)):
        k = cond * (len(rows) ** 0.5 if i > 1 else 1.0)  # outputs 0 (y) and 1 (grad of x) are per row
        tol = {name: v * k for name, v in TOL[dtype].items()}
        torch.testing.assert_close(p, f, **tol, msg=lambda m: f"{op} output/grad {i}: {m}")


def test_both_paths_refuse_bad_input_alike(monkeypatch):
    """Which path runs is the tuner's business: errors do not depend on it."""
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -1])
    bad = [(tm.ops.layer_norm, (torch.randn(4, 8), torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
           (tm.ops.layer_norm, (torch.ones(4, 8, dtype=torch.long),), TypeError, "floating point"),
           (tm.ops.bias_gelu, (torch.randn(4, 8), torch.ones(4)), ValueError, r"bias must have shape \(8,\)"),
           (tm.ops.linear_cross_entropy, (h, w, torch.tensor([1, 9, 2, 3]), 5), ValueError,
            r"target 9 is outside \[0, 5\)"),
           (tm.ops.linear_cross_entropy, (h, w, torch.tensor([1, -100, 2, 3]), 5), ValueError,
            r"target -100 is outside \[0, 5\)"),
           (tm.ops.linear_cross_entropy, (h, w, t[:3]), ValueError, "3 targets for 4 tokens")]
    for path in ("plain", "op"):
        monkeypatch.setenv("TINYMEG_OP_IMPL", ",".join(f"{op}={path}" for op in OPS))
        tm.ops.get_default_tuner().forget()
        for fn, args, error, message in bad:
            with pytest.raises(error, match=message):
                fn(*args)
    for path in ("plain", "op"):  # every target ignored: 0, not NaN, on both paths
        monkeypatch.setenv("TINYMEG_OP_IMPL", f"linear_cross_entropy={path}")
        tm.ops.get_default_tuner().forget()
        hr = h.clone().requires_grad_()
        loss = tm.ops.linear_cross_entropy(hr, w, torch.full((4,), -1))
        loss.backward()
        assert loss.item() == 0.0 and not hr.grad.any(), path


def _model_step(cfg, idx, targets):
    torch.manual_seed(0)
    model = tm.models.GPT2Model(cfg)
    loss = model(idx, targets, return_logits=False)[1]
    loss.backward()
    logits, _ = model(idx)
    return loss.detach(), logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_model_on_the_plain_path_equals_the_model_on_the_ops(monkeypatch):
    """GPT-2 with every op forced to its plain path, then to its custom op: same loss, logits and
    gradients (the MLP adds its bias in the matmul on the plain path, in the op's GELU pass otherwise)."""
    vocab = 65
    cfg = tm.models.GPTConfig.tiny(vocab_size=vocab)
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, vocab, (2, 8), generator=g), torch.randint(0, vocab, (2, 8), generator=g)
    targets[0, :3] = -1
    results = {}
    for path in ("plain", "op"):
        monkeypatch.setenv("TINYMEG_OP_IMPL", ",".join(f"{op}={path}" for op in OPS))
        tm.ops.get_default_tuner().forget()
        results[path] = _model_step(cfg, idx, targets)
    (loss_p, logits_p, grads_p), (loss_o, logits_o, grads_o) = results["plain"], results["op"]
    torch.testing.assert_close(loss_p, loss_o, **TOL[torch.float32])
    torch.testing.assert_close(logits_p, logits_o, **TOL[torch.float32])
    for n, g_p in grads_p.items():
        torch.testing.assert_close(g_p, grads_o[n], **TOL[torch.float32], msg=lambda m: f"grad of {n}: {m}")


def test_mlp_adds_its_bias_in_the_matmul_on_the_plain_path(monkeypatch):
    """Where bias + GELU takes the plain path, the MLP asks bias_gelu which path once (first call,
    on a product made for the question) and every call, the first too, calls its Linear whole (bias
    in the matmul: addmm) and GELU: activation checkpointing recomputes the first call and needs the
    same ops. Where it takes the op, every call goes through the op."""
    calls = []
    for path in ("plain", "op"):
        monkeypatch.setitem(gelu.PATHS, path, lambda *a, f=gelu.PATHS[path], p=path: calls.append(p) or f(*a))
    cfg = tm.models.GPTConfig.tiny()
    idx = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for path in ("plain", "op"):
        monkeypatch.setenv("TINYMEG_OP_IMPL", f"bias_gelu={path}")
        tm.ops.get_default_tuner().forget()
        model = tm.models.GPT2Model(cfg)
        for step in range(3):
            calls.clear()
            model(idx, idx, return_logits=False)[1].backward()
            expected = cfg.n_layer if path == "op" else 0
            assert calls == [path] * expected, (path, step, calls)


# ---------------------------------------------------------------- the tuner picks the plain path when it is faster

class FakeClock:
    """Time moves only when a costed function runs: costs are exact and free."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def __call__(self):
        return self.now

    def costed(self, name, fn, cost):
        def run(*args):
            self.now += cost
            self.calls.append(name)
            return fn(*args)
        return run


def _costed_paths(monkeypatch, clock, costs: dict):
    """Every op's paths (and the op's backward kernels) cost fake time: costs[(op, path)],
    costs[(op, "backward")] (added to the op path's backward)."""
    for op, module in OPS.items():
        for path in ("plain", "op"):
            monkeypatch.setitem(module.PATHS, path, clock.costed(f"{op}:{path}", module.PATHS[path],
                                                                 costs.get((op, path), 0.0)))
        for impl, f in list(module.BACKWARD.items()):
            monkeypatch.setitem(module.BACKWARD, impl, clock.costed(f"{op}_backward:{impl}", f,
                                                                    costs.get((op, "backward"), 0.0)))



def _tuning_tuner(tmp_path, clock):
    return RuntimeAutoTuner(warmup_iterations=1, measure_iterations=MIN_ROUNDS, clock=clock, enabled=True,
                            cache_dir=tmp_path, budget_s=None)


def test_tuner_picks_the_plain_path_when_faster_counting_the_backward(tmp_path, monkeypatch):
    clock = FakeClock()
    # forward: the op is faster; its backward costs more than it saves, so plain wins the step.
    # (bias_gelu: the op wins outright.)
    _costed_paths(monkeypatch, clock, {("layer_norm", "plain"): 2.0, ("layer_norm", "op"): 1.0,
                                       ("layer_norm", "backward"): 5.0,
                                       ("bias_gelu", "plain"): 3.0, ("bias_gelu", "op"): 1.0})
    tuner = _tuning_tuner(tmp_path, clock)
    tm.ops.set_default_tuner(tuner)
    x, w = torch.randn(2, 3, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    y = tm.ops.layer_norm(x, w, w)
    z = tm.ops.bias_gelu(y, w)
    chosen = {k.split("|")[0]: v for k, v in tuner.choices.items() if ":" in k.split("|")[0]}
    assert chosen == {"layer_norm:fwd+bwd": "plain", "bias_gelu:fwd+bwd": "op"}
    timings = tuner.timings[next(k for k in tuner.timings if k.startswith("layer_norm:fwd+bwd"))]
    assert timings == pytest.approx({"plain": 2.0, "op": 6.0}), "the op's backward is in what is timed"
    # the choice is what runs, without timing again
    clock.calls.clear()
    tm.ops.bias_gelu(tm.ops.layer_norm(x, w, w), w).sum().backward()
    assert clock.calls[:2] == ["layer_norm:plain", "bias_gelu:op"]
    # without a gradient the question is another one (forward only): the op wins layer_norm there
    with torch.no_grad():
        tm.ops.layer_norm(x, w, w)
    assert tuner.choices[tuner.key("layer_norm:fwd", (x, w, w, 1e-5))] == "op"
    assert torch.isfinite(z).all()


def test_loss_plain_path_only_where_its_logits_are_small(tmp_path, monkeypatch):
    """The plain path holds the whole logits: past PLAIN_MAX_LOGITS it is never timed, whatever
    the clock says, and the op runs; forcing it still works."""
    clock = FakeClock()
    _costed_paths(monkeypatch, clock, {("linear_cross_entropy", "plain"): 1.0, ("linear_cross_entropy", "op"): 3.0})
    monkeypatch.setattr(cross_entropy, "PLAIN_MAX_LOGITS", 40)
    tm.ops.set_default_tuner(_tuning_tuner(tmp_path, clock))
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True)
    t = torch.tensor([1, 2, 3, -1])
    tm.ops.linear_cross_entropy(h, w, t, vocab_size=10)  # 40 logits: both paths timed, plain wins
    assert "linear_cross_entropy:plain" in clock.calls
    clock.calls.clear()
    tm.ops.linear_cross_entropy(h, w, t, vocab_size=11)  # 44 logits: the op, untimed
    assert clock.calls == ["linear_cross_entropy:op"]
    monkeypatch.setenv("TINYMEG_OP_IMPL", "linear_cross_entropy=plain")
    tm.ops.get_default_tuner().forget()
    clock.calls.clear()
    tm.ops.linear_cross_entropy(h, w, t, vocab_size=11)
    assert clock.calls == ["linear_cross_entropy:plain"]


def test_second_run_reads_the_cache_and_times_nothing(tmp_path, monkeypatch):
    """A model's first step on a cold cache times each shape class once; a second process (a fresh
    tuner on the same cache) makes the same choices without running a candidate."""
    clock = FakeClock()
    _costed_paths(monkeypatch, clock, {("layer_norm", "plain"): 1.0, ("layer_norm", "op"): 2.0,
                                       ("bias_gelu", "plain"): 2.0, ("bias_gelu", "op"): 1.0,
                                       ("linear_cross_entropy", "plain"): 1.0, ("linear_cross_entropy", "op"): 2.0})
    cfg = tm.models.GPTConfig.tiny()
    idx = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    first = _tuning_tuner(tmp_path, clock)
    tm.ops.set_default_tuner(first)
    torch.manual_seed(0)
    model = tm.models.GPT2Model(cfg)
    model(idx, idx, return_logits=False)[1].backward()
    assert clock.calls and first.timings, "a cold cache: timed"
    decided = dict(first.choices)
    model(idx, idx, return_logits=False)[1].backward()
    assert first.choices == decided, "a shape class is decided once"
    clock.calls.clear()
    second = _tuning_tuner(tmp_path, clock)
    tm.ops.set_default_tuner(second)
    torch.manual_seed(0)
    tm.models.GPT2Model(cfg)(idx, idx, return_logits=False)[1].backward()
    assert second.timings == {} and second.tuning_s == 0.0
    assert all(decided[k] == v for k, v in second.choices.items())
    assert {k.split("|")[0] for k in second.choices} == {"layer_norm:fwd+bwd", "bias_gelu:fwd+bwd",
                                                        "linear_cross_entropy:fwd+bwd", "bias_gelu",
                                                        "bias_gelu_backward"}
    # only the chosen paths ran
    assert {c for c in clock.calls if "_backward" not in c} == {"bias_gelu:op", "layer_norm:plain",
                                                                "linear_cross_entropy:plain"}


# ---------------------------------------------------------------- every rank takes rank 0's decisions

def _ranks_agree_body(tmp_dir):
    import torch.distributed as dist
    rank = dist.get_rank()
    clock = FakeClock()
    # rank 0 finds the op faster for bias_gelu and plain faster for layer_norm; rank 1 the reverse
    fast, slow = (1.0, 3.0) if rank == 0 else (3.0, 1.0)
    costs = {("layer_norm", "plain"): fast, ("layer_norm", "op"): slow,
             ("bias_gelu", "plain"): slow, ("bias_gelu", "op"): fast}
    saved = {op: (dict(m.PATHS), dict(m.BACKWARD)) for op, m in OPS.items()}
    env = {k: os.environ.pop(k, None) for k in ("TINYMEG_AUTOTUNE", "TINYMEG_OP_IMPL")}
    previous = tm.ops.set_default_tuner(RuntimeAutoTuner(
        warmup_iterations=1, measure_iterations=MIN_ROUNDS, clock=clock, enabled=True, budget_s=None,
        cache_dir=f"{tmp_dir}/rank{rank}"))
    try:
        for op, m in OPS.items():
            for path in ("plain", "op"):
                m.PATHS[path] = clock.costed(f"{op}:{path}", m.PATHS[path], costs.get((op, path), 0.0))
        ctx = get_ctx(tp=2)
        torch.manual_seed(0)
        model = tm.apply_tensor_parallel(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), ctx)
        idx = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(0))
        with tm.ops.synchronized():
            model(idx, idx, return_logits=False)[1].backward()
        tuner = tm.ops.get_default_tuner()
        decided = dict(tuner.choices)
        model(idx, idx, return_logits=False)[1].backward()  # outside synchronized(): decided, no collective
        assert tuner.choices == decided
        return decided, len(tuner.timings)
    finally:
        tm.ops.set_default_tuner(previous)
        for op, m in OPS.items():
            m.PATHS.update(saved[op][0])
            m.BACKWARD.update(saved[op][1])
        os.environ.update({k: v for k, v in env.items() if v is not None})


def test_every_rank_takes_rank0s_decisions(tmp_path):
    (choices0, timed0), (choices1, timed1) = world(2).run(_ranks_agree_body, str(tmp_path))
    assert choices0 == choices1, "rank 1 adopted rank 0's choices, the op's kernels included"
    paths_chosen = {k.split("|")[0]: v for k, v in choices0.items() if ":" in k.split("|")[0]}
    assert paths_chosen["layer_norm:fwd+bwd"] == "plain" and paths_chosen["bias_gelu:fwd+bwd"] == "op"
    assert any(k.startswith("bias_gelu_backward|") for k in choices1), "kernels rank 0 tuned inside the path"
    assert timed0 > 0 and timed1 == 0, "rank 0 timed every candidate, rank 1 none"


# ---------------------------------------------------------------- torch.compile: plain paths, one graph, no recompile

def test_compiled_steps_take_the_plain_paths_in_one_graph_without_recompiles(monkeypatch):
    """Three training steps of a compiled GPT-2 and its compiled optimizer step (the learning rate
    changing every step, as the schedule does): one graph each, no graph break (fullgraph=True),
    no recompile; the model's graph holds aten's layer_norm and gelu, which inductor fuses, and no
    tinymeg op; the parameters equal eager training's. The dynamo graphs run eagerly here
    (CompileCounter): what is tested is tracing, the compile tests run inductor."""
    from torch._dynamo.testing import CompileCounter

    from tinymeg.train.optim import build_optimizer, compile_step
    torch._dynamo.reset()
    cfg = tm.models.GPTConfig.tiny()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 65, (2, 16), generator=g), torch.randint(0, 65, (2, 16), generator=g))
               for _ in range(3)]
    models, optimizers = [], []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(tm.models.GPT2Model(cfg))
        optimizers.append(build_optimizer(models[-1], 1e-3, 0.1))
    graphs, model_counter, opt_counter = [], CompileCounter(), CompileCounter()

    def capture(gm, example_inputs):  # counts the graph and keeps it
        graphs.append(gm)
        return model_counter(gm, example_inputs)
    compiled = torch.compile(models[1], fullgraph=True, backend=capture)
    steps = (lambda i, x, y: models[0](x, y, return_logits=False)[1],
             lambda i, x, y: compiled(x, y, return_logits=False)[1])
    opt_steps = (optimizers[0].step, compile_step(optimizers[1], backend=opt_counter))
    for i, (x, y) in enumerate(batches):
        for model, opt, loss_fn, opt_step in zip(models, optimizers, steps, opt_steps):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (i + 1)
            loss_fn(i, x, y).backward()
            opt_step()
            opt.zero_grad(set_to_none=True)
    assert model_counter.frame_count == 1 and opt_counter.frame_count == 1, "one graph each, no recompile"
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("layer_norm" in t for t in targets) and any("gelu" in t for t in targets), targets
    assert not any("tinymeg" in t for t in targets), f"custom ops in the graph: {targets}"
    assert isinstance(optimizers[1].param_groups[0]["lr"], float), "groups keep a float lr between steps"
    for (n, p0), p1 in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p1, p0, **TOL[torch.float32], msg=lambda m: f"{n} after 3 steps: {m}")


def test_compiled_loss_keeps_the_op_where_the_logits_are_big(monkeypatch):
    """Past PLAIN_MAX_LOGITS the compiled graph calls tinymeg::linear_cross_entropy (it never
    holds the logits; inductor would); a forced path is taken under compile too."""
    monkeypatch.setattr(cross_entropy, "PLAIN_MAX_LOGITS", 16)
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward
    h, w, t = torch.randn(4, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True), torch.tensor([1, 2, 3, -1])
    fn = torch.compile(tm.ops.linear_cross_entropy, fullgraph=True, backend=capture)
    eager = tm.ops.linear_cross_entropy(h, w, t, 10)
    torch.testing.assert_close(fn(h, w, t, 10), eager)  # 40 logits > 16: the op
    assert any("tinymeg.linear_cross_entropy" in target for target in graphs[-1]), graphs[-1]
    monkeypatch.setenv("TINYMEG_OP_IMPL", "linear_cross_entropy=plain,layer_norm=op")
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(tm.ops.linear_cross_entropy, fullgraph=True, backend=capture)(h, w, t, 10), eager)
    assert not any("tinymeg" in target for target in graphs[-1]), graphs[-1]
    torch.compile(tm.ops.layer_norm, fullgraph=True, backend=capture)(h)
    assert any("tinymeg.layer_norm" in target for target in graphs[-1]), graphs[-1]
