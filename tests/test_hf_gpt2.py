"""GPT-2 weights in and out of the Hugging Face format: transformers -> tinymeg (unsharded and
tensor-parallel) -> transformers, with the same logits; bad directories are clear errors; the
export recipe and the trainer's --init-from. No network: every directory is written here from
a randomly initialised transformers model (tiny configs).

Tolerance: atol=rtol=1e-5 on logits (fp32; tinymeg's fused LayerNorm/GELU/attention kernels
and transformers' differ by float reassociation only). Tensors that only move (in, out, in
again) are compared exactly.
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import tinymeg as tm
from tinymeg import compat
from rank_pool import get_ctx, world

hf = pytest.importorskip("transformers", reason="transformers is in the [test] extra: pip install -e '.[test]'")
from safetensors.torch import load_file, save_file  # noqa: E402  (a dependency of transformers)

ROOT = Path(__file__).resolve().parents[1]
ATOL = RTOL = 1e-5


def hf_gpt2(vocab=65, positions=32, n_embd=32, n_layer=2, n_head=4, seed=0):
    """A tiny transformers GPT-2; an odd vocabulary exercises tinymeg's padded embedding."""
    torch.manual_seed(seed)
    cfg = hf.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return hf.GPT2LMHeadModel(cfg).eval()


def hf_logits(path_or_model, ids):
    model = path_or_model if isinstance(path_or_model, torch.nn.Module) else \
        hf.GPT2LMHeadModel.from_pretrained(path_or_model).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(vocab=65, seed=0):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers save_pretrained directory and its logits on a fixed batch."""
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model = hf_gpt2()
    model.save_pretrained(path)
    return str(path), hf_logits(model, _ids())


def test_round_trip_transformers_tinymeg_transformers(hf_dir, tmp_path):
    path, want = hf_dir
    model = tm.models.GPT2Model.from_pretrained(path).eval()
    assert model.config.vocab_size == 65 and model.config.padded_vocab_size == 128
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(model(_ids())[0], want, atol=ATOL, rtol=RTOL)
    model.save_pretrained(tmp_path / "back")
    torch.testing.assert_close(hf_logits(str(tmp_path / "back"), _ids()), want, atol=ATOL, rtol=RTOL)
    original, back = load_file(os.path.join(path, "model.safetensors")), load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original), "weights move, they do not change"


def _sharded_round_trip_body(path, out, want, sp):
    ctx = get_ctx(tp=2)
    model = tm.models.GPT2Model.from_pretrained(path)
    plan = {**tm.GPT2_TP_CONFIG, "sequence_parallel": sp}
    model = tm.apply_tensor_parallel(model, ctx, plan).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_ids())[0], want, atol=ATOL, rtol=RTOL)
    model.save_pretrained(out)          # every rank: gathers the shards; rank 0 writes
    assert os.path.isfile(os.path.join(out, "model.safetensors")), "the files exist when it returns"


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_round_trip_through_a_tensor_parallel_model(hf_dir, tmp_path, sp):
    path, want = hf_dir
    out = str(tmp_path / "from_tp2")
    world(2).run(_sharded_round_trip_body, path, out, want, sp)
    torch.testing.assert_close(hf_logits(out, _ids()), want, atol=ATOL, rtol=RTOL)


def _parallel_export_body(path, out_pp, out_bf16):
    """A pipelined model (pp=2 x tp=2) writes every stage's tensors (one file per stage, named by
    the index: only the first stage's were written), over an earlier single-file save of another
    model (readers take model.safetensors first: it must go); under mixed precision (dp=2 x tp=2,
    ZeRO-2, bf16) the fp32 masters are written, not the bf16 working copies."""
    other = tm.models.GPT2Model.from_pretrained(path)
    torch.nn.init.zeros_(other.transformer.wpe.weight)
    other.save_pretrained(out_pp)
    pipelined = tm.parallelize(tm.models.GPT2Model.from_pretrained(path), get_ctx(tp=2, pp=2),
                               pipeline=dict(schedule="gpipe", microbatches=2))
    pipelined.save_pretrained(out_pp)
    mixed = tm.parallelize(tm.models.GPT2Model.from_pretrained(path), get_ctx(dp=2, tp=2), zero=2, param_dtype="bf16")
    assert next(mixed.parameters()).dtype == torch.bfloat16
    mixed.save_pretrained(out_bf16)


def test_pipelined_and_mixed_precision_models_write_every_tensor_at_full_precision(hf_dir, tmp_path):
    from tinymeg.models.hf_io import read_tensors
    path, want = hf_dir
    out_pp, out_bf16 = str(tmp_path / "pp"), str(tmp_path / "bf16")
    world(4).run(_parallel_export_body, path, out_pp, out_bf16)
    original = load_file(os.path.join(path, "model.safetensors"))
    for out in (out_pp, out_bf16):
        back = read_tensors(out)
        assert back.keys() == original.keys(), out
        assert all(torch.equal(original[k], back[k]) for k in original), f"{out}: weights move, they do not change"
    assert sorted(os.listdir(out_pp)) == ["config.json", "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    torch.testing.assert_close(hf_logits(out_pp, _ids()), want, atol=ATOL, rtol=RTOL)


def test_a_mixture_of_experts_model_is_not_written_as_a_dense_gpt2(tmp_path):
    model = tm.models.GPT2Model(tm.models.GPTConfig.tiny(n_experts=4))
    with pytest.raises(ValueError, match=r"mixture-of-experts layers \(n_experts=4\).*--format torch"):
        model.save_pretrained(tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def test_hub_layout_and_sharded_files_are_read(hf_dir, tmp_path):
    """OpenAI's GPT-2 on the Hub: names without "transformer.", causal-mask buffers, and large
    models split over several files named by model.safetensors.index.json."""
    path, want = hf_dir
    tensors = load_file(os.path.join(path, "model.safetensors"))
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(Path(path, "config.json").read_text())
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    names = sorted(old)
    save_file({k: old[k] for k in names[:10]}, hub / "part1.safetensors", metadata={"format": "pt"})
    save_file({k: old[k] for k in names[10:]}, hub / "part2.safetensors", metadata={"format": "pt"})
    index = {"weight_map": {k: "part1.safetensors" if i < 10 else "part2.safetensors" for i, k in enumerate(names)}}
    (hub / "model.safetensors.index.json").write_text(json.dumps(index))
    with torch.no_grad():
        torch.testing.assert_close(tm.models.GPT2Model.from_pretrained(str(hub)).eval()(_ids())[0], want,
                                   atol=ATOL, rtol=RTOL)


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
    "missing": (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), None,
                ValueError, r"transformer.h.1.mlp.c_fc.bias is missing"),
    "extra": (lambda t: _set(t, "transformer.h.0.attn.q_attn.weight", torch.zeros(32, 32)), None,
              ValueError, r"transformer.h.0.attn.q_attn.weight is not a GPT-2 tensor"),
    "wrong shape": (lambda t: _set(t, "transformer.h.0.attn.c_attn.weight", torch.zeros(96, 32)), None,
                    ValueError, r"transformer.h.0.attn.c_attn.weight has shape \(96, 32\), config.json says \(32, 96\)"),
    "not gpt2": (None, lambda c: _set(c, "model_type", "llama"),
                 ValueError, r"is a 'llama' config, not GPT-2's \(model_type 'gpt2'\).*tm.plans"),
    "variant": (None, lambda c: _set(c, "n_inner", 100),
                ValueError, r"n_inner=100 is a GPT-2 variant tinymeg's GPT2Model does not compute"),
    "dropouts": (None, lambda c: _set(c, "attn_pdrop", 0.3),
                 ValueError, r"different resid/embd/attn dropout rates \[0.0, 0.3\].*pass dropout="),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_pretrained_directories_are_clear_errors(hf_dir, tmp_path, case):
    edit_tensors, edit_config, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        tm.models.GPT2Model.from_pretrained(_bad_dir(tmp_path, hf_dir[0], edit_tensors, edit_config))


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        tm.models.GPT2Model.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors \(nor model.safetensors.index.json\)"):
        tm.models.GPT2Model.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"has biases everywhere"):
        tm.models.GPT2Model(tm.models.GPTConfig.tiny(bias=False)).save_pretrained(str(tmp_path / "x"))


# ---- recipes: export a training checkpoint, fine-tune from a directory

def _recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = dict(n_layer=1, n_head=2, n_embd=32, seq_len=16, micro_batch=2, eval_every=0, eval_iters=1,
            sample_tokens=0, progress=False, lr=3e-3, warmup=1)


def _train_body(tp, dp, steps, **kw):
    from tinymeg.train import TrainConfig, train
    out = train(TrainConfig(tp=tp, dp=dp, steps=steps, **{**TINY, **kw}), ctx=get_ctx(dp=dp, tp=tp))
    return out["losses"], {n: compat.full_tensor(p).detach()
                           for n, p in out["model"].named_parameters()}


def test_export_hf_then_fine_tune_from_it_on_another_mesh(tmp_path):
    """Train 2 steps (tp=2) and checkpoint; export.py --format hf; transformers loads it with
    the model's logits; train.py --init-from starts a tp=2 x dp=2 run from exactly those weights."""
    ck = str(tmp_path / "ck")
    _, trained = world(2).run(_train_body, 2, 1, 2, ckpt_dir=ck)[0]
    out = _recipe("export").main([ck, "--format", "hf", "-o", str(tmp_path / "hf")])
    model = tm.models.GPT2Model.from_pretrained(out).eval()
    for name, p in model.named_parameters():
        rows = 65 if name == "transformer.wte.weight" else None  # padded rows are not exported (zeros)
        assert torch.equal(p[:rows], trained[name][:rows]), name
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, ids), model(ids)[0], atol=ATOL, rtol=RTOL)
    # fine-tune: step 0's loss is the exported model's loss on step 0's batch
    losses, _ = world(4).run(_train_body, 2, 2, 1, init_from=out)[0]
    from tinymeg.data import get_batch, load_corpus
    x, y = get_batch(load_corpus(None, "char").train, seq_len=16, micro_batch=4, seed=1337, step=0, dp_rank=0, dp_size=1)
    with torch.no_grad():
        assert losses[0] == pytest.approx(model(x, y)[1].item(), rel=1e-5)


def _init_from_errors_body(path):
    with pytest.raises(ValueError, match=r"vocabulary of 80 tokens, the data's tokenizer 65"):
        _train_body(1, 1, 1, init_from=path)
    return "ok"


def test_init_from_a_model_with_another_vocabulary_is_an_error(tmp_path):
    hf_gpt2(vocab=80).save_pretrained(tmp_path / "v80")
    assert world(1).run(_init_from_errors_body, str(tmp_path / "v80")) == ["ok"]
