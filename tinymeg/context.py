"""ParallelContext: one DeviceMesh with named dims, built from the torchrun environment.

The world is one mesh, outermost to innermost ``(pp, dp, cp, tp)``:

- ``pp``: pipeline stages. Talks once per microbatch at stage boundaries: can cross nodes.
- ``dp``: data parallel (optionally ZeRO-sharded). Talks once per step.
- ``cp``: context parallel, the sequence split over ranks. Talks every attention layer.
- ``tp``: tensor parallel. Talks every layer, so its ranks are neighbours (on a GPU node they
  share the fastest links).

``ep`` (expert parallel) is not a set of extra ranks: it is carved out of the data-parallel
ranks, as Megatron-LM and torchtitan do. ``dp`` is viewed as ``(edp, ep)``: the ``ep`` ranks
of one ``edp`` index hold different experts and exchange tokens; the ``edp`` ranks with the
same ``ep`` index hold the same experts and average their gradients.

A dim left out has size 1, except ``dp``: left out (or -1) it is inferred as the world size
over the product of the other dims, so ``torchrun --nproc_per_node=4`` with ``tp=2`` gives dp=2.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from . import compat

# The world mesh, outermost to innermost (see the module docstring for why this order).
MESH_DIMS = ("pp", "dp", "cp", "tp")
# Every dim a user may name: the mesh's, and ep, carved out of dp.
DIMS = ("pp", "dp", "ep", "cp", "tp")


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ParallelContext:
    """A device mesh with named dims ``pp``, ``dp``, ``cp``, ``tp`` (and ``ep`` inside ``dp``).

    ``ParallelContext({"tp": 2, "dp": 2})`` or ``ParallelContext(tp=2, dp=2)``. A dim left
    out has size 1; ``dp`` left out (or -1) takes the ranks the other dims leave. The process
    group is initialised from the torchrun environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) when it is not initialised yet; a plain ``python`` process with no
    such environment becomes a 1-rank world.

    ``device_type`` defaults to ``cuda`` (backend nccl) when CUDA is available, else ``cpu``
    (gloo). ``timeout`` bounds every collective, so a dead peer is an error, not a hang.

    Meshes: ``ctx.mesh`` is the world mesh ``(pp, dp, cp, tp)``, and ``ctx.mesh["tp"]`` etc.
    its 1-D views. ``ctx.dp_cp_mesh`` is dp and cp flattened (the ranks that hold the same
    dense weights and see different tokens: gradients are averaged over it), ``ctx.ep_mesh``
    and ``ctx.edp_mesh`` the expert views of dp, ``ctx.edp_cp_mesh`` edp and cp flattened (the
    ranks that hold the same experts and see different tokens).
    """

    def __init__(self, dims: dict[str, int] | None = None, *, device_type: str | None = None,
                 backend: str | None = None, timeout: timedelta | float = 600.0, **kw_dims: int):
        sizes = dict(dims or {})
        for name, size in kw_dims.items():
            if name in sizes:
                raise ValueError(f"mesh dim {name!r} given twice (in the dict and as a keyword)")
            sizes[name] = size
        for name, size in sizes.items():
            if name not in DIMS:
                raise ValueError(f"unknown mesh dim {name!r}: tinymeg knows {list(DIMS)}")
            infer = name == "dp" and size in (None, -1)
            if not infer and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
                raise ValueError(f"mesh dim {name!r} must be an integer >= 1"
                                 f"{' (or -1 for dp: inferred)' if name == 'dp' else ''}, got {size!r}")

        self.device_type = device_type or _default_device_type()
        if not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=timeout)
        _init_process_group(self.device_type, backend, timeout)
        world = dist.get_world_size()

        self.sizes = resolve_sizes(sizes, world)
        self.pp_size, self.dp_size, self.ep_size, self.cp_size, self.tp_size = (
            self.sizes[d] for d in DIMS)

        if self.device_type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device(self.device_type)

        self.mesh: DeviceMesh = init_device_mesh(
            self.device_type, tuple(self.sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        # Derived views. Each creates process groups (a collective call), so all are built
        # here, on every rank, in the same order: never lazily.
        self.dp_cp_mesh = compat.flatten(self.mesh["dp", "cp"], "dp_cp") if self.cp_size > 1 else self.mesh["dp"]
        expert = compat.unflatten(self.mesh, "dp", (self.dp_size // self.ep_size, self.ep_size), ("edp", "ep"))
        self.edp_mesh, self.ep_mesh = expert["edp"], expert["ep"]
        # The ranks holding the same experts and seeing other tokens: expert gradients' DP mesh.
        # Without experts edp is dp, so edp_cp is dp_cp (torch 2.11 cannot slice ("edp", "cp") across ep).
        self.edp_cp_mesh = (compat.flatten(expert["edp", "cp"], "edp_cp") if self.cp_size > 1 and self.ep_size > 1
                            else self.dp_cp_mesh if self.cp_size > 1 else self.edp_mesh)
        self.timeout = timeout
        _set_mesh_timeout(self._meshes(), timeout)

        self.rank = dist.get_rank()
        self.world_size = world
        self.pp_rank, self.dp_rank, self.cp_rank, self.tp_rank = (
            self.mesh[d].get_local_rank() for d in MESH_DIMS)
        self.ep_rank = self.ep_mesh.get_local_rank()

    def _meshes(self) -> list[DeviceMesh]:
        return [*(self.mesh[d] for d in MESH_DIMS), self.dp_cp_mesh, self.edp_mesh, self.ep_mesh,
                self.edp_cp_mesh]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def is_main(self) -> bool:
        """True on global rank 0: the one that prints and writes logs."""
        return self.rank == 0

    def describe(self) -> str:
        """The sizes of the dims that are on, e.g. ``dp=2 x tp=2`` (``1 process`` when none)."""
        on = [f"{d}={self.sizes[d]}" for d in DIMS if self.sizes[d] > 1]
        return " x ".join(on) if on else "1 process"

    def __repr__(self) -> str:
        ranks = ", ".join(f"{d}_rank={getattr(self, d + '_rank')}" for d in DIMS if self.sizes[d] > 1)
        return (f"ParallelContext({', '.join(f'{d}={self.sizes[d]}' for d in DIMS)}, rank={self.rank}"
                f"{', ' + ranks if ranks else ''}, device={self.device})")


def resolve_sizes(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Every dim's size for a world of ``world`` processes: 1 when left out, dp inferred when
    left out or -1. Errors say what does not fit and how to launch instead."""
    out = {d: sizes.get(d, 1) for d in DIMS}
    mesh_dims = [d for d in MESH_DIMS if d != "dp"]
    others = math.prod(out[d] for d in mesh_dims)
    if sizes.get("dp", -1) in (None, -1):
        if world % others:
            raise ValueError(
                f"cannot infer dp: the world has {world} processes, which {_product(out, mesh_dims)} "
                f"= {others} does not divide. Launch a multiple of {others} processes, or change the dims")
        out["dp"] = world // others
    if math.prod(out[d] for d in MESH_DIMS) != world:
        n = math.prod(out[d] for d in MESH_DIMS)
        raise ValueError(
            f"mesh {_product(out, MESH_DIMS)} = {n} ranks, but the world has {world} processes: launch "
            f"with `torchrun --nproc_per_node={n}` or change the dims (leave dp out to infer it)")
    if out["dp"] % out["ep"]:
        raise ValueError(f"ep={out['ep']} must divide dp={out['dp']}: expert parallelism is carved out "
                         f"of the data-parallel ranks. Choose an ep that divides dp, or a larger dp")
    return out


def _product(sizes: dict[str, int], dims) -> str:
    return " x ".join(f"{d}={sizes[d]}" for d in dims)


def _init_process_group(device_type: str, backend: str | None, timeout: timedelta) -> None:
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    if "RANK" not in os.environ:
        # A plain `python script.py`: a world of one process on a free local port.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend, timeout=timeout)


def _set_mesh_timeout(meshes: list[DeviceMesh], timeout: timedelta) -> None:
    """init_device_mesh creates the dims' groups with torch's default timeout (30 min for gloo),
    not the world group's: give them ours. A dim that spans the world reuses the world group,
    which keeps the timeout it was initialised with (ours, unless someone else initialised it)."""
    for mesh in meshes:
        group = mesh.get_group()
        if group is not dist.group.WORLD:
            compat.set_process_group_timeout(timeout, group)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
