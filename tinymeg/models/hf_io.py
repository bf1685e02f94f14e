"""The files of a Hugging Face model directory, for every model tinymeg reads and writes
(hf_gpt2.py, hf_llama.py): ``config.json`` and the weights, in ``model.safetensors`` or split
over several files named by ``model.safetensors.index.json``, as transformers' save_pretrained
writes them. No transformers at run time: safetensors only.

Writing works on a sharded model too: every rank gathers the whole tensors (a collective over
each DTensor's mesh) and global rank 0 writes; the call returns when the files exist. A model
split into parts (pipeline stages: ``model.pretrained_part``) writes each part's tensors from
one rank of that part, in files of their own named by the index.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from .. import compat

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"


def read_config(path: str) -> tuple[dict, str]:
    """(config.json's contents, its path)."""
    config_path = os.path.join(path, CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} has no {CONFIG}: give the directory transformers' save_pretrained "
                                f"(or tinymeg's save_pretrained) wrote")
    with open(config_path) as f:
        return json.load(f), config_path


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors file(s)."""
    from safetensors.torch import load_file
    single, index = os.path.join(path, WEIGHTS), os.path.join(path, INDEX)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for name in files for k, v in load_file(os.path.join(path, name)).items()}
    raise FileNotFoundError(f"{path} has no {WEIGHTS} (nor {INDEX}): from_pretrained reads safetensors "
                            f"files, as transformers' save_pretrained writes them by default")


def check_shapes(path: str, tensors: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], what: str) -> None:
    """Every tensor ``want`` names is there with its shape and nothing else is: else one error
    naming each missing, extra and mis-shaped tensor."""
    problems = [f"{k} is missing" for k in want if k not in tensors]
    problems += [f"{k} is not a {what} tensor" for k in tensors if k not in want]
    problems += [f"{k} has shape {tuple(t.shape)}, config.json says {want[k]}"
                 for k, t in tensors.items() if k in want and tuple(t.shape) != want[k]]
    if problems:
        raise ValueError(f"{path} is not a {what} checkpoint of its config.json's shape: " + "; ".join(problems))


def padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (V, C) with zero rows appended up to ``rows``: a vocabulary padded as tinymeg pads it."""
    out = t.new_zeros(rows, *t.shape[1:])
    out[:t.shape[0]] = t
    return out


def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``export_state_dict()`` (its state_dict at full precision: the fp32 masters
    under mixed precision) with every tensor whole, float32, on the CPU. Sharded (DTensor) tensors
    are gathered over their mesh: a collective, so every rank must call this."""
    return {k: compat.full_tensor(t).detach().float().cpu() for k, t in model.export_state_dict().items()}


@dataclass
class PretrainedPart:
    """This rank's tensors are part ``index`` of ``count`` of the model (a pipeline stage's),
    the parts' ranks meet in ``group``, and this rank ``writes`` its part's files (one rank per part)."""
    group: dist.ProcessGroup
    index: int
    count: int
    writes: bool


def write_pretrained(path: str, config: dict, tensors: dict[str, torch.Tensor],
                     max_shard_mb: float | None = None, part: PretrainedPart | None = None) -> None:
    """Write ``path/config.json`` and the tensors: one ``model.safetensors``, or (when they
    exceed ``max_shard_mb``, or come from several parts) ``model-0000i-of-0000n.safetensors``
    files and their index. Under torch.distributed every rank calls it and global rank 0 writes
    (with ``part``, one rank per part writes that part's files; a tensor two parts hold, a tied
    weight, is written by the first); it returns when the files exist. Whatever an earlier save
    left in the other layout is removed: readers take model.safetensors before an index."""
    from safetensors.torch import save_file
    distributed = dist.is_available() and dist.is_initialized()
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    parts, mine, writes = [sizes], 0, not distributed or dist.get_rank() == 0
    if part is not None:
        parts, mine, writes = [None] * part.count, part.index, part.writes
        dist.all_gather_object(parts, sizes, group=part.group)
    kept: dict[str, int] = {}
    shards = []   # (part, the keys of one file), in order
    for i, held in enumerate(parts):
        new = {k: n for k, n in held.items() if k not in kept}
        kept.update(new)
        shards += [(i, keys) for keys in _split(new, max_shard_mb)]
    names = [WEIGHTS] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if writes:
        os.makedirs(path, exist_ok=True)
        for name, (i, keys) in zip(names, shards):
            if i == mine:
                save_file({k: tensors[k] for k in keys}, os.path.join(path, name), metadata={"format": "pt"})
    if not distributed or dist.get_rank() == 0:
        stale = os.path.join(path, INDEX if len(shards) == 1 else WEIGHTS)
        if os.path.exists(stale):
            os.remove(stale)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(kept.values())},
                     "weight_map": {k: name for name, (_, keys) in zip(names, shards) for k in keys}}
            with open(os.path.join(path, INDEX), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(path, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
    if distributed:
        dist.barrier()


def _split(sizes: dict[str, int], max_shard_mb: float | None) -> list[list[str]]:
    """The tensors' names in order, cut into files of at most max_shard_mb (a bigger tensor alone)."""
    if max_shard_mb is None:
        return [list(sizes)] if sizes else []
    limit, shards, size = max_shard_mb * 2**20, [[]], 0
    for k, nbytes in sizes.items():
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    return shards if shards[-1] else []


def init_from_pretrained(model_class, path: str, vocab_size: int, seq_len: int, dropout: float):
    """The trainer's --init-from: ``model_class.from_pretrained(path)``, checked against the data
    it will see."""
    model = model_class.from_pretrained(path, dropout=dropout)
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"--init-from {path}: the model has a vocabulary of {model.config.vocab_size} tokens, "
                         f"the data's tokenizer {vocab_size}. Use the tokenizer it was trained with "
                         f"(--tokenizer gpt2 for OpenAI's GPT-2, the same corpus for a char-level model)")
    if seq_len > model.config.block_size:
        raise ValueError(f"--init-from {path}: --seq-len {seq_len} is longer than the model's "
                         f"{model.config.block_size} positions (n_positions / max_position_embeddings): use "
                         f"--seq-len <= {model.config.block_size}")
    return model
