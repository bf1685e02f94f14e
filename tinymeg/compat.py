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
  the dim is not 0 (they gather or scatter on dim 0 and move the pieces).
- ``DTensor.full_tensor()`` of a ``_StridedShard`` alone on a 1-D mesh (GPT-2's q|k|v sharded by
  heads) fails in 2.11 ("unable to be interpreted into a corresponding shard_order"):
  ``full_tensor`` gathers such a tensor itself.

The rest is private but the same on every supported version: it lives here so that the code
elsewhere says what it means (``unflatten(mesh, ...)``), not where torch keeps it.
"""
from __future__ import annotations

import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
from torch.distributed.checkpoint.state_dict import _init_optim_state as init_optim_state
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
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
    return funcol.all_gather_tensor(x, dim, mesh)


def reduce_scatter_single(x, op: str, dim: int, mesh: DeviceMesh):
    """Functional reduce-scatter of x along dim over mesh (1-D)."""
    if hasattr(funcol, "reduce_scatter_single"):
        return funcol.reduce_scatter_single(x, op, dim, mesh)
    return funcol.reduce_scatter_tensor(x, op, dim, mesh)


def full_tensor(t):
    """t.full_tensor() for a DTensor (a plain tensor as it is), on every supported torch."""
    if not isinstance(t, DTensor):
        return t
    try:
        return t.full_tensor()
    except ValueError:  # torch 2.11: a lone _StridedShard(d, split_factor=k) on a 1-D mesh
        (pl,) = t.placements if t.device_mesh.ndim == 1 else (None,)
        if not isinstance(pl, StridedShard):
            raise
    # Each rank holds its slice of each of the k chunks of dim d: gather the ranks' pieces and
    # lay them out chunk by chunk (values only: no gradient flows back through the gather).
    n, k, local = t.device_mesh.size(), pl.split_factor, t.to_local().movedim(pl.dim, 0)
    pieces = funcol.all_gather_tensor(local.contiguous(), 0, t.device_mesh)
    pieces = pieces.wait() if isinstance(pieces, AsyncCollectiveTensor) else pieces
    pieces = pieces.view(n, k, local.shape[0] // k, *local.shape[1:]).transpose(0, 1)
    return pieces.reshape(-1, *local.shape[1:]).movedim(0, pl.dim)


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


__all__ = ["AsyncCollectiveTensor", "DTensorSpec", "StridedShard", "TensorMeta", "all_gather_single",
           "all_reduce", "all_to_all_single", "all_to_all_single_autograd", "compute_global_tensor_info",
           "compute_local_shape_and_global_offset", "concatenate", "disable_dispatch_modes", "flatten", "full_tensor",
           "init_optim_state", "local_tensor",
           "reduce_scatter_single", "resolve_process_group", "set_process_group_timeout", "spec", "unflatten"]
