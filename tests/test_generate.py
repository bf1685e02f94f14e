"""GPT2Model.generate: the KV cache gives the no-cache result, unsharded, under TP and under
TP + sequence parallelism (where inputs are right-padded to a multiple of tp, never cropped)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from tinymeg.models import GPT2Model, GPTConfig
from tinymeg.models.gpt2 import CausalSelfAttention, KVCache


def _model(seed=0, **kw) -> GPT2Model:
    torch.manual_seed(seed)
    return GPT2Model(GPTConfig.tiny(**kw)).eval()


def _generate(model, prompt, n, seed, **kw):
    return model.generate(prompt, n, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(seed), **kw)


def _next_token_logits(model, prompt, multiple=1):
    """The logits generate samples its first token from (its own forward, padded as it pads)."""
    return model._last_logits(prompt[:, -model.config.block_size:], 0, [], multiple)


@given(prompt_len=st.integers(1, 20), new=st.integers(1, 30), multiple=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**16))
def test_kv_cache_gives_the_no_cache_tokens(prompt_len, new, multiple, seed):
    """Block size 16: prompts up to 20 and up to 30 new tokens cross the point where the
    window slides (every position changes and the cache is rebuilt)."""
    model = _model(seed, block_size=16)
    prompt = torch.randint(0, 65, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    cached = _generate(model, prompt, new, seed, context_multiple=multiple)
    plain = _generate(model, prompt, new, seed, context_multiple=multiple, kv_cache=False)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :prompt_len], prompt) and cached.shape == (2, prompt_len + new)


def test_kv_cache_logits_equal_the_full_forward():
    """Prefill 7 tokens, then feed 5 one at a time through the cache: each step's logits are the
    full forward's at that position (float reassociation only)."""
    model = _model(block_size=16)
    x = torch.randint(0, 65, (3, 12), generator=torch.Generator().manual_seed(1))
    full = model(x)[0]
    attention = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    caches = [KVCache(18) for _ in attention]
    for m, c in zip(attention, caches):
        m.kv_cache = c
    try:
        steps = [model._last_logits(x[:, :7], 0, caches, 2)]
        steps += [model._last_logits(x[:, t:t + 1], t, caches, 2) for t in range(7, 12)]
    finally:
        for m in attention:
            m.kv_cache = None
    for i, logits in enumerate(steps):
        torch.testing.assert_close(logits, full[:, 6 + i], rtol=1e-5, atol=1e-5)


def test_padding_is_exact_and_cropping_was_not():
    """Right-padding a 5-token prompt to 8 gives the unpadded logits; the old way, cropping it
    to the last 4 tokens, conditions on less and gives other logits."""
    model = _model(block_size=16)
    prompt = torch.randint(0, 65, (1, 5), generator=torch.Generator().manual_seed(2))
    exact = model(prompt)[0][:, -1]
    torch.testing.assert_close(_next_token_logits(model, prompt, multiple=4), exact, rtol=1e-5, atol=1e-5)
    assert (model(prompt[:, -4:])[0][:, -1] - exact).abs().max() > 1e-3


@pytest.mark.parametrize("bad,message", [
    (dict(temperature=0), r"temperature must be a finite number > 0 .* for greedy decoding pass top_k=1"),
    (dict(temperature=float("nan")), r"temperature must be a finite number > 0"),
    (dict(top_k=0), r"top_k must be None \(the whole vocabulary\) or an integer >= 1, got 0"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
])
def test_sampling_settings_that_cannot_be_drawn_are_errors(bad, message):
    """temperature=0 divided the logits into inf/nan for multinomial; top_k=0 raised an IndexError."""
    with pytest.raises(ValueError, match=message):
        _model().generate(torch.zeros(1, 1, dtype=torch.long), **{"max_new_tokens": 2, **bad})


def test_generate_leaves_no_cache_behind_when_it_raises():
    model = _model()

    class Boom(RuntimeError):
        pass

    def boom(*_):
        raise Boom
    handle = model.lm_head.register_forward_hook(boom)
    with pytest.raises(Boom):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 3)
    handle.remove()
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, CausalSelfAttention))
    model(torch.zeros(1, 4, dtype=torch.long))  # and a plain forward works


# ---- under tensor parallelism (each rank caches its own heads) ----

def _tp_generate_body(sequence_parallel, prompt_len, seed):
    ctx = get_ctx(tp=2)
    model = _model(seed, block_size=16)
    prompt = torch.randint(0, 65, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    reference = _generate(model, prompt, 24, seed, kv_cache=False)   # unsharded, no cache
    ref_logits = _next_token_logits(model, prompt)
    plan = {**tm.GPT2_TP_CONFIG, "sequence_parallel": sequence_parallel}
    sharded = tm.apply_tensor_parallel(_model(seed, block_size=16), ctx, plan).eval()
    multiple = 2 if sequence_parallel else 1
    logits = _next_token_logits(sharded, prompt, multiple)
    out = {"cached": _generate(sharded, prompt, 24, seed, context_multiple=multiple),
           "plain": _generate(sharded, prompt, 24, seed, context_multiple=multiple, kv_cache=False)}
    # each rank's cache holds its own heads: peek at one through a forward hook
    attn = sharded.transformer.h[0].attn
    seen = []
    hook = attn.register_forward_hook(lambda m, a, o: seen.append(m.kv_cache.k.shape[1]))
    _generate(sharded, prompt, 1, seed, context_multiple=multiple)
    hook.remove()
    leftover = {m.kv_cache for m in sharded.modules() if isinstance(m, CausalSelfAttention)}
    return {"reference": reference, "out": out, "logit_error": (logits - ref_logits).abs().max().item(),
            "cached_heads": seen[0], "leftover": leftover}


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("prompt_len", [1, 5])
def test_tp_generation_with_kv_cache_equals_the_unsharded_model(sequence_parallel, prompt_len):
    """A 5-token prompt is not a multiple of tp=2: under SP it is padded, and the next-token
    logits and every sampled token equal the unsharded model's (which crops did not)."""
    for rank, r in enumerate(world(2).run(_tp_generate_body, sequence_parallel, prompt_len, 3)):
        assert r["logit_error"] < 1e-5, (rank, r["logit_error"])
        assert torch.equal(r["out"]["plain"], r["reference"]), rank
        assert torch.equal(r["out"]["cached"], r["reference"]), rank
        assert r["cached_heads"] == GPTConfig.tiny().n_head // 2   # this rank's heads only
        assert r["leftover"] == {None}


@pytest.mark.parametrize("multiple,want", [(1, [14, 1, 1, 16, 16, 16]), (2, [14, 2, 2, 16, 16, 16])])
def test_kv_cache_feeds_one_token_per_step_until_the_window_slides(multiple, want):
    """Block 16, a 14-token prompt, 6 new tokens: the prompt once, then one token per step (padded
    to the multiple), until the text is longer than the block: then the whole window each step."""
    model = _model(block_size=16)
    fed = []
    hook = model.transformer.wte.register_forward_pre_hook(lambda m, args: fed.append(args[0].size(1)))
    model.generate(torch.zeros(1, 14, dtype=torch.long), 6, context_multiple=multiple)
    hook.remove()
    assert fed == want
