"""The private DeviceMesh, DTensor, functional-collective, c10d and dispatch APIs tinymeg uses, in
one place, so that a torch upgrade touches one file.

tinymeg supports torch 2.11 to 2.13 (pyproject.toml). What differs between them:

- ``DeviceMesh._unflatten("dp", ...)``: 2.11 rejects a dim given by name (an inverted check);
  the dim's index works on every version, so ``unflatten`` passes the index. 2.11 also cannot
  slice dims that another dim separates (``expert["edp", "cp"]`` across ``ep``): ParallelContext
  needs that slice only with both experts and context parallelism (ep > 1 and cp > 1), which is
  therefore 2.13 only.
- ``_functional_collectives.all_gather_single`` / ``reduce_scatter_single`` (2.13) do not exist
  in 2.11; ``all_gather_tensor`` / ``reduce_scatter_tensor`` compute the same, with a copy when
  the dim is not 0 (they gather or scatter on dim 0 and move the pieces; the gather's pieces are
  moved here, as 2.11's own way of doing it breaks torch.compile's fullgraph).
- c10d's ``all_gather_single`` / ``reduce_scatter_single`` (2.13, which deprecates
  ``all_gather_into_tensor`` / ``reduce_scatter_tensor``) do not exist in 2.11: ``gather_into``
  and ``reduce_scatter_into`` call whichever the running torch has.
- FSDP2's ``set_reduce_scatter_unused_params`` (2.13: a parameter that got no gradient on this
  rank still takes part in the reduce-scatter, with zeros) does not exist in 2.11, where ranks
  that used different parameters would reduce-scatter different sets and hang:
  ``reduce_scatter_unused_params`` gives such a parameter a zero gradient just before its
  group's post-backward, which is what 2.13 does.
- ``DTensor.full_tensor()`` of a ``_StridedShard`` (GPT-2's q|k|v sharded by heads, alone or
  beside another dim's shards) fails in 2.11 ("unable to be interpreted into a corresponding
  shard_order"): ``full_tensor`` gathers such a tensor itself.

The rest is private but the same on every supported version: it lives here so that the code
elsewhere says what it means (``unflatten(mesh, ...)``), not where torch keeps it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
from torch.distributed.checkpoint.state_dict import _init_optim_state as init_optim_state
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._utils import compute_global_tensor_info, compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard as StridedShard
from torch.utils._python_dispatch import _disable_current_modes as disable_dispatch_modes

AsyncCollectiveTensor = funcol.AsyncCollectiveTensor
all_reduce = funcol.all_reduce
all_to_all_single = funcol.all_to_all_single
all_to_all_single_autograd = funcol.all_to_all_single_autograd


def all_gather_single(x, dim: int, mesh: DeviceMesh):
    """Functional all-gather of x along dim over mesh (1-D)."""
    if hasattr(funcol, "all_gather_single"):
        return funcol.all_gather_single(x, dim, mesh)
    y = funcol.all_gather_tensor(x, 0, mesh)   # 2.11 moves other dims' pieces by a function dynamo skips
    return y if dim == 0 else torch.cat(torch.chunk(y, mesh.size(), dim=0), dim=dim)


def reduce_scatter_single(x, op: str, dim: int, mesh: DeviceMesh):
    """Functional reduce-scatter of x along dim over mesh (1-D)."""
    if hasattr(funcol, "reduce_scatter_single"):
        return funcol.reduce_scatter_single(x, op, dim, mesh)
    return funcol.reduce_scatter_tensor(x, op, dim, mesh)


def gather_into(output, input, group, async_op: bool = False):
    """c10d all-gather of every rank's ``input`` into ``output`` (dim 0, rank order)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group, async_op=async_op)


def reduce_scatter_into(output, input, group, async_op: bool = False):
    """c10d sum of ``input`` over the ranks, this rank's dim-0 slice into ``output``."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(output, input, group=group, async_op=async_op)


def full_tensor(t):
    """t.full_tensor() for a DTensor (a plain tensor as it is), on every supported torch."""
    if not isinstance(t, DTensor):
        return t
    try:
        return t.full_tensor()
    except ValueError:  # torch 2.11: a _StridedShard it cannot order (q|k|v sharded by heads)
        shards = [pl.dim for pl in t.placements if isinstance(pl, (Shard, StridedShard))]  # not a Shard in 2.11
        if (not any(isinstance(pl, StridedShard) for pl in t.placements) or len(set(shards)) != len(shards)
                or any(pl.is_partial() for pl in t.placements)):
            raise
    # Each mesh dim shards another tensor dim, so the gathers commute: one per mesh dim. A strided
    # one holds its slice of each of the k chunks of dim d: lay the ranks' pieces out chunk by chunk
    # (values only: no gradient flows back through the gathers).
    local = t.to_local()
    for mesh_dim, pl in enumerate(t.placements):
        if not isinstance(pl, (Shard, StridedShard)):
            continue
        n, k = t.device_mesh.size(mesh_dim), getattr(pl, "split_factor", 1)
        part = local.movedim(pl.dim, 0).contiguous()
        pieces = funcol.all_gather_tensor(part, 0, (t.device_mesh, mesh_dim))
        pieces = pieces.wait() if isinstance(pieces, AsyncCollectiveTensor) else pieces
        pieces = pieces.view(n, k, part.shape[0] // k, *part.shape[1:]).transpose(0, 1)
        local = pieces.reshape(-1, *part.shape[1:]).movedim(0, pl.dim)
    return local


def flatten(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The dims of mesh (a slice of a named mesh) as one dim called name, over the same ranks."""
    return mesh._flatten(name)


def unflatten(mesh: DeviceMesh, dim: str, sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """mesh with its dim ``dim`` split into dims ``names`` of ``sizes`` (outermost first)."""
    return mesh._unflatten(mesh.mesh_dim_names.index(dim), sizes, names)


def concatenate(meshes: list[DeviceMesh]) -> DeviceMesh:
    """One mesh whose dims are those of meshes (slices of one root mesh), in order: FSDP2's (dp, tp)."""
    return DeviceMesh._concatenate(meshes)


def resolve_process_group(name: str):
    """The ProcessGroup registered under name (a functional collective's group argument)."""
    return c10d._resolve_process_group(name)


def set_process_group_timeout(timeout, group) -> None:
    c10d._set_pg_timeout(timeout, group)


def local_tensor(t):
    """A DTensor's local shard itself (no autograd node: DTensor.to_local makes one)."""
    return t._local_tensor


def spec(t) -> DTensorSpec:
    """A DTensor's mesh, placements and global shape/stride."""
    return t._spec


__all__ = ["AsyncCollectiveTensor", "DTensorSpec", "StridedShard", "TensorMeta", "all_gather_single", "gather_into", "reduce_scatter_into",
           "all_reduce", "all_to_all_single", "all_to_all_single_autograd", "compute_global_tensor_info",
           "compute_local_shape_and_global_offset", "concatenate", "disable_dispatch_modes", "flatten", "full_tensor",
           "init_optim_state", "local_tensor",
           "reduce_scatter_single", "resolve_process_group", "set_process_group_timeout", "spec", "unflatten"]


def reduce_scatter_unused_params(model) -> None:
    """Every FSDP2 group of ``model`` (``fully_shard``-ed modules) reduce-scatters a zero gradient
    for a parameter this rank did not use, so that every rank runs the same collectives (module
    docstring: torch 2.11 has no switch for it)."""
    if hasattr(model, "set_reduce_scatter_unused_params"):
        model.set_reduce_scatter_unused_params(True)
        return
    for module in model.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        group = state._fsdp_param_group if state is not None else None
        if group is None:
            continue

        def post_backward(*args, _group=group, _original=group.post_backward):
            if _group.reduce_grads:  # this backward reduce-scatters: zeros for what got no gradient
                for fsdp_param in _group.fsdp_params:
                    if (hasattr(fsdp_param, "_unsharded_param") and fsdp_param.unsharded_param.requires_grad
                            and fsdp_param.unsharded_accumulated_grad is None
                            and fsdp_param.unsharded_param.grad is None):
                        fsdp_param.unsharded_param.grad = torch.zeros_like(fsdp_param.unsharded_param)
            return _original(*args)
        group.post_backward = post_backward
