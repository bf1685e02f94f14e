"""ParallelContext: one DeviceMesh with named dims, built from the torchrun environment."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Order matters: the mesh is laid out (dp, tp) so that tp ranks are neighbours
# (on a GPU node they share the fastest links; tp talks every layer, dp once a step).
MESH_DIMS = ("dp", "tp")


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ParallelContext:
    """A device mesh with named dims ``dp`` and ``tp``.

    ``ParallelContext({"tp": 2, "dp": 2})`` or ``ParallelContext(tp=2, dp=2)``. A dim left
    out has size 1. The process group is initialised from the torchrun environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) when it is not initialised yet; a plain
    ``python`` process with no such environment becomes a 1-rank world.

    ``device_type`` defaults to ``cuda`` (backend nccl) when CUDA is available, else ``cpu``
    (gloo). ``timeout`` bounds every collective, so a dead peer is an error, not a hang.
    """

    def __init__(self, dims: dict[str, int] | None = None, *, device_type: str | None = None,
                 backend: str | None = None, timeout: timedelta | float = 600.0, **kw_dims: int):
        sizes = dict(dims or {})
        for name, size in kw_dims.items():
            if name in sizes:
                raise ValueError(f"mesh dim {name!r} given twice (in the dict and as a keyword)")
            sizes[name] = size
        for name, size in sizes.items():
            if name not in MESH_DIMS:
                raise ValueError(f"unknown mesh dim {name!r}: tinymeg knows {list(MESH_DIMS)}")
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"mesh dim {name!r} must be an integer >= 1, got {size!r}")
        self.dp_size = sizes.get("dp", 1)
        self.tp_size = sizes.get("tp", 1)

        self.device_type = device_type or _default_device_type()
        if not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=timeout)
        _init_process_group(self.device_type, backend, timeout)

        world = dist.get_world_size()
        if self.dp_size * self.tp_size != world:
            raise ValueError(
                f"mesh dp={self.dp_size} x tp={self.tp_size} = {self.dp_size * self.tp_size} ranks, "
                f"but the world has {world} processes: launch with "
                f"`torchrun --nproc_per_node={self.dp_size * self.tp_size}` or change the dims")

        if self.device_type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device(self.device_type)

        self.mesh: DeviceMesh = init_device_mesh(
            self.device_type, (self.dp_size, self.tp_size), mesh_dim_names=MESH_DIMS)
        self.timeout = timeout
        _set_mesh_timeout(self.mesh, timeout)
        self.tp_rank = self.mesh["tp"].get_local_rank()
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.rank = dist.get_rank()
        self.world_size = world

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

    def __repr__(self) -> str:
        return (f"ParallelContext(dp={self.dp_size}, tp={self.tp_size}, rank={self.rank}, "
                f"dp_rank={self.dp_rank}, tp_rank={self.tp_rank}, device={self.device})")


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


def _set_mesh_timeout(mesh: DeviceMesh, timeout: timedelta) -> None:
    """init_device_mesh creates the dims' groups with torch's default timeout (30 min for gloo),
    not the world group's: give them ours. A dim that spans the world reuses the world group,
    which keeps the timeout it was initialised with (ours, unless someone else initialised it)."""
    for name in MESH_DIMS:
        group = mesh[name].get_group()
        if group is not dist.group.WORLD:
            dist.distributed_c10d._set_pg_timeout(timeout, group)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
