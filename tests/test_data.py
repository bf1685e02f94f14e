"""tinymeg.data: corpora, tokenizers, and the deterministic DP-sharded batch sampler."""
import gzip
import importlib.util
import itertools
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymeg.data import (GPT2_VOCAB_SIZE, LLMC_MAGIC, CharTokenizer, Corpus, GPT2Tokenizer, TokenizerUnavailable,
                          get_batch, global_batch, load_corpus)

SHAKESPEARE_CHARS = 1_115_394
HAS_TIKTOKEN = importlib.util.find_spec("tiktoken") is not None
fast = settings(max_examples=25, deadline=None)


@pytest.fixture(scope="module")
def shakespeare() -> Corpus:
    return load_corpus()


def batch_kwargs(**kw):
    return dict(seq_len=16, micro_batch=4, seed=0, step=0) | kw


# ---------------------------------------------------------------- corpus and tokenizers

def test_shipped_corpus_loads(shakespeare):
    c = shakespeare
    assert isinstance(c.tokenizer, CharTokenizer)
    assert c.vocab_size == c.tokenizer.vocab_size == 65
    assert c.train.dtype == c.val.dtype == torch.int64 and c.train.dim() == c.val.dim() == 1
    assert len(c.train) + len(c.val) == SHAKESPEARE_CHARS
    assert len(c.train) == int(SHAKESPEARE_CHARS * 0.9)   # 90/10, train first
    assert c.tokenizer.decode(c.train[:14]) == "First Citizen:"
    assert int(torch.cat([c.train, c.val]).max()) < c.vocab_size


def test_shipped_corpus_roundtrip(shakespeare):
    tok = shakespeare.tokenizer
    text = tok.decode(torch.cat([shakespeare.train, shakespeare.val]))
    assert len(text) == SHAKESPEARE_CHARS
    assert tok.encode(text[:5000]) == shakespeare.train[:5000].tolist()
    assert tok.decode(tok.encode(text)) == text


@fast
@given(st.data())
def test_char_roundtrip(shakespeare, data):
    tok = shakespeare.tokenizer
    s = data.draw(st.text(alphabet=tok.chars, max_size=200))
    assert tok.decode(tok.encode(s)) == s


def test_char_tokenizer_ids_are_sorted_chars():
    tok = CharTokenizer.from_text("banana!")
    assert tok.chars == "!abn" and tok.vocab_size == 4
    assert tok.encode("nab") == [3, 1, 2]


def test_char_tokenizer_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'é' is not in this tokenizer's vocabulary"):
        tok.encode("abé")
    with pytest.raises(ValueError, match="token id 3 is outside the vocabulary.*padding"):
        tok.decode([0, 3])          # a padded-embedding row sampled by mistake
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="unique"):
        CharTokenizer("aa")


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_text_file(tmp_path, suffix):
    text = "to be, or not to be\n" * 50
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    c = load_corpus(str(path), val_fraction=0.2)
    assert c.vocab_size == len(set(text))
    assert c.tokenizer.decode(torch.cat([c.train, c.val])) == text
    assert len(c.train) == int(len(text) * 0.8)


# ---------------------------------------------------------------- .bin token files

def _tokens(n=1000, high=GPT2_VOCAB_SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, high, n).astype(np.uint16)


def _write_llmc(path, tokens, count=None, version=1):
    header = np.zeros(256, dtype="<i4")
    header[:3] = [LLMC_MAGIC, version, len(tokens) if count is None else count]
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def _check_bin(c, tokens):
    assert torch.equal(torch.cat([c.train, c.val]), torch.from_numpy(tokens.astype(np.int64)))
    assert len(c.train) == int(len(tokens) * 0.9) and c.train.dtype == torch.int64
    assert c.vocab_size == GPT2_VOCAB_SIZE
    assert isinstance(c.tokenizer, GPT2Tokenizer) if HAS_TIKTOKEN else c.tokenizer is None


def test_nanogpt_bin(tmp_path):
    tokens = _tokens()
    tokens.astype("<u2").tofile(tmp_path / "train.bin")
    _check_bin(load_corpus(str(tmp_path / "train.bin")), tokens)


def test_llmc_bin(tmp_path):
    tokens = _tokens()
    _write_llmc(tmp_path / "train.bin", tokens)
    _check_bin(load_corpus(tmp_path / "train.bin"), tokens)   # PathLike works too


def test_bin_vocab_grows_past_gpt2(tmp_path):
    tokens = _tokens(100)
    tokens[7] = 60_000   # not GPT-2 ids: the embedding must still cover them, no GPT-2 decoding
    tokens.tofile(tmp_path / "big.bin")
    c = load_corpus(str(tmp_path / "big.bin"))
    assert c.vocab_size == 60_001 and c.tokenizer is None


# ---------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*does not exist.*omit --data.*shipped"):
        load_corpus(path)


@pytest.mark.parametrize("name", ["empty.txt", "empty.bin"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(tmp_path / name))


def test_empty_gz_text(tmp_path):
    (tmp_path / "e.txt.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(tmp_path / "e.txt.gz"))


def test_odd_length_bin(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="3 bytes, an odd number.*uint16"):
        load_corpus(str(tmp_path / "odd.bin"))


def test_llmc_bad_count(tmp_path):
    _write_llmc(tmp_path / "bad.bin", _tokens(100), count=120)
    with pytest.raises(ValueError, match="header says 120 tokens but the file holds 100"):
        load_corpus(str(tmp_path / "bad.bin"))


def test_llmc_bad_version_and_truncated_header(tmp_path):
    _write_llmc(tmp_path / "v2.bin", _tokens(100), version=2)
    with pytest.raises(ValueError, match="version 2; only version 1"):
        load_corpus(str(tmp_path / "v2.bin"))
    (tmp_path / "short.bin").write_bytes(np.array([LLMC_MAGIC, 1], dtype="<i4").tobytes())
    with pytest.raises(ValueError, match="shorter .* than its 1024-byte header"):
        load_corpus(str(tmp_path / "short.bin"))


def test_unknown_extension(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"cannot tell the format.*\.txt.*\.bin"):
        load_corpus(str(tmp_path / "data.csv"))


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'; choose one of char, gpt2"):
        load_corpus(tokenizer="bpe")


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, math.nan])
def test_bad_val_fraction(fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        load_corpus(val_fraction=fraction)


def test_too_short_corpus():
    tokens = torch.arange(17)   # seq_len 16 needs 18
    with pytest.raises(ValueError, match="has 17 tokens but seq_len=16 needs at least seq_len \\+ 2 = 18.*reduce --seq-len"):
        get_batch(tokens, **batch_kwargs())
    with pytest.raises(ValueError, match="has 17 tokens"):
        global_batch(tokens, seq_len=16, batch_size=4, seed=0, step=0)
    get_batch(torch.arange(18), **batch_kwargs())   # the minimum is enough


def test_bad_layout():
    tokens = torch.arange(100)
    with pytest.raises(ValueError, match=r"dp_rank=2 is not in \[0, dp_size=2\)"):
        get_batch(tokens, **batch_kwargs(dp_rank=2, dp_size=2))
    with pytest.raises(ValueError, match=r"micro_step=1 is not in \[0, grad_accum=1\)"):
        get_batch(tokens, **batch_kwargs(micro_step=1))
    with pytest.raises(ValueError, match="must be >= 1"):
        get_batch(tokens, **batch_kwargs(micro_batch=0))


def test_gpt2_without_tiktoken(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)   # import tiktoken raises ImportError
    with pytest.raises(ImportError, match="pip install tiktoken"):
        GPT2Tokenizer()
    with pytest.raises(ImportError, match="pip install tiktoken"):
        load_corpus(tokenizer="gpt2")


def test_gpt2_tokenizer(tmp_path):
    pytest.importorskip("tiktoken", reason="the gpt2 tokenizer needs tiktoken (pip install tiktoken)")
    tok = GPT2Tokenizer()
    try:
        tok.encode("")
    except TokenizerUnavailable:
        pytest.skip("GPT-2 BPE's encoding files are not cached and cannot be downloaded here (no network)")
    assert tok.vocab_size == 50257
    s = "To be, or not to be: that is the question.<|endoftext|>"
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode("Hello") == [15496]
    with pytest.raises(ValueError, match="token id 50257"):
        tok.decode([50257])
    (tmp_path / "t.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    c = load_corpus(str(tmp_path / "t.txt"), tokenizer="gpt2")
    assert c.vocab_size == 50257 and isinstance(c.tokenizer, GPT2Tokenizer)
    assert c.tokenizer.decode(torch.cat([c.train, c.val])).startswith("First Citizen:\nBefore")


# ---------------------------------------------------------------- get_batch

seeds = st.integers(0, 2**40)
steps = st.integers(0, 10**6)


@fast
@given(seed=seeds, step=steps, micro_batch=st.integers(2, 8), seq_len=st.integers(16, 64))
def test_get_batch_deterministic(shakespeare, seed, step, micro_batch, seq_len):
    kw = dict(seq_len=seq_len, micro_batch=micro_batch)
    x, y = get_batch(shakespeare.train, seed=seed, step=step, **kw)
    assert x.shape == y.shape == (micro_batch, seq_len) and x.dtype == y.dtype == torch.int64
    x2, y2 = get_batch(shakespeare.train, seed=seed, step=step, **kw)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, get_batch(shakespeare.train, seed=seed, step=step + 1, **kw)[0])
    assert not torch.equal(x, get_batch(shakespeare.train, seed=seed + 1, step=step, **kw)[0])


@pytest.mark.parametrize("a, b", [((0, 1_000_003), (1, 0)),      # a linear seed * K + step mix
                                  ((5, 3), (5 + 2**32, 3)),      # torch keeps 32 bits of a seed
                                  ((3, 5), (5, 3))])
def test_seed_step_pairs_do_not_collide(a, b):
    tokens = torch.arange(10_000)
    x_a = global_batch(tokens, seq_len=8, batch_size=8, seed=a[0], step=a[1])[0]
    x_b = global_batch(tokens, seq_len=8, batch_size=8, seed=b[0], step=b[1])[0]
    assert not torch.equal(x_a, x_b)


@fast
@given(n_extra=st.integers(0, 40), seq_len=st.integers(1, 32), seed=seeds, step=steps)
def test_y_is_x_shifted(n_extra, seq_len, seed, step):
    # With tokens = arange(n), a row starting at s is s, s+1, ...: offsets are visible directly.
    n = seq_len + 2 + n_extra
    tokens = torch.arange(n)
    x, y = get_batch(tokens, seq_len=seq_len, micro_batch=8, seed=seed, step=step)
    starts = x[:, :1]
    assert torch.equal(x, starts + torch.arange(seq_len))        # contiguous windows
    assert torch.equal(y, x + 1)                                  # y[i] = tokens[s+1 : s+1+T]
    assert int(starts.min()) >= 0 and int(y.max()) <= n - 1      # in bounds
    assert x.is_contiguous() and y.is_contiguous()


def test_offsets_cover_both_ends():
    # n = seq_len + 2 allows starts 0 and 1 only: both must be drawn (no off-by-one).
    x, y = global_batch(torch.arange(10), seq_len=8, batch_size=64, seed=0, step=0)
    assert set(x[:, 0].tolist()) == {0, 1}
    assert int(y.max()) == 9


@fast
@given(dp_size=st.sampled_from([2, 4]), grad_accum=st.integers(1, 3), micro_batch=st.integers(1, 4),
       seed=seeds, step=steps, data=st.data())
def test_dp_shards(shakespeare, dp_size, grad_accum, micro_batch, seed, step, data):
    micro_step = data.draw(st.integers(0, grad_accum - 1), label="micro_step")
    seq_len = 32
    kw = dict(seq_len=seq_len, micro_batch=micro_batch, seed=seed, step=step, micro_step=micro_step,
              grad_accum=grad_accum, dp_size=dp_size)
    shards = [get_batch(shakespeare.train, dp_rank=r, **kw) for r in range(dp_size)]
    xs = [x for x, _ in shards]
    for a, b in itertools.combinations(xs, 2):
        assert not torch.equal(a, b)               # dp ranks see different data
    gx, gy = global_batch(shakespeare.train, seq_len=seq_len, batch_size=dp_size * grad_accum * micro_batch,
                          seed=seed, step=step)
    layout = (grad_accum, dp_size, micro_batch, seq_len)
    assert torch.equal(torch.cat(xs), gx.view(layout)[micro_step].reshape(-1, seq_len))
    assert torch.equal(torch.cat([y for _, y in shards]), gy.view(layout)[micro_step].reshape(-1, seq_len))


@fast
@given(seed=seeds, step=steps)
def test_global_batch_same_for_every_split(shakespeare, seed, step):
    # B = 8 sequences per step, split 4 ways: all micro-steps of all ranks = the same global batch.
    gx, _ = global_batch(shakespeare.train, seq_len=16, batch_size=8, seed=seed, step=step)
    for dp_size, grad_accum, micro_batch in [(1, 1, 8), (2, 2, 2), (4, 1, 2), (2, 4, 1)]:
        rows = [get_batch(shakespeare.train, seq_len=16, micro_batch=micro_batch, seed=seed, step=step,
                          micro_step=m, grad_accum=grad_accum, dp_rank=r, dp_size=dp_size)[0]
                for m in range(grad_accum) for r in range(dp_size)]
        assert torch.equal(torch.cat(rows), gx), (dp_size, grad_accum, micro_batch)


# ---------------------------------------------------------------- what the trainer feeds each rank

def _fed_batches_body(grad_accum, micro_batch):
    """One trainer step on this rank; return every (x, y) its model was called with."""
    from rank_pool import get_ctx
    from tinymeg.train import TrainConfig, train
    from tinymeg.train import trainer
    ctx = get_ctx(dp=2, tp=2)
    fed, real = [], trainer.get_batch

    def recording(*args, **kwargs):
        x, y = real(*args, **kwargs)
        fed.append((x.clone(), y.clone()))
        return x, y
    trainer.get_batch = recording
    try:
        train(TrainConfig(tp=2, dp=2, steps=1, micro_batch=micro_batch, grad_accum=grad_accum, seq_len=16,
                          n_layer=1, n_head=2, n_embd=16, eval_every=0, eval_iters=1, sample_tokens=0,
                          progress=False, seed=11), ctx=ctx)
    finally:
        trainer.get_batch = real
    return ctx.dp_rank, ctx.tp_rank, fed


def test_every_rank_trains_on_its_rows_of_the_global_batch(shakespeare):
    """In a real tp=2 x dp=2 world, over one step with 2 micro-steps: the two TP ranks of a dp
    rank are fed identical batches, and the micro-steps of the dp ranks, in the documented
    [grad_accum, dp, micro_batch] layout, are exactly the rows of the step's global batch."""
    from rank_pool import world
    results = world(4).run(_fed_batches_body, 2, 3)
    by_rank = {(dp, tp): fed for dp, tp, fed in results}
    for dp in range(2):
        for (x0, y0), (x1, y1) in zip(by_rank[(dp, 0)], by_rank[(dp, 1)], strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    gx, gy = global_batch(shakespeare.train, seq_len=16, batch_size=2 * 2 * 3, seed=11, step=0)
    order = [by_rank[(dp, 0)][micro] for micro in range(2) for dp in range(2)]
    assert torch.equal(torch.cat([x for x, _ in order]), gx)
    assert torch.equal(torch.cat([y for _, y in order]), gy)
