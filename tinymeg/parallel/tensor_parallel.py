"""apply_tensor_parallel: swap the modules a plan names for their TP versions, in place."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from ..context import ParallelContext
from ..nn.functional import split_seq
from ..nn.layers import (REPLICATED_TYPES, ColumnParallelLinear, LayerNorm, RMSNorm, RowParallelLinear,
                         VocabParallelEmbedding, replicate_module)
from .plan import GPT2_TP_CONFIG, ColumnParallel, RowParallel, Style, VocabParallel, normalize_plan, resolve_plan


def apply_tensor_parallel(model: nn.Module, ctx: ParallelContext, tp_config: dict | None = None) -> nn.Module:
    """Shard ``model`` over ``ctx.mesh["tp"]`` as ``tp_config`` says and return it.

    Matched Linears become column/row-parallel, matched Embeddings vocab-parallel, a Linear
    tied to a vocab-parallel Embedding shares its sharded weight, and every other parameter
    becomes a Replicate() DTensor. Without a plan, GPT-2's seed plan is used.

    ``tp_config["sequence_parallel"] = True`` shards activations on the sequence dim from
    the input of the first block (``sequence_parallel_entry``: by default the first element
    of the ModuleList holding the first column-parallel layer) to the last column-parallel
    layer (lm_head): norms, dropout and residual adds run on 1/tp of the tokens.
    """
    _check_model(model, ctx)
    mesh, tp = ctx.mesh["tp"], ctx.tp_size
    plan = resolve_plan(normalize_plan(GPT2_TP_CONFIG if tp_config is None else tp_config, model), model)
    for name, style in plan.items():
        _check_shardable(name, model.get_submodule(name), style, tp)
    _check_heads(model, plan, tp)

    tied = {}  # id(old embedding weight) -> its sharded Parameter, for tied Linears
    for name, style in plan.items():
        old = model.get_submodule(name)
        if isinstance(style, VocabParallel):
            new = VocabParallelEmbedding.from_embedding(old, mesh)
            tied[id(old.weight)] = new.weight
        elif isinstance(style, ColumnParallel):
            chunks = style.output_chunks or getattr(old, "output_chunks", 1)
            new = ColumnParallelLinear.from_linear(old, mesh, chunks, style.gather_output)
        else:
            new = RowParallelLinear.from_linear(old, mesh)
        _set_submodule(model, name, new)

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and id(module.weight) in tied:
            # lm_head tied to the vocab-parallel wte: the same sharded parameter, logits gathered.
            _set_submodule(model, name, ColumnParallelLinear(tied[id(module.weight)], None, mesh,
                                                             gather_output=True))

    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if not isinstance(p, DTensor)]
        if not own:
            continue
        if type(module) not in REPLICATED_TYPES:
            known = list(dict.fromkeys(t.__name__ for t in REPLICATED_TYPES))  # two types are LayerNorms
            raise TypeError(
                f"module {name!r} ({type(module).__name__}) has parameters but no tensor-parallel "
                f"style, and tinymeg can only replicate {known}. "
                f"Name it in the plan, or replace it with a supported module.")
        replicate_module(module, mesh)

    if (tp_config or {}).get("sequence_parallel"):
        _apply_sequence_parallel(model, mesh, tp_config.get("sequence_parallel_entry"))
    if (tp_config or {}).get("loss_parallel"):
        # The LM head: a column-parallel layer that gathers its output, with plain row shards.
        heads = [m for m in model.modules() if isinstance(m, ColumnParallelLinear) and m.gather_output
                 and m.weight.placements == (Shard(0),)]
        if not heads and getattr(model, "holds_lm_head", True):  # False: a middle pipeline stage
            raise ValueError("loss_parallel needs a vocab-sharded LM head: a Linear tied to a "
                             "VocabParallel embedding, or one planned as ColumnParallel(gather_output=True)")
        for head in heads:
            head.loss_parallel = True
    return model


def _apply_sequence_parallel(model: nn.Module, mesh, entry: str | None) -> None:
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, LayerNorm, RMSNorm)):
            module.sequence_parallel = True
    entry = entry or _default_sp_entry(model)
    try:
        start = model.get_submodule(entry)
    except AttributeError:
        raise ValueError(f"sequence_parallel_entry {entry!r} is not a module of {type(model).__name__}") from None
    # The sequence is split where the SP region begins: forward keeps this rank's slice,
    # backward all-gathers the gradient (the embedding before it is replicated). A later pipeline
    # stage receives its input already split, from the previous stage.
    if not getattr(model, "input_sequence_sharded", False):
        start.register_forward_pre_hook(lambda _, args: (split_seq(args[0], mesh), *args[1:]))
    blocks = model.get_submodule(entry.rpartition(".")[0]) if "." in entry else start
    for module in blocks.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            _ShardedRNG(mesh).attach(module)


def _default_sp_entry(model: nn.Module) -> str:
    """The block holding the first column-parallel layer: the deepest module above it whose parent
    is a ModuleList or ModuleDict (a pipeline stage keeps its blocks in a ModuleDict)."""
    modules = dict(model.named_modules())
    first = next((n for n, m in modules.items() if isinstance(m, ColumnParallelLinear)), None)
    parts = first.split(".") if first else []
    for k in range(len(parts) - 1, 0, -1):
        if isinstance(modules[".".join(parts[:k - 1])], (nn.ModuleList, nn.ModuleDict)):
            return ".".join(parts[:k])
    raise ValueError("sequence_parallel needs to know where the sequence is split: the model has no "
                     "ModuleList of blocks with column-parallel layers; set tp_config['sequence_parallel_entry']")


class _ShardedRNG:
    """Dropout on sequence shards must draw a different mask on each TP rank (each holds
    other tokens), while dropout in replicated regions must draw the same mask everywhere.
    All ranks share one seed, so the default RNG gives the latter; for the former, each
    attached Dropout draws a seed from the shared stream (identically on every rank, so
    torch.manual_seed still reproduces everything), adds the tp rank, and runs on a
    generator state made from it, restoring the default state afterwards."""

    def __init__(self, mesh):
        self.device, self.rank, self.saved = torch.device(mesh.device_type), mesh.get_local_rank(), None

    def _swap(self, state: torch.Tensor) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        previous = torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state()
        torch.cuda.set_rng_state(state, self.device) if cuda else torch.set_rng_state(state)
        return previous

    def attach(self, module: nn.Module) -> None:
        def enter(_, args):
            seed = int(torch.randint(0, 2**62, (1,), device=self.device)) + self.rank
            self.saved = self._swap(torch.Generator(self.device).manual_seed(seed).get_state())

        def leave(_, args, out):
            self._swap(self.saved)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def _check_model(model: nn.Module, ctx: ParallelContext) -> None:
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("the model already has DTensor parameters: tensor parallelism was "
                         "applied to it before. Apply it once, to a freshly built model.")
    for name, p in model.named_parameters():
        if p.device.type != ctx.device.type:
            raise ValueError(f"parameter {name!r} is on {p.device} but the mesh is on "
                             f"{ctx.device}: call model.to({str(ctx.device)!r}) first")


def _check_shardable(name: str, module: nn.Module, style: Style, tp: int) -> None:
    if isinstance(style, VocabParallel):
        if type(module) is not nn.Embedding:
            raise TypeError(f"{name!r} is a {type(module).__name__}; VocabParallel shards nn.Embedding only")
        if module.num_embeddings % tp:
            raise ValueError(
                f"{name!r} has {module.num_embeddings} rows, not divisible by tp={tp}: pad the "
                f"vocabulary (GPTConfig(vocab_multiple=64) does) or choose a tp that divides it")
        return
    if type(module) is not nn.Linear:
        hint = (" (a Conv1D stores its weight transposed: convert it to nn.Linear with the "
                "weight transposed first)" if type(module).__name__ == "Conv1D" else "")
        raise TypeError(f"{name!r} is a {type(module).__name__}; {type(style).__name__} shards "
                        f"nn.Linear only{hint}")
    if isinstance(style, ColumnParallel):
        chunks = style.output_chunks or getattr(module, "output_chunks", 1)
        if module.out_features % (chunks * tp):
            raise ValueError(f"{name!r} has {module.out_features} output features in {chunks} "
                             f"chunk(s), not divisible by tp={tp} per chunk")
    elif module.in_features % tp:
        raise ValueError(f"{name!r} has {module.in_features} input features, not divisible by tp={tp}")


def _check_heads(model: nn.Module, plan: dict[str, Style], tp: int) -> None:
    """Attention must split by whole heads: a module with a head count whose children are sharded."""
    for name, module in model.named_modules():
        for attr in ("n_head", "num_heads", "num_key_value_heads", "n_kv_head"):
            heads = getattr(module, attr, None)
            if isinstance(heads, int) and heads % tp and any(
                    n.startswith(name + ".") for n in plan if name):
                raise ValueError(f"{name!r} has {attr}={heads}, not divisible by tp={tp}: "
                                 f"tensor parallelism splits attention by whole heads")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
