"""Corpora, tokenizers and the deterministic batch sampler shared by every rank.

``load_corpus`` turns a text file (or the shipped tinyshakespeare) or a uint16 token file into
train/val token tensors. ``get_batch`` draws a rank's micro-batch as a pure function of
(seed, step, layout): no sampler state to checkpoint, and every rank can compute what any
other rank sees, which is what makes the DP/TP tests and resumption simple.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

__all__ = ["CharTokenizer", "GPT2Tokenizer", "TokenizerUnavailable", "Corpus", "load_corpus", "get_batch", "global_batch", "eval_batch",
           "SHIPPED_CORPUS", "LLMC_MAGIC", "GPT2_VOCAB_SIZE"]

SHIPPED_CORPUS = "tinyshakespeare.txt.gz"   # inside this package, see pyproject's package-data
LLMC_MAGIC = 20240520                       # llm.c's data file magic (header[0])
LLMC_VERSION = 1                            # version 1: GPT-2 uint16 tokens
LLMC_HEADER_BYTES = 256 * 4                 # 256 little-endian int32
GPT2_VOCAB_SIZE = 50257
TOKENIZERS = ("char", "gpt2")


class CharTokenizer:
    """Character-level tokenizer: token i is ``chars[i]``."""

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("CharTokenizer needs at least one character; use CharTokenizer.from_text(text)")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer chars must be unique; use CharTokenizer.from_text(text)")
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        # Sorted so that the same text always gives the same ids (a set's order is not stable).
        return cls("".join(sorted(set(text))))

    def encode(self, s: str) -> list[int]:
        try:
            return [self._stoi[c] for c in s]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this tokenizer's vocabulary of "
                             f"{self.vocab_size} characters; build the tokenizer from text that "
                             f"contains it (CharTokenizer.from_text)") from None

    def decode(self, ids) -> str:
        ids = _id_list(ids, self.vocab_size)
        return "".join(self.chars[i] for i in ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class TokenizerUnavailable(RuntimeError):
    """GPT-2 BPE's encoding files are neither cached nor downloadable (a machine without network)."""


class GPT2Tokenizer:
    """GPT-2's BPE (tiktoken's "gpt2" encoding): 50257 tokens.

    The encoding (files tiktoken downloads on first use) is loaded when text is first encoded or
    decoded, not when the tokenizer is made: training on a .bin of tokens never needs it, so it
    runs on a machine without network. Loading it there raises TokenizerUnavailable."""

    vocab_size = GPT2_VOCAB_SIZE

    def __init__(self):
        try:
            import tiktoken  # noqa: F401 - only checked here: the encoding is loaded on first use
        except ImportError as e:
            raise ImportError("the 'gpt2' tokenizer needs tiktoken, which is not installed: "
                              "pip install tiktoken (or pip install -e '.[bpe]'), "
                              "or use tokenizer='char'") from e
        self._encoding = None

    @property
    def _enc(self):
        if self._encoding is None:
            self._encoding = _gpt2_encoding()
        return self._encoding

    def encode(self, s: str) -> list[int]:
        # encode_ordinary: a literal "<|endoftext|>" in a corpus is text, not a special token
        # (tiktoken's encode() would raise on it).
        return self._enc.encode_ordinary(s)

    def decode(self, ids) -> str:
        return self._enc.decode(_id_list(ids, self.vocab_size))

    def save_pretrained(self, path: str, model_max_length: int = 1024) -> list[str]:
        """Write the files Hugging Face's GPT2TokenizerFast reads (vocab.json, merges.txt, ...)."""
        from .hf_tokenizer import save_gpt2_tokenizer
        return save_gpt2_tokenizer(path, self._enc._mergeable_ranks, self._enc._special_tokens, model_max_length)

    def __repr__(self) -> str:
        return "GPT2Tokenizer(vocab_size=50257)"


def _gpt2_encoding():
    """tiktoken's GPT-2 encoding, from its cache or downloaded."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 - tiktoken raises whatever its download raised
        raise TokenizerUnavailable(
            f"GPT-2 BPE needs its encoding files (vocab.bpe, encoder.json; 1.5 MB), which tiktoken "
            f"downloads on first use from openaipublic.blob.core.windows.net and caches in "
            f"$TIKTOKEN_CACHE_DIR ({os.environ.get('TIKTOKEN_CACHE_DIR') or 'unset: a temporary directory'}); "
            f"that failed ({type(e).__name__}: {e}). Offline: on a machine with network run "
            f"`TIKTOKEN_CACHE_DIR=bpe python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"`, copy "
            f"the directory bpe here and set TIKTOKEN_CACHE_DIR to it; or train on a .bin of GPT-2 "
            f"tokens made elsewhere (--data x.bin), or use --tokenizer char") from e


def _id_list(ids, vocab_size: int) -> list[int]:
    """ids (list, tensor, array) as a list of ints, all in [0, vocab_size)."""
    ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < vocab_size:
            # The model's embedding may be padded (vocab_multiple): those rows are not tokens.
            raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab_size}); ids >= "
                             f"vocab_size are padding rows of the embedding: cut the logits to "
                             f"vocab_size before sampling")
    return ids


def _tiktoken_available() -> bool:
    return importlib.util.find_spec("tiktoken") is not None


@dataclass
class Corpus:
    train: torch.Tensor            # 1-D int64 tokens, the first 1 - val_fraction
    val: torch.Tensor              # 1-D int64 tokens, the rest
    tokenizer: object | None       # CharTokenizer / GPT2Tokenizer / None (token file, no tiktoken)
    vocab_size: int


def load_corpus(path: str | os.PathLike | None = None, tokenizer: str = "char",
                val_fraction: float = 0.1) -> Corpus:
    """Load and tokenize a corpus, split into train (first part) and val (last part).

    - ``path=None``: the tinyshakespeare shipped in this package (1,115,394 characters,
      65 symbols with ``tokenizer="char"``).
    - ``*.txt`` / ``*.txt.gz``: UTF-8 text, tokenized with ``tokenizer`` ("char": the sorted
      characters of this text; "gpt2": GPT-2 BPE, needs tiktoken).
    - ``*.bin``: uint16 GPT-2 tokens, nanoGPT's raw format or llm.c's (1024-byte header with
      magic 20240520). ``tokenizer`` is ignored: the tokenizer is GPT2Tokenizer when tiktoken
      is installed and every token is < 50257, else None; vocab_size is 50257, or max token + 1
      if larger.

    The split is ``n = int(len(tokens) * (1 - val_fraction))``: train = tokens[:n], val = the rest.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if not 0 < val_fraction < 1:   # also rejects NaN
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}: it is the share of "
                         f"tokens held out for validation, e.g. 0.1")

    if path is None:
        raw = resources.files(__name__).joinpath(SHIPPED_CORPUS).read_bytes()
        tokens, tok = _tokenize(gzip.decompress(raw).decode("utf-8"), tokenizer, SHIPPED_CORPUS)
    else:
        path = os.fspath(path)
        _check_file(path)
        lower = path.lower()
        if lower.endswith(".bin"):
            tokens = _read_bin(path)
            tok = GPT2Tokenizer() if _tiktoken_available() and int(tokens.max()) < GPT2_VOCAB_SIZE else None
        elif lower.endswith((".txt", ".txt.gz")):
            opener = gzip.open if lower.endswith(".gz") else open
            try:
                with opener(path, "rt", encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from None
            tokens, tok = _tokenize(text, tokenizer, path)
        else:
            raise ValueError(f"cannot tell the format of {path}: expected a .txt or .txt.gz text file, "
                             f"or a .bin uint16 token file (nanoGPT or llm.c)")

    if tok is not None:
        vocab_size = tok.vocab_size
    else:  # token file without a known tokenizer: the embedding must cover every id present
        vocab_size = max(GPT2_VOCAB_SIZE, int(tokens.max()) + 1)
    n = int(len(tokens) * (1 - val_fraction))
    return Corpus(train=tokens[:n], val=tokens[n:], tokenizer=tok, vocab_size=vocab_size)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist: check the path, or leave --data out "
                                f"to train on the shipped Tiny Shakespeare")
    if not os.path.isfile(path):
        raise ValueError(f"data path {path!r} is not a file; pass a .txt, .txt.gz or .bin file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"data file {path!r} is empty; pass a file with text or tokens in it")


def _tokenize(text: str, name: str, source: str) -> tuple[torch.Tensor, object]:
    if not text:
        raise ValueError(f"data file {source!r} is empty (no text after decompression)")
    tok = CharTokenizer.from_text(text) if name == "char" else GPT2Tokenizer()
    return torch.tensor(tok.encode(text), dtype=torch.int64), tok


def _read_bin(path: str) -> torch.Tensor:
    """uint16 tokens of a nanoGPT (headerless) or llm.c (1024-byte header) .bin, as int64."""
    size = os.path.getsize(path)
    if size % 2:
        raise ValueError(f"{path} has {size} bytes, an odd number: a .bin corpus holds 2-byte uint16 "
                         f"tokens (nanoGPT's raw format, or llm.c's after a 1024-byte header), so this "
                         f"file is truncated or not a token file")
    # An llm.c file starts with int32 20240520, i.e. uint16 tokens 54600, 308: never the start of
    # a nanoGPT file of GPT-2 tokens (all < 50257), so the magic alone tells the formats apart.
    first = np.fromfile(path, dtype="<i4", count=1)
    offset = 0
    if len(first) and first[0] == LLMC_MAGIC:
        if size < LLMC_HEADER_BYTES:
            raise ValueError(f"{path} starts with llm.c's magic {LLMC_MAGIC} but is shorter ({size} "
                             f"bytes) than its {LLMC_HEADER_BYTES}-byte header: the file is truncated")
        header = np.fromfile(path, dtype="<i4", count=256)
        version, count = int(header[1]), int(header[2])
        if version != LLMC_VERSION:
            raise ValueError(f"{path} is an llm.c file of version {version}; only version "
                             f"{LLMC_VERSION} (GPT-2 uint16 tokens) is supported")
        held = (size - LLMC_HEADER_BYTES) // 2
        if count != held:
            raise ValueError(f"{path}: the llm.c header says {count} tokens but the file holds {held} "
                             f"after the {LLMC_HEADER_BYTES}-byte header; the file is truncated or its "
                             f"header is wrong: re-export it")
        offset = LLMC_HEADER_BYTES
    n = (size - offset) // 2
    if n == 0:
        raise ValueError(f"{path} has an llm.c header but no tokens; re-export it")
    # memmap reads the file lazily; the int64 copy is what embedding lookups index with.
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=(n,))
    return torch.from_numpy(tokens.astype(np.int64))


def _generator(seed: int, step: int) -> torch.Generator:
    """A generator that is a pure function of (seed, step).

    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so a linear mix
    such as ``seed * 1_000_003 + step`` collides, e.g. (seed, step) and (seed + 2**32, step),
    or (0, 1_000_003) and (1, 0). A hash spreads every bit of both over the seed instead.
    blake2b, not hash(): Python salts str hashes per process, and every rank must agree.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(step)}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits


def _offsets(n_tokens: int, *, seq_len: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Start offsets of the global batch at (seed, step): batch_size ints in [0, n_tokens - seq_len - 1]."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and the batch size must be >= 1, got seq_len={seq_len}, "
                         f"batch size={batch_size}")
    if n_tokens < seq_len + 2:
        raise ValueError(f"the corpus has {n_tokens} tokens but seq_len={seq_len} needs at least "
                         f"seq_len + 2 = {seq_len + 2}; reduce --seq-len or use a bigger corpus")
    # Sequence s is tokens[s : s + seq_len], its target tokens[s + 1 : s + 1 + seq_len].
    return torch.randint(0, n_tokens - seq_len, (batch_size,), generator=_generator(seed, step))


def _gather(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts.to(tokens.device)[:, None] + torch.arange(seq_len, device=tokens.device)
    # Two gathers rather than slicing one (B, T + 1) block: x and y come out contiguous, so a
    # model may .view() them.
    return tokens[idx].long(), tokens[idx + 1].long()


def _check_tokens(tokens: torch.Tensor) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor of token ids, got shape {tuple(tokens.shape)}")


def global_batch(tokens: torch.Tensor, *, seq_len: int, batch_size: int, seed: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole global batch at ``step``: ``(x, y)``, each int64 ``(batch_size, seq_len)``.

    ``batch_size`` is dp_size * grad_accum * micro_batch; see get_batch for which rows each
    rank and micro-step gets.
    """
    _check_tokens(tokens)
    starts = _offsets(len(tokens), seq_len=seq_len, batch_size=batch_size, seed=seed, step=step)
    return _gather(tokens, starts, seq_len)


def get_batch(tokens: torch.Tensor, *, seq_len: int, micro_batch: int, seed: int, step: int,
              micro_step: int = 0, grad_accum: int = 1, dp_rank: int = 0, dp_size: int = 1,
              microbatches: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's micro-batch: ``(x, y)``, each int64 ``(micro_batch, seq_len)``, where row i is
    ``tokens[s : s + seq_len]`` and ``tokens[s + 1 : s + 1 + seq_len]`` for a random start s.

    A pure function of its arguments (no hidden state). The global batch of the optimizer step,
    ``B = dp_size * grad_accum * micro_batch`` sequences, is drawn from a generator seeded by
    (seed, step) alone, and laid out as ``[grad_accum, dp_size, micro_batch]``; this call returns
    ``global_batch(tokens, seq_len=..., batch_size=B, seed=seed, step=step)[k]
    .view(grad_accum, dp_size, micro_batch, seq_len)[micro_step, dp_rank]`` (k = 0 for x, 1 for y),
    i.e. rows ``(micro_step * dp_size + dp_rank) * micro_batch`` onward.

    What is invariant:
    - TP ranks (same dp_rank) get identical tensors; DP ranks get disjoint rows of the global batch.
    - The sequences of one optimizer step (the union over micro_step and dp_rank) are the global
      batch, which depends only on (tokens, seq_len, B, seed, step): any split of the same B into
      dp_size * grad_accum * micro_batch trains on the same sequences, hence the same mean-loss
      gradient up to float summation order. Which rank/micro-step gets which row is the same only
      when (dp_size, grad_accum, micro_batch) is the same too.
    - A different seed or step gives a different batch; changing B changes every row.

    ``microbatches`` (pipeline parallelism cuts each micro-batch into that many): the rows are laid
    out as ``[grad_accum, microbatches, dp_size, micro_batch / microbatches]`` instead, so that
    each pipeline microbatch of every dp rank is one contiguous block of the global batch: one
    process running ``grad_accum x microbatches`` micro-steps of ``dp_size x micro_batch /
    microbatches`` rows makes the same forwards (which MoE layers' balancing statistics depend on).
    """
    _check_tokens(tokens)
    if micro_batch < 1 or grad_accum < 1 or dp_size < 1:
        raise ValueError(f"micro_batch, grad_accum and dp_size must be >= 1, got {micro_batch}, "
                         f"{grad_accum}, {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    if not 0 <= micro_step < grad_accum:
        raise ValueError(f"micro_step={micro_step} is not in [0, grad_accum={grad_accum})")
    if microbatches < 1 or micro_batch % microbatches:
        raise ValueError(f"microbatches={microbatches} must be >= 1 and divide micro_batch={micro_batch}")
    batch_size = dp_size * grad_accum * micro_batch
    starts = _offsets(len(tokens), seq_len=seq_len, batch_size=batch_size, seed=seed, step=step)
    # Offsets are cheap to draw for the whole batch; gather tokens for this rank's rows only.
    mine = starts.view(grad_accum, microbatches, dp_size, micro_batch // microbatches)[micro_step, :, dp_rank]
    mine = mine.reshape(-1)
    return _gather(tokens, mine, seq_len)


def eval_batch(tokens: torch.Tensor, *, seq_len: int, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed evaluation set: ``(x, y)``, each int64 ``(n_seqs, seq_len)``, the windows of
    ``tokens`` at ``n_seqs`` evenly spaced offsets from the first to the last possible one.

    It depends on nothing else (no seed, no step, no mesh), so every run that evaluates the
    same number of sequences of the same data sees the same ones, however its batch is split
    over ranks, micro-batches and accumulation steps.
    """
    _check_tokens(tokens)
    if n_seqs < 1:
        raise ValueError(f"n_seqs must be >= 1, got {n_seqs}")
    last = len(tokens) - seq_len - 1  # the window at `last` still has its target token
    if last < 0:
        raise ValueError(f"the evaluation split has {len(tokens)} tokens but seq_len={seq_len} needs at "
                         f"least seq_len + 1 = {seq_len + 1}; reduce --seq-len or use a bigger corpus")
    starts = torch.arange(n_seqs) * last // max(n_seqs - 1, 1)
    return _gather(tokens, starts, seq_len)
