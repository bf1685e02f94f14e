"""apply_tensor_parallel: swap the modules a plan names for their TP versions, in place."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from ..context import ParallelContext
from ..models.moe import MoE
from ..nn.functional import gather_from_tp, split_seq
from ..nn.layers import (ColumnParallelLinear, ParallelDropout, RowParallelLinear, VocabParallelEmbedding,
                         is_transposed_linear, replicate_module)
from ..nn.region import RESIDUAL, Region
from .data_parallel import broadcast_replicas
from .plan import (ColumnParallel, RowParallel, Style, VocabParallel, check_pairing, check_ties, matches,
                   normalize_plan, resolve_plan)
from .plans import for_model

SEQ_DIM = 1


def apply_tensor_parallel(model: nn.Module, ctx: ParallelContext, tp_config: dict | None = None, *,
                          sync_replicas: bool = True) -> nn.Module:
    """Shard ``model`` over ``ctx.mesh["tp"]`` as ``tp_config`` says and return it.

    Matched Linears (and Hugging Face Conv1Ds) become column/row-parallel, matched Embeddings
    vocab-parallel, a Linear tied to a vocab-parallel Embedding shares its sharded weight, and
    every other module with parameters, whatever its class, is replicated: its parameters
    become Replicate() DTensors and it computes what it computes unsharded. Without a plan,
    the model's shipped plan is used (``tm.plans.for_model``: for tinymeg's GPT-2 and Llama,
    without the MLP patterns when every MLP is a MoE). MoE layers are left to ``apply_expert_parallel``. Every check runs before the model
    is changed.

    ``tp_config["sequence_parallel"] = True`` shards activations on the sequence dim from the
    input of the first block (``sequence_parallel_entry``: by default the first element of
    the ModuleList holding the first column-parallel layer) to the output of the last block
    of that list, or to the input of ``sequence_parallel_exit`` when given (GPT-2's plan:
    ``lm_head``, which gathers the sequence as it shards the vocabulary). Norms, dropout and
    residual adds run on 1/tp of the tokens; each module that holds column-parallel layers
    (attention, MLP) gets its input all-gathered once.

    On a mesh with dp (or cp) > 1 the parameters are broadcast from each shard's first replica,
    so that the replicas agree (``sync_replicas=False`` skips it, for callers that apply data
    parallelism next, which broadcasts them anyway); TP does not average their gradients: train
    over dp with ``apply_hybrid_parallel`` or ``tm.parallelize``.
    """
    _check_model(model, ctx)
    config = for_model(model) if tp_config is None else tp_config
    mesh, tp = ctx.mesh["tp"], ctx.tp_size
    # The default (no vocab_embedding_patterns) makes tied embeddings vocab-parallel where it can; one
    # it cannot shard (a subclass with its own forward, rows not divisible by tp) it leaves replicated
    plan = normalize_plan(config, model, lambda name, m: _shard_problem(name, m, VocabParallel(), tp) is None)
    if getattr(model, "pipeline", None) is not None:
        # a pipeline stage holds some of the model: patterns for the other stages' modules match nothing here
        names = [n for n, _ in model.named_modules() if n]
        plan = {pattern: style for pattern, style in plan.items() if any(matches(pattern, n) for n in names)}
    plan = resolve_plan(plan, model)
    for name, style in plan.items():
        _check_shardable(name, model.get_submodule(name), style, tp)
    _check_heads(model, plan, tp)
    check_pairing(model, plan)
    check_ties(model, plan)
    attributes = _sharded_attributes(model, config.get("sharded_attributes", ()), tp)
    sp = bool(config.get("sequence_parallel"))
    span = _sp_span(model, plan, config.get("sequence_parallel_entry")) if sp else None
    exit_name = config.get("sequence_parallel_exit") if sp else None
    if getattr(model, "output_sequence_sharded", False):
        exit_name = None  # a pipeline stage before the last: it sends its output on, still sharded
    elif exit_name is not None:
        _get(model, exit_name, "sequence_parallel_exit")
    loss_parallel = bool(config.get("loss_parallel"))
    if loss_parallel and getattr(model, "holds_lm_head", True) and not _has_vocab_sharded_head(model, plan):
        raise ValueError("loss_parallel needs a vocab-sharded LM head: a Linear tied to a "
                         "VocabParallel embedding, or one planned as ColumnParallel(gather_output=True)")

    region = Region(mesh, sp)
    model.tp_region = region  # what other dims ask: sequence_parallel_size(model)
    tied = {}  # id(old embedding weight) -> its sharded Parameter, for tied Linears
    for name, style in plan.items():
        if isinstance(style, VocabParallel):
            old = model.get_submodule(name)
            new = VocabParallelEmbedding.from_embedding(old, mesh)
            tied[id(old.weight)] = new.weight
            _set_submodule(model, name, new)
    for name, style in plan.items():
        old = model.get_submodule(name)
        if isinstance(style, ColumnParallel) and id(old.weight) in tied:
            # a head planned ColumnParallel but tied to the vocab-parallel embedding: share it
            new = ColumnParallelLinear(tied[id(old.weight)], None, mesh, gather_output=True)
        elif isinstance(style, ColumnParallel):
            chunks = style.output_chunks or getattr(old, "output_chunks", 1)
            new = ColumnParallelLinear.from_linear(old, mesh, chunks, style.gather_output)
        elif isinstance(style, RowParallel):
            new = RowParallelLinear.from_linear(old, mesh)
        else:
            continue
        _set_submodule(model, name, new)

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and id(module.weight) in tied:
            # lm_head tied to the vocab-parallel wte: the same sharded parameter, logits gathered.
            _set_submodule(model, name, ColumnParallelLinear(tied[id(module.weight)], None, mesh,
                                                             gather_output=True))

    moe = tuple(n + "." for n, m in model.named_modules() if isinstance(m, MoE))
    replicas = {}  # id(plain parameter) -> its Replicate() DTensor: tied parameters stay tied
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.region, module.tp_name = region, name
        elif type(module) is nn.Dropout:
            module.__class__, module.region = ParallelDropout, region
        elif (name + ".").startswith(moe):
            continue  # MoE layers (router, experts) are prepared by apply_expert_parallel
        elif any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            replicate_module(module, mesh, region, replicas)
    for module, attr, value in attributes:
        setattr(module, attr, value // tp)

    if sp:
        _apply_sequence_parallel(model, region, span, exit_name)
    if loss_parallel:
        for head in _vocab_sharded_heads(model):
            head.loss_parallel = True
    # Every forward starts with whole activations, whatever an earlier one left (an exception).
    model.register_forward_pre_hook(lambda *_: region.reset())
    # On a mesh with dp (or cp) > 1, the replicas of each shard start identical, whatever seed
    # each process used; averaging their gradients is data parallelism's (apply_hybrid_parallel).
    if sync_replicas:
        broadcast_replicas([*model.parameters(), *model.buffers()], ctx.dp_cp_mesh)
    return model


# ---------------------------------------------------------------- sequence parallelism

def sequence_parallel_size(model: nn.Module) -> int:
    """How many ways sequence parallelism splits the tokens between the blocks: the tp size
    when apply_tensor_parallel switched it on for this model, else 1."""
    region = getattr(model, "tp_region", None)
    return region.mesh.size() if region is not None and region.sequence_parallel else 1


def _sp_span(model: nn.Module, plan: dict[str, Style], entry: str | None) -> list[nn.Module]:
    """The modules the sequence stays sharded through: the entry and the blocks after it in
    its ModuleList (or the entry alone, when it is not in one)."""
    entry = entry or _default_sp_entry(model, plan)
    start = _get(model, entry, "sequence_parallel_entry")
    parent_name, _, index = entry.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if holds_blocks(parent) and index.isdigit():
        blocks = list(parent.values()) if isinstance(parent, nn.ModuleDict) else list(parent)
        return blocks[[m is start for m in blocks].index(True):]
    return [start]


def holds_blocks(module: nn.Module) -> bool:
    """A ModuleList, or a ModuleDict keyed by block indices (a pipeline stage's blocks)."""
    return isinstance(module, nn.ModuleList) or (
        isinstance(module, nn.ModuleDict) and len(module) > 0 and all(k.isdigit() for k in module.keys()))


def _default_sp_entry(model: nn.Module, plan: dict[str, Style]) -> str:
    columns = [n for n, s in plan.items() if isinstance(s, ColumnParallel)]
    for name, module in model.named_modules():
        if holds_blocks(module):
            for i in (module.keys() if isinstance(module, nn.ModuleDict) else range(len(module))):
                if any(c.startswith(f"{name}.{i}.") for c in columns):
                    return f"{name}.{i}"
    raise ValueError("sequence_parallel needs to know where the sequence is split: the model has no "
                     "ModuleList of blocks with column-parallel layers; set tp_config['sequence_parallel_entry']")


def _apply_sequence_parallel(model: nn.Module, region: Region, span: list[nn.Module], exit_name: str | None) -> None:
    mesh = region.mesh

    def enter_span(block, args, kwargs, first):
        # Every block of the span (not only the first) says that the stream is on sequence
        # shards, so a block recomputed alone (activation checkpointing) sees the right state.
        region.seq, region.where = True, RESIDUAL
        return _map_first_tensor(args, kwargs, lambda x: split_seq(x, mesh)) if first else None

    # a pipeline stage after the first receives its input already split, from the stage before
    split_input = not getattr(model, "input_sequence_sharded", False)
    for i, block in enumerate(span):
        block.register_forward_pre_hook(lambda m, a, k, first=i == 0 and split_input: enter_span(m, a, k, first),
                                        with_kwargs=True)
        for module in block.modules():
            # attention, MLP: the modules holding column-parallel layers get the whole sequence.
            # Not the block itself (its residual stays on shards): column layers held by the block
            # directly gather their input each.
            if module is not block and any(isinstance(c, ColumnParallelLinear) and not c.gather_output
                                           for c in module.children()):
                module.register_forward_pre_hook(
                    lambda m, a, k: _map_first_tensor(a, k, region.gather_for_block), with_kwargs=True)

    def leave_span(x):
        # the stream after the span is whole and the same on every rank: gather in forward, and
        # keep this rank's slice of the (whole) gradient in backward
        region.seq = False
        return gather_from_tp(x, mesh, dim=SEQ_DIM)

    if getattr(model, "output_sequence_sharded", False):
        pass  # a pipeline stage before the last: its output goes to the next stage on sequence shards
    elif exit_name is None:
        span[-1].register_forward_hook(lambda m, a, out: _map_first_tensor((out,), {}, leave_span)[0][0])
    elif not isinstance(model.get_submodule(exit_name), ColumnParallelLinear):
        model.get_submodule(exit_name).register_forward_pre_hook(
            lambda m, a, k: _map_first_tensor(a, k, leave_span), with_kwargs=True)
    # else: a column-parallel head gathers the sequence at its own input (region.enter_column)


def _map_first_tensor(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """(args, kwargs) with fn applied to the first tensor argument: the activation of a block,
    whether passed positionally or (as Hugging Face layers do) as hidden_states=."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return (*args[:i], fn(a), *args[i + 1:]), kwargs
        if isinstance(a, tuple) and a and isinstance(a[0], torch.Tensor):  # a block returning (hidden, ...)
            return (*args[:i], (fn(a[0]), *a[1:]), *args[i + 1:]), kwargs
    for key, a in kwargs.items():
        if isinstance(a, torch.Tensor):
            return args, {**kwargs, key: fn(a)}
    raise TypeError("sequence parallelism found no tensor among the block's arguments to split or gather")


# ---------------------------------------------------------------- checks (before any change)

def _get(model: nn.Module, name: str, option: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{option} {name!r} is not a module of {type(model).__name__}") from None


def _vocab_sharded_heads(model: nn.Module) -> list[ColumnParallelLinear]:
    """LM heads: column-parallel layers that gather their output, with plain row shards."""
    return [m for m in model.modules() if isinstance(m, ColumnParallelLinear) and m.gather_output
            and m.weight.placements == (Shard(0),)]


def _has_vocab_sharded_head(model: nn.Module, plan: dict[str, Style]) -> bool:
    vocab = [n for n, s in plan.items() if isinstance(s, VocabParallel)]
    tied_to = {id(model.get_submodule(n).weight) for n in vocab}
    tied_heads = any(isinstance(m, nn.Linear) and id(m.weight) in tied_to for m in model.modules())
    column_heads = any(isinstance(s, ColumnParallel) and s.gather_output and (s.output_chunks or 1) == 1
                       and not is_transposed_linear(model.get_submodule(n)) for n, s in plan.items())
    return tied_heads or column_heads


def _check_model(model: nn.Module, ctx: ParallelContext) -> None:
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("the model already has DTensor parameters: tensor parallelism was "
                         "applied to it before. Apply it once, to a freshly built model.")
    for name, p in model.named_parameters():
        if p.device.type != ctx.device.type:
            raise ValueError(f"parameter {name!r} is on {p.device} but the mesh is on "
                             f"{ctx.device}: call model.to({str(ctx.device)!r}) first")


def _plannable(module: nn.Module, base: type) -> bool:
    """A module can be planned like ``base`` when it is one, or a subclass that keeps base's
    forward (tinymeg's parallel layer computes that forward; it cannot compute another)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _check_shardable(name: str, module: nn.Module, style: Style, tp: int) -> None:
    problem = _shard_problem(name, module, style, tp)
    if problem is not None:
        raise problem


def _shard_problem(name: str, module: nn.Module, style: Style, tp: int) -> Exception | None:
    """Why ``module`` cannot be sharded as ``style`` (the error to raise), or None."""
    cls = type(module).__name__
    if isinstance(style, VocabParallel):
        if not _plannable(module, nn.Embedding):
            return TypeError(f"{name!r} is a {cls}{_own_forward(module, nn.Embedding)}; VocabParallel "
                             f"shards nn.Embedding (or a subclass that keeps its forward) only")
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return TypeError(f"{name!r} uses max_norm/scale_grad_by_freq/sparse, which VocabParallel does "
                             f"not shard: leave it out of the plan (it is then replicated)")
        if module.num_embeddings % tp:
            return ValueError(
                f"{name!r} has {module.num_embeddings} rows, not divisible by tp={tp}: pad the "
                f"vocabulary (GPTConfig(vocab_multiple=64) does) or choose a tp that divides it, or "
                f"leave the embedding out of the plan (it is then replicated)")
        return None
    if not (_plannable(module, nn.Linear) or is_transposed_linear(module)):
        return TypeError(f"{name!r} is a {cls}{_own_forward(module, nn.Linear)}; {type(style).__name__} "
                         f"shards nn.Linear (or a subclass that keeps its forward) and Hugging Face's "
                         f"Conv1D only. Leave it out of the plan to replicate it")
    in_features, out_features = (module.weight.shape if is_transposed_linear(module)
                                 else (module.in_features, module.out_features))
    if isinstance(style, ColumnParallel):
        chunks = style.output_chunks or getattr(module, "output_chunks", 1)
        if out_features % (chunks * tp):
            return ValueError(f"{name!r} has {out_features} output features in {chunks} "
                              f"chunk(s), not divisible by tp={tp} per chunk")
    elif in_features % tp:
        return ValueError(f"{name!r} has {in_features} input features, not divisible by tp={tp}")
    return None


def _own_forward(module: nn.Module, base: type) -> str:
    if isinstance(module, base) and type(module).forward is not base.forward:
        return (f" (a subclass of {base.__name__} with its own forward, which tinymeg's parallel "
                f"layer would replace)")
    return ""


def _check_heads(model: nn.Module, plan: dict[str, Style], tp: int) -> None:
    """Attention must split by whole heads: a module with a head count (or a head_dim) whose
    children are sharded must give every rank whole heads of each projection."""
    for name, module in model.named_modules():
        sharded = [n for n in plan if name and n.startswith(name + ".")]
        if not sharded:
            continue
        for attr in ("n_head", "num_heads", "num_key_value_heads", "n_kv_head"):
            heads = getattr(module, attr, None)
            if isinstance(heads, int) and heads % tp:
                raise ValueError(f"{name!r} has {attr}={heads}, not divisible by tp={tp}: "
                                 f"tensor parallelism splits attention by whole heads")
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            continue
        for child in sharded:
            style = plan[child]
            if not isinstance(style, ColumnParallel) or style.gather_output:
                continue
            layer = model.get_submodule(child)
            width = layer.weight.shape[1] if is_transposed_linear(layer) else layer.out_features
            chunks = style.output_chunks or getattr(layer, "output_chunks", 1)
            if width % chunks == 0 and (width // chunks) % head_dim == 0 and (width // chunks // head_dim) % tp:
                heads = width // chunks // head_dim
                raise ValueError(
                    f"{child!r} holds {heads} heads of head_dim={head_dim} ({name}.head_dim), not "
                    f"divisible by tp={tp}: tensor parallelism splits attention by whole heads (with "
                    f"grouped-query attention, the key/value heads too). Choose a tp that divides {heads}")


def _sharded_attributes(model: nn.Module, names, tp: int) -> list[tuple[nn.Module, str, int]]:
    """plan["sharded_attributes"]: integer attributes that count a sharded dim (a width, a
    number of heads), e.g. Hugging Face GPT-2's ``attn.split_size``. Each rank's module gets
    its share: the value divided by tp."""
    if isinstance(names, str):
        raise TypeError(f"sharded_attributes must be a list of 'module_pattern.attribute', not the string {names!r}")
    from .plan import matches
    found = []
    for entry in names:
        pattern, _, attr = entry.rpartition(".")
        modules = [(n, m) for n, m in model.named_modules() if n and matches(pattern, n) and hasattr(m, attr)]
        if not pattern or not modules:
            raise ValueError(f"sharded_attributes entry {entry!r} matches no module with an attribute {attr!r}")
        for n, m in modules:
            value = getattr(m, attr)
            if not isinstance(value, int) or value % tp:
                raise ValueError(f"{n}.{attr} = {value!r} is a sharded count, so it must be an integer "
                                 f"divisible by tp={tp}")
            found.append((m, attr, value))
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
