"""Activation checkpointing: the same losses, gradients and AdamW steps as without it, on every mesh.

``ac="full"`` and ``ac="selective"`` against ``ac="none"`` on the same mesh and the same batches:
GPT-2 and Llama unsharded, (tp2 + SP + LP), (cp2, tp2), (dp2, ZeRO-3), (dp2 = ep2, MoE), (pp2), and
compiled; with dropout wherever the mesh allows it (CP refuses attention dropout). A recomputation
runs the very ops of the forward on the same inputs with the RNG state replayed, so the results
are bit-identical (asserted to 1e-6, the issue's bound). Also: the recomputation happens (the
forward's ops run again in backward, and selective skips the ones it keeps), the autotuner's
first decisions inside a checkpoint, and the errors.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import tinymeg as tm
from rank_pool import get_ctx, world
from tinymeg.nn.layers import local
from tinymeg.parallel.activation_checkpoint import CheckpointedBlock, transformer_blocks

MODES = ("full", "selective")
MODELS = ("gpt2", "llama")
TOL = dict(rtol=1e-6, atol=1e-6)


def _config(kind, **kw):
    """The tiny config of tinymeg's model ``kind`` (tm.models.MODELS)."""
    return tm.models.MODELS[kind][1].tiny(**kw)


def _model(cfg):
    return next(cls for cls, config_cls in tm.models.MODELS.values() if type(cfg) is config_cls)(cfg)


def _batches(cfg, n_seq, seq, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, cfg.vocab_size, (n_seq, seq), generator=g),
             torch.randint(0, cfg.vocab_size, (n_seq, seq), generator=g)) for _ in range(steps)]


def _train(cfg, ctx, ac, batches, parallel_kw=None, fail_first=False):
    """Losses, then local gradients and parameters after the last of len(batches) AdamW steps.
    ctx None: one process, no mesh (parallel_kw: compile=True or not). ``fail_first``: first a
    step whose recomputation raises in the first block's MLP (as an out-of-memory error would)."""
    torch.manual_seed(0)
    if ctx is None:
        model = tm.apply_activation_checkpointing(_model(cfg), ac)
        if (parallel_kw or {}).get("compile"):
            model.compile(fullgraph=True)
    else:
        model = tm.parallelize(_model(cfg), ctx, ac=ac, **(parallel_kw or {}))
    blocks = transformer_blocks(model)
    assert blocks and all(isinstance(b, CheckpointedBlock) == (ac != "none") for b in blocks)
    if fail_first:
        _step_that_fails_in_recomputation(model, blocks[0].mlp, *batches[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses = []
    for step, (x, y) in enumerate(batches):
        torch.manual_seed(100 + step)  # dropout: the same draws for every mode
        opt.zero_grad(set_to_none=True)
        if ctx is not None and ctx.pp_size > 1:
            loss = model.train_step(x, y)
        else:
            loss = model(x, y, return_logits=False)[1]
            loss.backward()
        losses.append(loss.detach())
        grads = {n: local(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return losses, grads, {n: local(p).detach().clone() for n, p in model.named_parameters()}


def _step_that_fails_in_recomputation(model, module, x, y):
    def fail_in_backward(*_):
        if torch._C._current_graph_task_id() != -1:  # inside backward: the recomputation
            raise RuntimeError("injected failure in the recomputation")
    hook = module.register_forward_pre_hook(fail_in_backward)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            model(x, y, return_logits=False)[1].backward()
    finally:
        hook.remove()
    model.zero_grad(set_to_none=True)


def _compare(got, want, what):
    losses, grads, params = got
    torch.testing.assert_close(losses, want[0], **TOL, msg=lambda m: f"{what} losses: {m}")
    assert grads.keys() == want[1].keys(), what
    for name in grads:
        torch.testing.assert_close(grads[name], want[1][name], **TOL, msg=lambda m: f"{what} grad of {name}: {m}")
    for name in params:
        torch.testing.assert_close(params[name], want[2][name], **TOL, msg=lambda m: f"{what} {name}: {m}")


def _modes_body(kind, dims, cfg_kw, parallel_kw, n_seq, seq, steps=2):
    ctx = get_ctx(**dims)
    cfg = _config(kind, **{"block_size": seq, **cfg_kw})
    batches = _batches(cfg, n_seq, seq, steps, seed=ctx.dp_rank)  # each dp rank its own sequences
    want = _train(cfg, ctx, "none", batches, parallel_kw)
    for mode in MODES:
        _compare(_train(cfg, ctx, mode, batches, parallel_kw), want, f"{kind}, ac={mode} on {dims}")


# ---- one process

@given(kind=st.sampled_from(MODELS), mode=st.sampled_from(MODES), dropout=st.sampled_from([0.0, 0.1]),
       n_layer=st.integers(1, 2), seq=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_ac_equals_no_ac_unsharded(kind, mode, dropout, n_layer, seq, seed):
    cfg = _config(kind, dropout=dropout, n_layer=n_layer, block_size=12)
    batches = _batches(cfg, 2, seq, 2, seed)
    _compare(_train(cfg, None, mode, batches), _train(cfg, None, "none", batches), f"{kind}, ac={mode}")


@pytest.mark.parametrize("kind", MODELS)
def test_ac_with_the_autotuner_deciding_inside_the_checkpoint(kind, fresh_tuner):
    """The tuner's first calls time their candidates (forward and backward) inside a block's
    checkpointed forward; the recomputation looks the choices up. Neither may see the other."""
    cfg = _config(kind, dropout=0.1)
    batches = _batches(cfg, 2, 16, 1)
    for mode in MODES:
        tm.ops.get_default_tuner().forget()  # every op decides again, inside this mode's checkpoint
        got = _train(cfg, None, mode, batches)
        _compare(got, _train(cfg, None, "none", batches), f"{kind}, ac={mode}, tuner deciding")


class _ForwardOpsInBackward(TorchDispatchMode):
    """Counts, by op, the forward ops that run while backward runs (a recomputation's)."""

    FORWARD_OPS = {torch.ops.aten.native_layer_norm.default: "layer_norm",
                   torch.ops.aten.addmm.default: "addmm",
                   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: "attention"}

    def __init__(self):
        super().__init__()
        self.counts = dict.fromkeys(self.FORWARD_OPS.values(), 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORWARD_OPS:
            self.counts[self.FORWARD_OPS[func]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode, recomputed", [
    ("none", {"layer_norm": 0, "addmm": 0, "attention": 0}),
    # each of 2 blocks: both norms, attention, the Linears up to the last one backward needs the
    # input of (the MLP's c_proj: its output is not needed, torch stops the recomputation there)
    ("full", {"layer_norm": 4, "addmm": 6, "attention": 2}),
    # the norms again; of the products only attention's output projection (to rebuild the stream
    # that ln_2 normalizes; the MLP's is never needed); attention's output is kept
    ("selective", {"layer_norm": 4, "addmm": 2, "attention": 0}),
])
def test_the_forward_is_recomputed_in_backward(mode, recomputed, fresh_tuner, monkeypatch):
    """A no-op checkpoint would recompute nothing: this counts what backward runs again. (The
    counts name aten ops, so every tinymeg op takes its plain path here: the tuner's pick must not
    change which ops run.)"""
    monkeypatch.setenv("TINYMEG_OP_IMPL", ",".join(f"{op}=plain" for op in tm.ops.OPS))
    torch.manual_seed(0)
    model = tm.apply_activation_checkpointing(tm.models.GPT2Model(tm.models.GPTConfig.tiny()), mode)
    x, y = _batches(model.config, 2, 16, 1)[0]
    loss = model(x, y, return_logits=False)[1]
    with _ForwardOpsInBackward() as counter:
        loss.backward()
    assert counter.counts == recomputed


@pytest.mark.parametrize("kind", MODELS)
def test_blocks_are_found_and_keep_their_names(kind):
    model = _model(_config(kind, n_layer=3))
    keys, blocks = list(model.state_dict()), list(model.get_submodule(model.BLOCKS))
    classes = [type(b) for b in blocks]
    tm.apply_activation_checkpointing(model, "selective")
    assert transformer_blocks(model) == blocks
    assert all(isinstance(b, CheckpointedBlock) and isinstance(b, c) for b, c in zip(blocks, classes))
    assert list(model.state_dict()) == keys
    with torch.no_grad():  # eval/generation: no checkpoint, the block's own forward
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2)


def test_bad_uses_are_clear_errors():
    model = tm.models.GPT2Model(tm.models.GPTConfig.tiny())
    with pytest.raises(ValueError, match=r"activation checkpointing mode 'partial' is not one of none, full, "
                                         r"selective: use 'full' .* or 'none'"):
        tm.parallelize(model, None, ac="partial")
    assert not isinstance(model.transformer.h[0], CheckpointedBlock)  # refused before any change
    tm.apply_activation_checkpointing(model, "full")
    with pytest.raises(ValueError, match="already applied to this model; apply it once"):
        tm.apply_activation_checkpointing(model, "selective")
    with pytest.raises(ValueError, match=r"found no blocks in Linear: .* ModuleList of transformer blocks"):
        tm.apply_activation_checkpointing(torch.nn.Linear(2, 2), "full")


@pytest.mark.parametrize("kind, mode", [("gpt2", "full"), ("llama", "selective")])  # each mode and model once
def test_compiled_ac_equals_compiled_without(kind, mode):
    """fullgraph compile traces the checkpoints (the partitioner then decides what to recompute,
    keeping what the policy must save, and never redraws dropout): as compiled without AC."""
    cfg = _config(kind, dropout=0.1, n_layer=1, block_size=16)
    batches = _batches(cfg, 2, 16, 2)
    want = _train(cfg, None, "none", batches, dict(compile=True))
    _compare(_train(cfg, None, mode, batches, dict(compile=True)), want, f"compiled {kind}, ac={mode}")


# ---- every mesh the issue names: AC against no AC on the same ranks

MESHES = [
    pytest.param(2, {"tp": 2}, dict(dropout=0.1), dict(sequence_parallel=True, loss_parallel=True), 2, 8, id="tp2-sp-lp"),
    pytest.param(4, {"cp": 2, "tp": 2}, {}, dict(sequence_parallel=True), 2, 16, id="cp2-tp2-sp"),
    pytest.param(2, {"dp": 2}, dict(dropout=0.1), dict(zero=3), 2, 8, id="dp2-zero3"),
    pytest.param(2, {"dp": 2, "ep": 2}, dict(dropout=0.1, n_experts=4), {}, 2, 8, id="ep2-moe"),
    pytest.param(2, {"pp": 2}, dict(dropout=0.1), dict(pipeline=dict(schedule="1f1b", microbatches=2)), 4, 8, id="pp2"),
]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("world_size, dims, cfg_kw, parallel_kw, n_seq, seq", MESHES)
def test_ac_equals_no_ac_on_every_mesh(kind, world_size, dims, cfg_kw, parallel_kw, n_seq, seq):
    world(world_size).run(_modes_body, kind, dims, cfg_kw, parallel_kw, n_seq, seq)


def _failure_body(mode):
    ctx = get_ctx(tp=2)
    cfg = _config("gpt2", dropout=0.1, block_size=8)
    batches, kw = _batches(cfg, 2, 8, 2), dict(sequence_parallel=True)
    _compare(_train(cfg, ctx, mode, batches, kw, fail_first=True), _train(cfg, ctx, mode, batches, kw),
             f"ac={mode} after a failed recomputation")


@pytest.mark.parametrize("mode", MODES)
def test_a_recomputation_that_raises_leaves_the_model_as_it_was(mode):
    """A backward that raised inside a block's recomputation (tp2 + SP: the TP activation state
    is left mid-block) is caught; the next steps are those of a model that never failed."""
    world(2).run(_failure_body, mode)


# ---- the trainer and the command line

TRAIN = dict(steps=4, n_layer=2, n_head=4, n_embd=32, seq_len=16, micro_batch=2, dropout=0.1, eval_every=0,
             eval_iters=1, sample_tokens=0, progress=False, warmup=1)


def _trainer_body(ckpt_dir):
    """A run with --ac none saving at step 2, the same run resumed there with --ac selective."""
    from tinymeg.data import load_corpus
    from tinymeg.train import TrainConfig, train
    from tinymeg.train.report import banner
    ctx = get_ctx()
    straight = train(TrainConfig(**TRAIN, ckpt_dir=ckpt_dir, ckpt_every=2), ctx=ctx)
    resumed = train(TrainConfig(**TRAIN, ac="selective", resume_from=f"{ckpt_dir}/step_000002"), ctx=ctx)
    cfg = TrainConfig(**TRAIN, ac="selective", dp=1)
    text = banner(cfg, ctx, resumed["model"], load_corpus(None, "char"), peak=(1e12, "test"), start_step=2,
                  resumed_from=None)
    return straight["losses"], resumed["losses"], text


def test_trainer_resumes_with_another_ac_mode(tmp_path):
    """Checkpoints do not depend on the mode (same modules, names, RNG streams): a run saved
    without AC resumes with selective AC on the losses it would have had."""
    straight, resumed, text = world(1).run(_trainer_body, str(tmp_path / "ckpt"))[0]
    assert resumed == pytest.approx(straight[2:], rel=1e-6, abs=0)
    assert "selective activation checkpointing" in text


def test_ac_flag(monkeypatch, capsys):
    from tinymeg.train import TrainConfig
    from tinymeg.train.checks import ConfigError, check_config
    from tinymeg.train.cli import parse_args
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)
    assert parse_args(["--ac", "selective"]).ac == "selective" and parse_args([]).ac == "none"
    with pytest.raises(SystemExit) as e:
        parse_args(["--ac", "some"])
    assert e.value.code == 2 and "argument --ac: invalid choice: 'some'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--ac: activation checkpointing mode 'some' is not one of"):
        check_config(TrainConfig(ac="some"), 1)


def test_a_transformers_model_is_checkpointed_without_knowing_its_class():
    """A Hugging Face Llama (hidden_states and keyword arguments into each decoder layer, GQA,
    rotary positions, dropout on attention): its layers are found, and its loss and gradients
    are those without AC."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extra: pip install -e '.[test]'")
    from test_hf_models import hf_model
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("none", *MODES):
        torch.manual_seed(0)
        model = tm.apply_activation_checkpointing(hf_model("llama", 2, attention_dropout=0.1), mode)
        assert len(transformer_blocks(model)) == 2
        torch.manual_seed(1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[mode] = ([loss.detach()], {n: p.grad for n, p in model.named_parameters()}, {})
    for mode in MODES:
        _compare(results[mode], results["none"], f"transformers Llama, ac={mode}")
