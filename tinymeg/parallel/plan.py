"""Tensor-parallel plans: which module gets which parallel style, found by name pattern.

Two forms are accepted and normalised to ``{pattern: style}``:

* the Tiny-Megatron dict: ``{"column_linear_patterns": [...], "row_linear_patterns": [...],
  "vocab_embedding_patterns": [...]}``;
* a style map, as in ``torch.distributed.tensor.parallel``:
  ``{"attn.c_attn": ColumnParallel(), "attn.c_proj": RowParallel(), "wte": VocabParallel()}``.

A pattern matches a module whose qualified name ends with it at a dot boundary
(``attn.c_attn`` matches ``transformer.h.3.attn.c_attn``); shell globs are allowed
(``h.*.mlp.c_fc``, ``layers.[0-3].mlp.up_proj``).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ColumnParallel:
    """Shard a Linear's output features. ``output_chunks``: the weight stacks this many
    projections (q|k|v = 3) that are sharded each on its own; None reads the module's own
    ``output_chunks`` attribute (GPT2Model sets it on c_attn), else 1."""
    output_chunks: int | None = None
    gather_output: bool = False


@dataclass(frozen=True)
class RowParallel:
    """Shard a Linear's input features; its input must come sharded from a column layer."""


@dataclass(frozen=True)
class VocabParallel:
    """Shard an Embedding's rows (the vocabulary). A Linear tied to it (lm_head) is sharded
    with it and gathers its output, so logits stay whole on every rank."""


Style = ColumnParallel | RowParallel | VocabParallel

# The seed's plan for tinymeg's GPT-2 (tm.plans' "tinymeg-gpt2", which apply_tensor_parallel uses
# when it gets no plan). With sequence parallelism, the sequence is gathered by the vocab-sharded
# lm_head (so ln_f runs on sequence shards too, and the gather's backward is a reduce-scatter).
GPT2_TP_CONFIG = {
    "column_linear_patterns": ["attn.c_attn", "mlp.c_fc"],
    "row_linear_patterns": ["attn.c_proj", "mlp.c_proj"],
    "sequence_parallel_exit": "lm_head",
}


def gpt2_tp_config(config=None) -> dict:
    """GPT-2's plan for a model with this GPTConfig: GPT2_TP_CONFIG, except that a model whose
    every block's MLP is a mixture of experts has no dense MLP to shard (MoE layers are not
    tensor-parallel: see tinymeg.parallel.expert_parallel)."""
    if getattr(config, "n_experts", 0) and config.moe_every == 1:
        return {"column_linear_patterns": ["attn.c_attn"], "row_linear_patterns": ["attn.c_proj"]}
    return GPT2_TP_CONFIG


_DICT_KEYS = {"column_linear_patterns": ColumnParallel, "row_linear_patterns": RowParallel,
              "vocab_embedding_patterns": VocabParallel}
# Keys that switch features on and off rather than name modules.
OPTION_KEYS = {"sequence_parallel", "sequence_parallel_entry", "sequence_parallel_exit", "loss_parallel",
               "sharded_attributes"}


def normalize_plan(tp_config: dict, model: nn.Module,
                   vocab_shardable: Callable[[str, nn.Module], bool] = lambda name, module: True) -> dict[str, Style]:
    """Turn either plan form into {pattern: style}. Without vocab_embedding_patterns, the
    model's tied embedding (an Embedding whose weight a Linear shares) is vocab-parallel, if
    ``vocab_shardable`` says it can be (else it stays replicated, and so does its tied head:
    the default never refuses what it chose itself)."""
    if not isinstance(tp_config, dict):
        raise TypeError(f"tp_config must be a dict, got {type(tp_config).__name__}")
    plan: dict[str, Style] = {}
    for key, value in tp_config.items():
        if key in OPTION_KEYS:
            continue
        if key in _DICT_KEYS:
            if isinstance(value, str):
                raise TypeError(f"tp_config[{key!r}] must be a list of patterns, not the string {value!r}")
            for pattern in value:
                _add(plan, pattern, _DICT_KEYS[key]())
        elif isinstance(value, (ColumnParallel, RowParallel, VocabParallel)):
            _add(plan, key, value)
        else:
            raise ValueError(
                f"tp_config key {key!r} is neither one of {sorted(_DICT_KEYS) + sorted(OPTION_KEYS)} "
                f"nor a module pattern mapped to ColumnParallel()/RowParallel()/VocabParallel() "
                f"(got {value!r})")
    if "vocab_embedding_patterns" not in tp_config and not any(
            isinstance(s, VocabParallel) for s in plan.values()):
        for name in tied_embedding_names(model):
            if vocab_shardable(name, model.get_submodule(name)):
                plan[name] = VocabParallel()
    return plan


def _add(plan: dict, pattern: str, style: Style) -> None:
    if pattern in plan and plan[pattern] != style:
        raise ValueError(f"pattern {pattern!r} is given two styles: {plan[pattern]} and {style}")
    plan[pattern] = style


def matches(pattern: str, name: str) -> bool:
    return (name == pattern or name.endswith("." + pattern)
            or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern))


def resolve_plan(plan: dict[str, Style], model: nn.Module) -> dict[str, Style]:
    """{module name: style} for every module the plan names. Every pattern must match
    something, and no module may get two different styles."""
    names = [n for n, _ in model.named_modules() if n]
    resolved: dict[str, Style] = {}
    for pattern, style in plan.items():
        hits = [n for n in names if matches(pattern, n)]
        if not hits:
            leaf = pattern.rsplit(".", 1)[-1]
            near = [n for n in names if leaf in n][:5] or names[:5]
            raise ValueError(f"tensor-parallel pattern {pattern!r} matches no module of "
                             f"{type(model).__name__}; names look like {near}")
        for n in hits:
            if n in resolved and resolved[n] != style:
                raise ValueError(f"module {n!r} is matched twice with different styles: "
                                 f"{resolved[n]} and {style}")
            resolved[n] = style
    return resolved


def tied_embedding_names(model: nn.Module) -> list[str]:
    """The Embeddings whose weight nn.Linear heads share, and nothing else (check_ties' rule)."""
    users: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            users.setdefault(id(p), []).append(m)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and len(users[id(m.weight)]) > 1
            and all(type(u).forward is nn.Linear.forward for u in users[id(m.weight)] if u is not m)]


def check_pairing(model: nn.Module, plan: dict[str, Style]) -> None:
    """Column- and row-parallel layers come in pairs, inside the module that holds them (an
    attention: q/k/v then o; an MLP: gate/up then down; GPT-2's fused c_attn then c_proj).
    A column layer leaves its output sharded on features and only a row layer takes such an
    input, so in the subtree of a planned layer's parent module:

    - a RowParallel layer needs a ColumnParallel one (without gather_output) registered before
      it (modules register their layers in the order they run, as PyTorch and Hugging Face
      models do): none at all is "row without column", none before it is a swapped pair;
    - a ColumnParallel layer without gather_output needs a RowParallel one.

    Several columns may feed one row (q, k, v -> o), and a row may sit between columns
    (Mixtral's w1, w2, w3)."""
    names = [n for n, _ in model.named_modules()]
    order = {n: i for i, n in enumerate(names)}
    for name, style in sorted(plan.items(), key=lambda item: order[item[0]]):
        parent = name.rpartition(".")[0]
        inside = [n for n in plan if n != name and n.startswith(parent + ".")] if parent else \
            [n for n in plan if n != name]
        columns = [n for n in inside if isinstance(plan[n], ColumnParallel) and not plan[n].gather_output]
        rows = [n for n in inside if isinstance(plan[n], RowParallel)]
        where = f"{parent!r}" if parent else "the model"
        linears = [n for n in names if n.startswith(parent + ".") and n != name and
                   hasattr(model.get_submodule(n), "weight") and not list(model.get_submodule(n).children())][:6]
        if isinstance(style, RowParallel):
            if not columns:
                raise ValueError(
                    f"{name!r} is RowParallel, but nothing in {where} is ColumnParallel: a row-parallel "
                    f"layer takes its input sharded on features, as only a column-parallel layer leaves it. "
                    f"Plan the layers that feed it as ColumnParallel (modules there: {linears}), or take "
                    f"{name!r} out of the row patterns")
            if not any(order[c] < order[name] for c in columns):
                raise ValueError(
                    f"{name!r} is RowParallel but comes before every ColumnParallel layer of {where} "
                    f"({', '.join(repr(c) for c in columns)}): the column and row patterns look swapped. "
                    f"The layers that take the block's input (q/k/v, c_attn, c_fc, gate/up) are "
                    f"ColumnParallel; the ones that produce its output (o, c_proj, down) are RowParallel")
        elif isinstance(style, ColumnParallel) and not style.gather_output and not rows:
            raise ValueError(
                f"{name!r} is ColumnParallel, which leaves its output sharded over tp, but nothing in "
                f"{where} is RowParallel to take it back. Plan the layer that consumes its output as "
                f"RowParallel (modules there: {linears}), or use ColumnParallel(gather_output=True) "
                f"to gather its output on every rank")


def check_ties(model: nn.Module, plan: dict[str, Style]) -> None:
    """A planned layer whose weight another module shares (GPT-2's lm_head, tied to wte) is sharded
    with it or not at all: a VocabParallel embedding takes its tied nn.Linear heads along (each
    becomes a column-parallel head on the same sharded weight, so it must compute nn.Linear's
    forward), and a ColumnParallel head follows a VocabParallel embedding. Any other sharing
    would be split into separate parameters, silently untied, or lose a module's own forward."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            users.setdefault(id(p), []).append(name)
    for name, style in plan.items():
        others = [n for n in users.get(id(getattr(model.get_submodule(name), "weight", None)), []) if n != name]
        if isinstance(style, VocabParallel):
            bad = [n for n in others if not (type(model.get_submodule(n)).forward is nn.Linear.forward
                                             and isinstance(plan.get(n, ColumnParallel()), ColumnParallel))]
            if bad:
                raise ValueError(
                    f"{name!r} shares its weight with {bad} (tied), which VocabParallel cannot shard along: "
                    f"only nn.Linear heads (nn.Linear's own forward) follow a vocab-parallel embedding. "
                    f"Leave {name!r} out of the plan (both are then replicated)")
        elif others and not (isinstance(style, ColumnParallel) and all(isinstance(plan.get(n), VocabParallel) for n in others)):
            raise ValueError(
                f"{name!r} shares its weight with {others} (tied), which the plan does not shard as "
                f"VocabParallel: sharding {name!r} alone would untie them into two parameters. Plan "
                f"{others[0]!r} as VocabParallel() (the tied {name!r} then follows it), or leave {name!r} "
                f"out of the plan (both are then replicated)")
