"""ZeRO over the data-parallel mesh, and mixed precision: what each dp rank keeps of the
optimizer states (stage 1), gradients (2) and parameters (3), and in which dtype.

Every parameter is split over its data-parallel mesh on dim 0 of its local (TP) tensor, as
FSDP2 does, except a parameter whose dim 0 stacks projections (GPT-2's ``c_attn``: q|k|v):
dim 1, so that each rank's piece is one box of the global tensor and DCP can reshard it. As a
DTensor, a shard lives on the (dp, tp) mesh with FSDP2's placements: ``Shard(d)`` over dp, or
``_StridedShard(d, split_factor=tp)`` when TP already shards dim d (the dp split happens inside
each TP shard), then the parameter's TP placements.

- **Stage 1**: the optimizer steps each rank's shard of every parameter (``shard_optimizer``
  swaps the optimizer's parameters for their shards), so its states are DTensors sharded over
  dp. Gradients are reduce-scattered bucket by bucket (``grad_sync``) into the shards, and after
  ``optimizer.step()`` the updated shards are all-gathered back into the parameters: the bytes
  of DP's all-reduce (a reduce-scatter and an all-gather), in two halves. The full-size buckets
  stay allocated between steps.
- **Stage 2**: the same, but the full-size buckets are freed once reduced: between steps a rank
  holds 1/dp of the gradients.
- **Stage 3**: torch's ``fully_shard`` (FSDP2) on the dp mesh, composed with tinymeg's TP
  DTensors: parameters sharded too, gathered per block (each element of a ``ModuleList``) just
  in time in forward and again in backward, freed after use, the next block prefetched.

**Mixed precision** (``param_dtype=torch.bfloat16``): the model computes in bf16; the optimizer
steps fp32 master weights (the shards, or at stage 0 full copies) with fp32 states; gradients are
accumulated and reduced in fp32; parameters are all-gathered in bf16. At stage 3 this is FSDP2's
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` over fp32 sharded parameters.

Stages 1-2 shard element by element, so they work with optimizers whose update of an element
depends on that element's own gradient and state only (``ELEMENTWISE_OPTIMIZERS``: SGD with or
without momentum, Adam, AdamW...); others (Adafactor, Muon, LBFGS) are refused with an error.
Stage 3 steps FSDP2's sharded DTensor parameters, as any torch optimizer on DTensors does.
"""
from __future__ import annotations

import collections
import types

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict as _torch_get_state_dict
from torch.distributed.checkpoint.state_dict import set_state_dict as _torch_set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .. import compat
from ..nn.layers import local as _local
from .grad_sync import MAX_IN_FLIGHT, GradientElsewhere, GradSync, ShardLayout, as_like, data_parallel_mesh

ELEMENTWISE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax,
                          torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop,
                          torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.ASGD)
_HOLDER = "_tinymeg_holder"   # on a parameter: the tensor its optimizer steps (shard / master)


def optimizer_param(p: nn.Parameter) -> torch.Tensor:
    """The tensor that holds p's averaged gradient and that the optimizer steps: p's dp shard
    and/or fp32 master under ZeRO 1-2 or mixed precision, p itself otherwise."""
    return getattr(p, _HOLDER, p)


def _is_shard(pl) -> bool:
    return isinstance(pl, (Shard, compat.StridedShard))


def stacked_count(module: nn.Module, p: nn.Parameter) -> int:
    """How many projections p stacks on dim 0 (GPT-2's c_attn: 3), from the module's
    ``output_chunks`` or the split factor of its TP placement (the one on the mesh's "tp" dim:
    a ZeRO/FSDP2 shard inside a TP shard is a _StridedShard on the dp dim, not a stack)."""
    k = getattr(module, "output_chunks", 1)
    if isinstance(p, DTensor):
        names = p.device_mesh.mesh_dim_names or ("tp",) * p.device_mesh.ndim
        k = next((pl.split_factor for name, pl in zip(names, p.placements)
                  if name == "tp" and isinstance(pl, compat.StridedShard)), k)
    return k


def shard_dims(model: nn.Module) -> dict[int, int]:
    """id(p) -> the dim ZeRO splits p on: 1 for a parameter that stacks projections on dim 0
    (so each rank's piece is one box of the global tensor), else 0."""
    dims = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            dims[id(p)] = 1 if stacked_count(module, p) > 1 and p.dim() >= 2 else 0
    return dims


def _inside_dp(p: torch.Tensor, dp_mesh: DeviceMesh) -> bool:
    """p is a DTensor replicated over ranks of its own dp mesh (an expert-parallel router: ep is
    carved out of dp): its dp shard is one box of it on the dp mesh alone."""
    if not isinstance(p, DTensor) or not all(pl.is_replicate() for pl in p.placements):
        return False
    return len(set(p.device_mesh.mesh.flatten().tolist()) & set(dp_mesh.mesh.flatten().tolist())) > 1


def shard_placements(p: torch.Tensor, dim: int, dp_mesh: DeviceMesh | None = None) -> tuple:
    """FSDP2's placements for p split over dp on dim inside its TP placements: (dp, *tp)."""
    tp = tuple(p.placements) if isinstance(p, DTensor) and not _inside_dp(p, dp_mesh) else ()
    split = 1
    for pl, size in zip(tp, p.device_mesh.mesh.shape if tp else ()):
        if _is_shard(pl) and pl.dim == dim:
            split *= size
    return ((compat.StridedShard(dim, split_factor=split) if split > 1 else Shard(dim)),) + tp


_MESHES: dict = {}


def _dp_tp_mesh(dp_mesh: DeviceMesh, p: torch.Tensor) -> DeviceMesh:
    if not isinstance(p, DTensor) or _inside_dp(p, dp_mesh):
        return dp_mesh
    key = (dp_mesh, p.device_mesh)
    if key not in _MESHES:
        _MESHES[key] = compat.concatenate([dp_mesh, p.device_mesh])   # as FSDP2 does
    return _MESHES[key]


class ZeroState:
    """What apply_data_parallel adds to a model (``model.zero_state``) for ZeRO and mixed precision."""

    def __init__(self, model: nn.Module, stage: int, param_dtype: torch.dtype | None,
                 sync: GradSync | None, holders: dict, default_mesh: DeviceMesh):
        self.model, self.stage, self.param_dtype = model, stage, param_dtype
        self.sync, self.holders, self.default_mesh = sync, holders, default_mesh
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def sharded(self) -> bool:
        return self.stage in (1, 2)

    def publish(self, everything: bool = False) -> None:
        """Parameters from their holders after the optimizer stepped them (everything: after a
        checkpoint load). Stages 1-2: all-gather each bucket's updated shards (in the
        parameters' dtype); stage 0 with fp32 masters: cast them into the parameters."""
        if not self.holders:
            return
        with torch.no_grad():
            if not self.sharded:
                for p, holder in self.holders.items():
                    if everything or holder.grad is not None:
                        _local(p).copy_(_local(holder))
                return
            groups = [[(s.param, s.layout) for s in b.slots] for b in self.sync.buckets]
            if everything:   # frozen parameters are in no bucket
                groups = [[(p, self.sync.layout(p, self._mesh(p).size()))] for p in self.holders]
            else:            # a bucket whose parameters got no gradient anywhere did not change
                groups = [g for g in groups if any(self.holders[p].grad is not None for p, _ in g)]
            self._all_gather(groups)

    def _mesh(self, p: nn.Parameter) -> DeviceMesh:
        return data_parallel_mesh(p, self.default_mesh)

    def _all_gather(self, groups: list[list]) -> None:
        """All-gather each group's updated shards into its parameters, at most MAX_IN_FLIGHT
        groups' full-size buffers at a time."""
        pending = collections.deque()
        for group in groups:
            mesh = self._mesh(group[0][0])
            size, rank = mesh.size(), mesh.get_local_rank()
            offsets = [0]
            for _, layout in group:
                offsets.append(offsets[-1] + layout.row_numel)
            dtype = _local(group[0][0]).dtype
            mine = torch.empty(offsets[-1], dtype=dtype, device=_local(group[0][0]).device)
            for (p, layout), off in zip(group, offsets):
                layout.own(mine[off:off + layout.row_numel], rank).copy_(_local(self.holders[p]))
            everyone = torch.empty(size * offsets[-1], dtype=dtype, device=mine.device)
            work = compat.gather_into(everyone, mine, group=mesh.get_group(), async_op=True)
            pending.append((group, offsets, everyone, work))
            if len(pending) > MAX_IN_FLIGHT:
                _unpack(*pending.popleft())
        while pending:
            _unpack(*pending.popleft())


def _unpack(group: list, offsets: list[int], everyone: torch.Tensor, work: dist.Work) -> None:
    """Every rank's shards, all-gathered into `everyone`, back into the group's parameters."""
    work.wait()
    rows = everyone.view(-1, offsets[-1])
    for (p, layout), off in zip(group, offsets):
        layout.copy_from_rows(rows[:, off:off + layout.row_numel], _local(p))


def make_holders(params: list[nn.Parameter], default_mesh: DeviceMesh, stage: int,
                 param_dtype: torch.dtype | None, dims: dict[int, int]) -> dict:
    """p -> the tensor its optimizer steps, for every parameter (frozen ones too: they may be
    unfrozen later). Stage 1-2: p's dp shard, a view of p itself in fp32 (no copy) or an fp32
    master copy under mixed precision; stage 0 with mixed precision: a full fp32 master copy."""
    holders = {}
    for p in params:
        local = _local(p)
        if stage in (1, 2):
            mesh = data_parallel_mesh(p, default_mesh)
            layout = ShardLayout(local.shape, dims.get(id(p), 0) if local.dim() else 0, mesh.size())
            piece = layout.chunk(local, mesh.get_local_rank())        # a view of p: no copy
            if param_dtype is not None:
                piece = piece.detach().float().clone()
            shape = p.shape if local.dim() else torch.Size([1])      # a 0-dim parameter as (1,)
            held = DTensor.from_local(piece, _dp_tp_mesh(mesh, p), shard_placements(p, layout.dim, mesh),
                                      shape=shape, stride=p.stride() if local.dim() else (1,),
                                      run_check=False)
        else:
            held = as_like(local.detach().float().clone(), p)
        holder = nn.Parameter(held, requires_grad=True)   # a leaf that only holds .grad
        holders[p] = holder
        setattr(p, _HOLDER, holder)
    return holders


def shard_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make a torch optimizer built on ``model``'s parameters step what this rank holds.

    Build the optimizer as usual, on the wrapped model's parameters (param groups and
    hyperparameters as you like), then hand it here::

        model = tm.apply_data_parallel(model, ctx, zero=2)
        optimizer = tm.shard_optimizer(model, torch.optim.AdamW(model.parameters(), lr=3e-4))

    Under ZeRO 1-2 and mixed precision the optimizer's parameters become their shards / fp32
    masters (same groups, same hyperparameters, same optimizer object, so LR schedulers keep
    working), ``step()`` is followed by the all-gather of the updated parameters, and
    ``zero_grad()`` also forgets the gradients accumulated in the data-parallel buckets. Without
    them (replicated DP in fp32, stage 3) the optimizer is returned unchanged, so generic code
    can always call this. Call it before the first step.
    """
    state: ZeroState | None = getattr(model, "zero_state", None)
    if state is None or state.optimizer is optimizer or (state.stage != 3 and not state.holders):
        return optimizer
    if state.optimizer is not None:
        raise ValueError("this model already has a sharded optimizer; build one optimizer per model")
    if state.sharded and not isinstance(optimizer, ELEMENTWISE_OPTIMIZERS):
        raise ValueError(
            f"ZeRO stage {state.stage} cannot shard {type(optimizer).__name__}: stages 1-2 step each "
            f"rank's slice of every parameter, which is only right for optimizers whose update of an "
            f"element depends on that element alone ({', '.join(o.__name__ for o in ELEMENTWISE_OPTIMIZERS)}). "
            f"Use zero=3 (FSDP2 steps DTensor shards with global semantics) or zero=0")
    if optimizer.state:
        raise ValueError("shard_optimizer: the optimizer has already stepped; shard it right after building it")
    ours = state.holders or {p: p for p in state.model.parameters()}
    unknown = [p for g in optimizer.param_groups for p in g["params"] if p not in ours]
    if unknown:
        raise ValueError(f"shard_optimizer: the optimizer holds {len(unknown)} tensor(s) that are not "
                         f"parameters of this model (the first has shape {tuple(unknown[0].shape)}); build "
                         f"it on the wrapped model's parameters")
    zero_grad = optimizer.zero_grad

    def zero_grad_everywhere(self, set_to_none: bool = True) -> None:
        zero_grad(set_to_none)
        state.model.zero_grad(set_to_none)   # the model's local gradients, the buckets, FSDP2's state
    optimizer.zero_grad = types.MethodType(zero_grad_everywhere, optimizer)
    state.optimizer = optimizer
    if state.holders:   # (stage 3: FSDP2's sharded parameters are the model's own)
        for group in optimizer.param_groups:
            group["params"] = [state.holders[p] for p in group["params"]]
        optimizer.register_step_post_hook(lambda *_: state.publish())
    return optimizer


# ---------------------------------------------------------------- stage 3

def fully_shard_model(model: nn.Module, default_mesh: DeviceMesh, param_dtype: torch.dtype | None,
                      dims: dict[int, int]) -> None:
    """ZeRO-3 with FSDP2: one FSDP group per module holding parameters that declare another
    data-parallel mesh (experts), per element of every ModuleList (the blocks), and the root.

    A pipelined model has one root per stage of this rank (tinymeg.parallel.pipeline_parallel's
    _Stage: its blocks, and its embeddings, or its final norm and head), as torchtitan shards each
    model chunk: torch's PipelineStage then keeps the gradients unreduced through the microbatches
    and reduce-scatters them once, after the last backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ValueError(f"zero=3 (FSDP2) cannot shard 0-dim parameters ({', '.join(scalars)}): make each a "
                         f"1-element 1-D tensor, or use zero=1 or 2, which shard them")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
        if param_dtype is not None else MixedPrecisionPolicy()
    pipeline = getattr(model, "pipeline", None)
    if pipeline is None:
        _fully_shard_root(model, default_mesh, policy, dims)
        return
    stages = model._stages()
    staged = {id(p) for stage in stages for p in stage.parameters()}
    outside = [name for name, p in model.named_parameters() if id(p) not in staged]
    if outside:
        raise ValueError(f"zero=3 under pipeline parallelism shards each stage's modules, but {', '.join(outside)} "
                         f"belong to none (a model's parameters must live in the parts it names: EMBEDDINGS, "
                         f"BLOCKS, NORM, HEAD); use zero 0, 1 or 2")
    for stage in stages:
        _fully_shard_root(stage, default_mesh, policy, dims)
    pipeline.stage_modules = stages


def fsdp_roots(model: nn.Module) -> list:
    """The FSDP2 roots of a ZeRO-3 model: the model, or a pipelined model's stages."""
    pipeline = getattr(model, "pipeline", None)
    return [model] if pipeline is None else pipeline.stage_modules


def _fully_shard_root(model: nn.Module, default_mesh: DeviceMesh, policy, dims: dict[int, int]) -> None:
    from torch.distributed.fsdp import fully_shard

    def shard(module: nn.Module, mesh: DeviceMesh) -> None:
        fully_shard(module, mesh=mesh, mp_policy=policy,
                    shard_placement_fn=lambda p: Shard(dims.get(id(p), 0)))
        if mesh.size() != default_mesh.size():  # summed over its own mesh, divided as every gradient
            module.set_gradient_divide_factor(float(default_mesh.size()))   # (grad_sync's docstring)
            # gloo has no PREMUL_SUM: sum, then divide (a 1-rank mesh reduces nothing: FSDP2 divides
            # as it copies, and would divide again after a forced sum)
            if mesh.size() > 1 and dist.get_backend(mesh.get_group()) == "gloo":
                module.set_force_sum_reduction_for_comms(True)

    for module in list(model.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            if _inside_dp(p, data_parallel_mesh(p, default_mesh)):   # FSDP2 shards it over dp alone
                setattr(module, name, nn.Parameter(p.to_local(), requires_grad=p.requires_grad))
    for module in list(model.modules()):
        meshes = {data_parallel_mesh(p, default_mesh) for p in module.parameters(recurse=False)}
        if meshes and meshes != {default_mesh}:
            if len(meshes) > 1:
                raise ValueError(f"module {type(module).__name__} holds parameters of several data-parallel "
                                 f"meshes; ZeRO-3 shards a module over one mesh: split it")
            shard(module, meshes.pop())
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(True for _ in block.parameters()):
                    shard(block, default_mesh)
    shard(model, default_mesh)
    # A parameter used on some ranks only must still take part in every rank's reduce-scatter.
    compat.reduce_scatter_unused_params(model)
    model.register_forward_pre_hook(lambda module, args: recover_fsdp(module), prepend=True)


def recover_fsdp(model: nn.Module) -> None:
    """After a backward that raised, finish FSDP2's backward bookkeeping (stage 3).

    FSDP2 queues its end-of-backward callback once and only clears that mark in the callback,
    which a backward that raised never runs: every later backward would then skip it (no
    reduce-scatter waits, gradients left unsharded). Run it now, outside backward, as the end
    of the failed backward would have: it reduce-scatters what that backward had accumulated
    (on every rank that failed at the same point), so zero_grad() after this forgets it.
    Called by zero_grad() and before each forward."""
    for root in fsdp_roots(model):
        state = root._get_fsdp_state()
        if state._state_ctx.post_backward_final_callback_queued and torch._C._current_graph_task_id() == -1:
            state._root_post_backward_final_callback()


# ---------------------------------------------------------------- checkpoints

def get_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer):
    """(model state dict, optimizer state dict) keyed by parameter names with global shapes, at
    every stage, as torch.distributed.checkpoint.state_dict.get_state_dict gives them: DCP saves
    each rank's chunks and reshards them onto any stage and mesh. With mixed precision the model
    entries are the fp32 masters. A dp shard of a 1-D parameter that stacks projections
    (c_attn.bias) is not one box of the global tensor, so those entries are gathered over dp (a
    few KB), as are those of 0-dim parameters."""
    state: ZeroState | None = getattr(model, "zero_state", None)
    if state is None or not state.holders:
        model_sd, optim_sd = _torch_get_state_dict(model, optimizer)
    else:
        compat.init_optim_state(optimizer)
        names = _names(model)
        model_sd = master_state_dict(model)
        held = {id(h): names[p] for p, h in state.holders.items()}
        optim_sd = {"state": {held[id(h)]: dict(s) for h, s in optimizer.state.items()},
                    "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                      "params": [held[id(h)] for h in g["params"]]}
                                     for g in optimizer.param_groups]}
    for name, p, group in _unboxed(model):
        if name in model_sd:
            model_sd[name] = _gather_dp(model_sd[name], group, p.shape)
        if name in optim_sd["state"]:   # a new dict: torch's are the optimizer's own
            optim_sd["state"][name] = {key: _gather_dp(value, group, p.shape)
                                       for key, value in optim_sd["state"][name].items()}
    return model_sd, optim_sd


def master_state_dict(model: nn.Module) -> dict:
    """model.state_dict() with every parameter at full precision: under mixed precision at stages
    0-2 its fp32 master (a DTensor sharded over dp at stages 1-2) in place of the bf16 working
    copy (stage 3 keeps fp32 parameters itself); entries whose dp shard is not one box of the
    global tensor gathered over dp. ``full_tensor()`` gives each entry whole."""
    state: ZeroState | None = getattr(model, "zero_state", None)
    sd = model.state_dict()
    if state is not None and state.param_dtype is not None and state.holders:
        for name, p in model.named_parameters(remove_duplicate=False):
            sd[name] = state.holders[p].detach()
    for name, p, group in _unboxed(model):
        if name in sd:
            sd[name] = _gather_dp(sd[name], group, p.shape)
    return sd


def set_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, *, model_state_dict: dict,
                   optim_state_dict: dict) -> None:
    """Load what get_state_dict gave (after DCP filled it in place) into model and optimizer."""
    state: ZeroState | None = getattr(model, "zero_state", None)
    masters = state is not None and state.param_dtype is not None and bool(state.holders)
    with torch.no_grad():
        for name, p, group in _unboxed(model):   # gathered copies back into this rank's shard
            target = optimizer_param(p) if masters else p
            if name in model_state_dict and _is_dp_sharded(target, group):
                _scatter_dp(model_state_dict[name], target)
                model_state_dict[name] = target.detach()
            live = optimizer.state.get(optimizer_param(p), {})
            for key, value in optim_state_dict["state"].get(name, {}).items():
                if key in live and _is_dp_sharded(live[key], group):
                    _scatter_dp(value, live[key])
                    optim_state_dict["state"][name][key] = live[key]
    if state is None or not state.holders:
        _torch_set_state_dict(model, optimizer, model_state_dict=model_state_dict,
                              optim_state_dict=optim_state_dict)
        return
    names = _names(model)
    with torch.no_grad():
        if not masters:
            model.load_state_dict(model_state_dict)
        for p, holder in state.holders.items():
            if masters:
                _copy_unless_same(model_state_dict[names[p]], holder)
            live = optimizer.state.get(holder)
            for key, value in optim_state_dict["state"].get(names[p], {}).items():
                if live is not None and key in live and torch.is_tensor(value) and torch.is_tensor(live[key]):
                    _copy_unless_same(value, live[key])
                elif live is not None:
                    live[key] = value
    for group, saved in zip(optimizer.param_groups, optim_state_dict["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    state.publish(everything=True)


def _copy_unless_same(source: torch.Tensor, target: torch.Tensor) -> None:
    src, dst = _local(source), _local(target)
    if src.data_ptr() != dst.data_ptr() or src.shape != dst.shape:
        dst.copy_(src)


def _names(model: nn.Module) -> dict:
    return {p: name for name, p in model.named_parameters()}


def _unboxed(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, its dp group's name) for the parameters whose dp shard is not one box
    of the global tensor (1-D ones stacking projections, 0-dim ones), under ZeRO >= 1."""
    state: ZeroState | None = getattr(model, "zero_state", None)
    if state is None or state.stage == 0:
        return []
    out = []
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 0 or (p.dim() == 1 and stacked_count(module, p) > 1):
                mesh = data_parallel_mesh(p, state.default_mesh)
                out.append((f"{mod_name}.{name}" if mod_name else name, p, mesh.get_group().group_name))
    return out


def _is_dp_sharded(t: torch.Tensor, group: str) -> bool:
    """t is a DTensor split over the dp group named group (its mesh dim 0)."""
    return (isinstance(t, DTensor) and _is_shard(t.placements[0])
            and t.device_mesh.get_group(0).group_name == group)


@torch.no_grad()
def whole_value(t: torch.Tensor) -> torch.Tensor:
    """The global value of a parameter, gradient or optimizer state, however it is sharded: over
    tp, ep, and over dp by ZeRO/FSDP2 (whose dp dim comes first in the mesh). DTensor's
    full_tensor alone misplaces the dp shards of a 1-D tensor that stacks projections (GPT-2's
    c_attn.bias), so those are gathered over dp first. A collective over the tensor's meshes."""
    if isinstance(t, DTensor) and t.device_mesh.mesh_dim_names[0] != "tp":
        t = _gather_dp(t, t.device_mesh.get_group(0).group_name, t.shape)
    return compat.full_tensor(t)


@torch.no_grad()
def _gather_dp(t: torch.Tensor, group: str, shape: torch.Size) -> torch.Tensor:
    """t, a DTensor split over dp (mesh dim 0), as a tensor replicated over dp: with its TP
    placements only (a plain tensor without TP), in the parameter's shape."""
    if not _is_dp_sharded(t, group):
        return t
    mesh = t.device_mesh
    tp_mesh = mesh[mesh.mesh_dim_names[1:]] if mesh.ndim > 1 else None
    tp_shape = compat.compute_local_shape_and_global_offset(t.shape, tp_mesh, t.placements[1:])[0] \
        if tp_mesh is not None else tuple(t.shape)
    layout = ShardLayout(tp_shape, t.placements[0].dim, mesh.size(0))
    local = _local(t)
    mine = local.new_zeros(layout.row_numel)
    layout.own(mine, mesh.get_local_rank(0)).copy_(local)
    rows = local.new_empty(layout.parts * layout.row_numel)
    compat.gather_into(rows, mine, group=mesh.get_group(0))
    full = local.new_empty(layout.shape)
    layout.copy_from_rows(rows.view(layout.parts, -1), full)
    if tp_mesh is None:
        return full.view(shape)
    return DTensor.from_local(full, tp_mesh, t.placements[1:], shape=t.shape, stride=t.stride(), run_check=False)


@torch.no_grad()
def _scatter_dp(full: torch.Tensor, target: DTensor) -> None:
    """The inverse of _gather_dp: this rank's dp chunk of full into target (in place)."""
    mesh = target.device_mesh
    layout = ShardLayout(_local(full).shape, target.placements[0].dim, mesh.size(0))
    _local(target).copy_(layout.chunk(_local(full), mesh.get_local_rank(0)))


# ---------------------------------------------------------------- memory

def memory_mb(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """MiB of this rank's parameter, gradient and optimizer-state tensors (each storage counted
    once, in the first category that holds it): ``param_mb`` the model's parameters (local
    shards); ``grad_mb`` their gradients, the optimizer parameters' gradients and the
    data-parallel buckets; ``optim_mb`` the optimizer states and fp32 master weights."""
    seen: set = set()

    def size(tensors) -> float:
        total = 0
        for t in tensors:
            if t is None:
                continue
            storage = _local(t).untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total / 2**20

    params = list(model.parameters())
    opt_params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
    sync = getattr(model, "grad_sync", None)
    buffers = [t for b in (sync.buckets if sync else []) for t in (b.buffer, b.output)]
    param_mb = size(params)
    grad_mb = size([p.grad for p in params if not isinstance(p.grad, GradientElsewhere)]
                   + [p.grad for p in opt_params] + buffers)
    states = [v for s in (optimizer.state.values() if optimizer else []) for v in s.values() if torch.is_tensor(v)]
    optim_mb = size(opt_params + states)
    return {"param_mb": param_mb, "grad_mb": grad_mb, "optim_mb": optim_mb}
