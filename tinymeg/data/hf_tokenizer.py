"""GPT-2's tokenizer as the files Hugging Face's ``GPT2TokenizerFast.from_pretrained`` reads
(``vocab.json``, ``merges.txt``, ``tokenizer_config.json``), made from tiktoken's ranks, with
no network: ``recipes/export.py --format hf`` writes them next to the weights.

tiktoken keeps a byte-level BPE as ``{token bytes: rank}``; GPT-2's original files spell each
token's bytes with printable characters (``bytes_to_unicode``) and list the merges in rank
order. A token of rank r >= 256 is the merge of the two pieces that BPE, using only the
ranks below r, leaves of its bytes; so the merges can be read back from the ranks alone.
"""
from __future__ import annotations

import json
import os


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: printable Latin-1 bytes stand for themselves,
    the others (controls, space...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _pieces(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """BPE of ``token``'s bytes using only the merges of rank < ``below``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks.get(parts[i] + parts[i + 1], below), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs)
        if rank >= below:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def save_gpt2_tokenizer(path: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                        model_max_length: int = 1024) -> list[str]:
    """Write the tokenizer files of a byte-level BPE (``mergeable_ranks`` as tiktoken holds
    them; ``special_tokens``: ``{"<|endoftext|>": 50256}``) into ``path``; return their names."""
    spell = bytes_to_unicode()
    text = {token: "".join(spell[b] for b in token) for token in mergeable_ranks}
    vocab = {text[token]: rank for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1])}
    vocab.update(special_tokens)
    merges = []
    for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            pieces = _pieces(token, mergeable_ranks, rank)
            if len(pieces) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens: "
                                 f"not a byte-level BPE that Hugging Face's GPT-2 tokenizer can express")
            merges.append(f"{text[pieces[0]]} {text[pieces[1]]}")
    eot = next(iter(special_tokens), None)
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
              "add_prefix_space": False, **({"bos_token": eot, "eos_token": eot, "unk_token": eot} if eot else {})}
    os.makedirs(path, exist_ok=True)
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
             "tokenizer_config.json": json.dumps(config, indent=2)}
    for name, content in files.items():
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(content)
    return list(files)
