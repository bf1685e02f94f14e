"""tinymeg's Llama: the model (Llama's MLP rounding, GQA, rotary with Llama 3 scaling, padding kept
out of the loss and sampling, the KV cache), its weights in and out of transformers' format, and
every parallel dim on it against one process.

Tolerances: fp32, atol=rtol=1e-5 (float reassociation only; tinymeg's fused kernels and
transformers' differ by it too). Parallel runs compare the loss over the global batch, every
gradient and the parameters after an AdamW step, as tests/test_tensor_parallel.py does; the AdamW
step uses eps=1e-4 for the reason given in tests/test_context_parallel.py (a gradient cancelling
to ~1e-7 keeps its reassociation noise below 1e-6 of a step).
"""
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tinymeg as tm
from rank_pool import get_ctx, world
from test_tensor_parallel import assert_close
from tinymeg.models import Llama, LlamaConfig
from tinymeg.models.llama import rope_frequencies

hf = pytest.importorskip("transformers", reason="transformers is in the [test] extra: pip install -e '.[test]'")
from safetensors.torch import load_file, save_file  # noqa: E402  (a dependency of transformers)

ATOL = RTOL = 1e-5
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _ids(vocab=65, T=24, seed=0, B=2):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the model (one process)

def test_llama_mlp_width_follows_llamas_rounding():
    assert LlamaConfig(n_embd=4096).ffn_hidden_size == 11008                       # Llama 2 7B
    assert LlamaConfig(n_embd=4096, ffn_dim_multiplier=1.3, multiple_of=1024).ffn_hidden_size == 14336  # Llama 3 8B
    assert LlamaConfig(n_embd=4096, ffn_hidden=1000).ffn_hidden_size == 1000


@pytest.mark.parametrize("kw, message", [
    (dict(n_kv_head=3), r"n_kv_head=3 must divide n_head=4"),
    (dict(n_embd=12, n_kv_head=0), r"head_dim = n_embd / n_head = 3 must be even"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), r"rope_scaling type 'yarn' is not one"),
    (dict(n_experts=2, top_k=3), r"top_k=3 must be between 1 and n_experts=2"),
])
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.tiny(**kw)


def test_padded_vocabulary_is_kept_out_of_loss_and_sampling():
    """65 tokens padded to 128 rows: logits have 65 columns; making the padded rows' logits huge
    changes neither the loss (both paths) nor what is sampled."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny()).eval()
    assert model.lm_head.weight.shape[0] == 128 and model.lm_head.weight is not model.model.embed_tokens.weight
    x = _ids(T=16)
    logits, loss = model(x, x)
    assert logits.shape[-1] == 65
    with torch.no_grad():
        model.lm_head.weight[65:] = 100.0
    logits2, loss2 = model(x, x)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(model(x, x, return_logits=False)[1], loss, atol=ATOL, rtol=RTOL)
    out = model.generate(x[:, :2], 30, generator=torch.Generator().manual_seed(0))
    assert out.max() < 65


def test_tied_head_is_one_parameter():
    model = Llama(LlamaConfig.tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


@pytest.mark.parametrize("kw", [{}, dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), dict(n_experts=4)])
def test_kv_cache_gives_the_no_cache_tokens(kw):
    """Prompts crossing block_size (the window slides): cached and recomputed generation agree."""
    torch.manual_seed(1)
    model = Llama(LlamaConfig.tiny(block_size=16, **kw)).eval()
    prompt = _ids(T=5, seed=1)
    gen = lambda cache: model.generate(prompt, 20, top_k=10, generator=torch.Generator().manual_seed(2),  # noqa: E731
                                       kv_cache=cache)
    assert torch.equal(gen(True), gen(False))


def test_rotary_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for scaling in (None, LLAMA3_ROPE):
        params = {"rope_theta": 500000.0, **(scaling or {"rope_type": "default"})}
        cfg = hf.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=params)
        want, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, None) if scaling else (
            1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16), None)
        torch.testing.assert_close(rope_frequencies(16, 500000.0, scaling), want, atol=0, rtol=0)


def test_fused_ops_and_plain_paths_give_the_same_model(monkeypatch):
    """Every op of the model forced to its plain path, then to its custom op: same loss and gradients."""
    x = _ids(T=16)
    results = []
    for path in ("plain", "op"):
        monkeypatch.setenv("TINYMEG_OP_IMPL", ",".join(f"{op}={path}" for op in tm.ops.LLAMA_OPS))
        tm.ops.get_default_tuner().forget()
        torch.manual_seed(0)
        model = Llama(LlamaConfig.tiny())
        loss = model(x, x, return_logits=False)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    tm.ops.get_default_tuner().forget()
    torch.testing.assert_close(results[0][0], results[1][0], atol=ATOL, rtol=RTOL)
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


# ---- weights in and out of transformers' format

def hf_llama(tie=False, seed=0, **kw):
    """A tiny transformers Llama: GQA (4 heads, 2 kv heads), Llama 3 rope scaling, untied head,
    an odd vocabulary (tinymeg pads it)."""
    torch.manual_seed(seed)
    cfg = hf.LlamaConfig(**{**dict(vocab_size=65, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   rms_norm_eps=1e-6, tie_word_embeddings=tie,
                                   rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}), **kw})
    model = hf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms that are not all ones: their weights must land in the right place
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(path_or_model, ids):
    model = path_or_model if isinstance(path_or_model, torch.nn.Module) else \
        hf.LlamaForCausalLM.from_pretrained(path_or_model).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    model = hf_llama()
    model.save_pretrained(path)
    return str(path), hf_logits(model, _ids(T=32))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_transformers_tinymeg_transformers(tmp_path, tie):
    src = tmp_path / "src"
    model = hf_llama(tie=tie)
    model.save_pretrained(src)
    want = hf_logits(model, _ids(T=32))
    ours = Llama.from_pretrained(str(src)).eval()
    c = ours.config
    assert (c.n_kv_head, c.tie_embeddings, c.rope_scaling["rope_type"], c.padded_vocab_size) == (2, tie, "llama3", 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids(T=32))[0], want, atol=ATOL, rtol=RTOL)
    ours.save_pretrained(tmp_path / "back", max_shard_mb=0.02)   # several files and their index
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(hf_logits(str(tmp_path / "back"), _ids(T=32)), want, atol=ATOL, rtol=RTOL)
    original = load_file(src / "model.safetensors")
    back = Llama.from_pretrained(str(tmp_path / "back")).state_dict()
    for k, t in original.items():
        assert torch.equal(back[k][:t.shape[0]], t), f"{k}: weights move, they do not change"


def _sharded_save_body(path, out, want):
    ctx = get_ctx(tp=2)
    model = tm.parallelize(Llama.from_pretrained(path), ctx, sequence_parallel=True).eval()
    with torch.no_grad():
        assert_close(model(_ids(T=32))[0], want, "logits of the tensor-parallel model")
    model.save_pretrained(out)   # every rank: gathers the shards; rank 0 writes


def test_save_from_a_tensor_parallel_model(hf_dir, tmp_path):
    path, want = hf_dir
    out = str(tmp_path / "from_tp2")
    world(2).run(_sharded_save_body, path, out, want)
    torch.testing.assert_close(hf_logits(out, _ids(T=32)), want, atol=ATOL, rtol=RTOL)


def _bad_dir(tmp_path, src, edit_tensors=None, edit_config=None):
    bad = tmp_path / "bad"
    bad.mkdir(exist_ok=True)
    config = json.loads(Path(src, "config.json").read_text())
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text(json.dumps(config))
    return str(bad)


def _set(d, key, value):
    d[key] = value


BAD = {
    "missing": (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), None, r"model.layers.1.mlp.up_proj.weight is missing"),
    "extra": (lambda t: _set(t, "model.layers.0.self_attn.q_norm.weight", torch.ones(8)), None,
              r"model.layers.0.self_attn.q_norm.weight is not a Llama tensor"),
    "wrong shape": (lambda t: _set(t, "model.layers.0.self_attn.k_proj.weight", torch.zeros(32, 32)), None,
                    r"model.layers.0.self_attn.k_proj.weight has shape \(32, 32\), config.json says \(16, 32\)"),
    "not llama": (None, lambda c: _set(c, "model_type", "qwen2"), r"is a 'qwen2' config, not Llama's.*tm.plans"),
    "bias": (None, lambda c: _set(c, "attention_bias", True), r"attention_bias=True is a Llama variant"),
    "rope": (None, lambda c: _set(c, "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
             r"rope type='yarn' is a Llama variant tinymeg's Llama does not compute"),
    "activation": (None, lambda c: _set(c, "hidden_act", "gelu"), r"hidden_act='gelu'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_pretrained_directories_are_clear_errors(hf_dir, tmp_path, case):
    edit_tensors, edit_config, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        Llama.from_pretrained(_bad_dir(tmp_path, hf_dir[0], edit_tensors, edit_config))


def test_older_transformers_rope_fields_are_read(hf_dir, tmp_path):
    """transformers 4 wrote rope_theta and rope_scaling (with "type") instead of rope_parameters."""
    def old(c):
        params = c.pop("rope_parameters")
        c["rope_theta"] = params.pop("rope_theta")
        c["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    path, want = hf_dir
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(_bad_dir(tmp_path, path, None, old)).eval()(_ids(T=32))[0],
                                   want, atol=ATOL, rtol=RTOL)


# ---- every parallel dim on it, against one process

def _dp_mean(t, ctx):
    t = t.detach().clone()
    if ctx.dp_size > 1:
        dist.all_reduce(t, group=ctx.mesh["dp"].get_group())
    return t / ctx.dp_size


def _parallel_body(dims, options, cfg_kw, seed, micro=2, seq=16):
    """The same Llama unsharded and under tm.parallelize(ctx, **options): the global batch's
    loss, every gradient and the parameters after an AdamW step."""
    ctx = get_ctx(**dims)
    cfg = LlamaConfig.tiny(block_size=seq, **cfg_kw)
    torch.manual_seed(seed)
    ref = Llama(cfg)
    torch.manual_seed(seed)
    model = tm.parallelize(Llama(cfg), ctx, **options)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (ctx.dp_size * micro, seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (ctx.dp_size * micro, seq), generator=g)
    y[:, :3] = -1   # ignored targets, the same number in every row (each dp rank's mean weighs alike)
    mine = slice(ctx.dp_rank * micro, (ctx.dp_rank + 1) * micro)
    ref_loss = ref(x, y, return_logits=False)[1]
    loss = model(x[mine], y[mine], return_logits=False)[1]
    assert_close(_dp_mean(loss, ctx), ref_loss.detach(), "loss over the global batch")
    with torch.no_grad():
        ref.eval(), model.eval()
        assert_close(model(x[mine])[0], ref(x[mine])[0], "logits")
        multiple = ctx.tp_size if options.get("sequence_parallel") else 1
        texts = [m.generate(x[:1, :5], 6, top_k=5, generator=torch.Generator().manual_seed(seed),
                            context_multiple=multiple) for m in (ref, model)]
        assert torch.equal(texts[0], texts[1]), ("sampled text", texts)
        ref.train(), model.train()
    ref_loss.backward()
    loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, ref_params[name].grad, f"grad of {name}")
    for m in (ref, model):
        torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.1).step()
    for name, p in model.named_parameters():
        assert_close(p, ref_params[name].detach(), f"{name} after AdamW")


SP_LP = dict(sequence_parallel=True, loss_parallel=True)
MESHES_2 = {
    "tp2 sp lp": ({"tp": 2}, SP_LP, {}),
    "tp2 sp lp tied": ({"tp": 2}, SP_LP, dict(tie_embeddings=True)),
    "dp2 zero3": ({"dp": 2}, dict(zero=3), {}),
    "dp2 ep2 moe": ({"dp": 2, "ep": 2}, {}, dict(n_experts=4, moe_every=2, rope_scaling=LLAMA3_ROPE)),
}


@pytest.mark.parametrize("mesh", MESHES_2)
def test_llama_on_two_ranks_equals_one_process(mesh):
    dims, options, cfg_kw = MESHES_2[mesh]
    world(2).run(_parallel_body, dims, options, cfg_kw, seed=3)


def test_llama_cp2_tp2_equals_one_process():
    """Rotary angles from CP's load-balanced layout, ring attention over repeated kv heads, SP."""
    world(4).run(_parallel_body, {"cp": 2, "tp": 2}, SP_LP, dict(rope_scaling=LLAMA3_ROPE), seed=5)


def _pipeline_body(dims, options, cfg_kw, seed, micro=4, seq=16):
    """pp=2, 2 microbatches: the stages split by the parts the model names (tinymeg.models.base),
    rotary positions recomputed on each stage (from the whole sequence when it arrives on sequence
    shards); the loss, each stage's gradients, an AdamW step, eval logits and sampled text equal
    the unsharded model's."""
    ctx = get_ctx(**dims)
    cfg = LlamaConfig.tiny(block_size=seq, n_layer=4, **cfg_kw)
    torch.manual_seed(seed)
    ref = Llama(cfg)
    torch.manual_seed(seed)
    model = tm.parallelize(Llama(cfg), ctx, pipeline=dict(schedule="1f1b", microbatches=2), **options)
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, cfg.vocab_size, (micro, seq), generator=g) for _ in range(2))
    y[:, :3] = -1
    ref_loss = ref(x, y, return_logits=False)[1]
    ref_loss.backward()
    assert_close(model.train_step(x, y), ref_loss.detach(), "loss")
    ref_params = dict(ref.named_parameters())
    mine = dict(model.named_parameters())
    assert mine and set(mine) < set(ref_params), "each stage holds some of the parameters, by their own names"
    for name, p in mine.items():
        assert_close(p.grad, ref_params[name].grad, f"grad of {name}")
    for m in (ref, model):
        torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.1).step()
    for name, p in mine.items():
        assert_close(p, ref_params[name].detach(), f"{name} after AdamW")
    with torch.no_grad():
        ref.eval(), model.eval()
        assert_close(model(x)[0], ref(x)[0], "eval logits")
        multiple = ctx.tp_size if options.get("sequence_parallel") else 1
        texts = [m.generate(x[:1, :5], 6, top_k=5, generator=torch.Generator().manual_seed(seed),
                            context_multiple=multiple) for m in (ref, model)]
        assert torch.equal(texts[0], texts[1]), ("sampled text", texts)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_pp2_equals_one_process(tie):
    world(2).run(_pipeline_body, {"pp": 2}, {}, dict(tie_embeddings=tie, rope_scaling=LLAMA3_ROPE), seed=7)


def test_llama_pp2_tp2_sp_equals_one_process():
    """The second stage receives its input on sequence shards: its rotary positions are the whole sequence's."""
    world(4).run(_pipeline_body, {"pp": 2, "tp": 2}, SP_LP, dict(rope_scaling=LLAMA3_ROPE), seed=9)


def _compile_body():
    cfg = LlamaConfig.tiny(n_layer=1, block_size=16, rope_scaling=LLAMA3_ROPE)
    x = _ids(T=16)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tm.parallelize(Llama(cfg), get_ctx(), compile=compiled)
        loss = model(x, x, return_logits=False)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=ATOL, rtol=RTOL)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def test_llama_compiles_fullgraph_and_matches_eager():
    """tm.parallelize(compile=True) on one process: one graph (fullgraph) with the ops' compile-time paths."""
    world(1).run(_compile_body)


def _gqa_error_body():
    with pytest.raises(ValueError, match=r"self_attn. has n_kv_head=1, not divisible by tp=2: tensor parallelism splits attention by whole heads"):
        tm.parallelize(Llama(LlamaConfig.tiny(n_kv_head=1)), get_ctx(tp=2))


def test_kv_heads_not_divisible_by_tp_is_a_clear_error():
    world(2).run(_gqa_error_body)


# ---- the trainer's flags

@pytest.mark.parametrize("argv, world, message", [
    (["--n-kv-head", "2"], 1, r"--n-kv-head shape\(s\) a Llama, but --model is gpt2: add --model llama"),
    (["--model", "llama", "--n-kv-head", "3"], 1, r"--n-kv-head 3 must divide --n-head 4"),
    (["--model", "llama", "--n-kv-head", "1", "--tp", "2"], 2, r"--n-kv-head 1 is not divisible by tp=2"),
    (["--model", "llama", "--n-embd", "12", "--n-head", "4"], 1, r"= 3 must be even for rotary positions"),
])
def test_llama_flags_are_checked_before_any_rank_starts(monkeypatch, capsys, argv, world, message):
    from tinymeg.train.cli import parse_args
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_llama_flags_build_the_model(monkeypatch):
    from tinymeg.train.cli import parse_args
    from tinymeg.train.trainer import model_config
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = model_config(parse_args(["--model", "llama", "--n-kv-head", "2", "--rope-theta", "500000",
                                   "--tie-embeddings", "--ffn-hidden", "96"]), vocab_size=65)
    assert isinstance(cfg, LlamaConfig)
    assert (cfg.kv_heads, cfg.rope_theta, cfg.tie_embeddings, cfg.ffn_hidden_size) == (2, 500000.0, True, 96)
