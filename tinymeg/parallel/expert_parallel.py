"""Expert parallelism: each ep rank holds E/ep experts, and tokens travel to them by all-to-all.

``apply_expert_parallel(model, ctx)`` prepares every MoE layer (``tinymeg.models.moe.MoE``) of a
model for the mesh, after tensor parallelism and before data parallelism:

- **Experts sharded over ep.** ``ep`` is carved out of the data-parallel ranks (``ctx.ep_mesh``):
  rank r of an ep group holds experts ``[r E/ep, (r+1) E/ep)``, each expert weight a DTensor
  ``Shard(0)`` on ``ctx.ep_mesh`` (the expert dim), so ``state_dict()`` and checkpoints see the
  global (E, ...) tensors; the router is ``Replicate()`` on the same mesh (so that each of the
  optimizer's foreach groups holds one kind of tensor). Each rank routes its own tokens, sorts
  the token slots by expert and sends each expert's slots to the rank that holds it with an
  all-to-all of variable splits; the rank computes its experts on everything it received
  (``tinymeg::grouped_mm``) and a second all-to-all brings the results back in the order they
  left. Backward is the same two all-to-alls, reversed. Per layer and direction that is the
  k token slots of each token, ``n k C`` elements, plus E integers (the counts).
- **Gradients.** Non-expert parameters stay data-parallel over dp. An expert's gradient sums
  the contributions of the tokens that every rank of its ep group sent it; the ranks holding
  the same experts are ``ctx.edp_mesh`` (dp = edp x ep; with context parallelism
  ``ctx.edp_cp_mesh``, edp x cp), so expert gradients are summed over it and divided by dp x cp
  (not edp: every token of the global batch counts once, with the loss's 1/(dp cp)), which DP
  does for parameters that name their mesh in ``data_parallel_mesh``.
- **Balancing statistics over the global batch.** ``MoE.reduce_stats`` is set to a sum over the
  ranks that hold other tokens of the batch (``ctx.dp_cp_mesh``, and ``tp`` under sequence
  parallelism), so the aux losses are those of the one-process model on the whole batch.
- **Tensor parallelism** shards attention (and dense MLPs); MoE layers are not TP-sharded:
  router and experts are replicated over tp (tp rank 0's copy, broadcast at apply time, as TP
  replicates every other parameter). Without sequence parallelism every tp rank routes
  the same tokens (the expert compute is repeated on each tp rank); with it each tp rank routes
  its own T/tp tokens, and the router's and experts' gradients are summed over tp (``copy_to_tp``).

At ``ep=1`` router and experts stay plain tensors and no all-to-all happens; the rest still
applies. The all-to-alls are functional collectives (``all_to_all_single_autograd``, which
works on gloo); their split sizes must be known on the host (``.tolist()``, a device sync on a
GPU, as in every dropless MoE), which torch.compile captures as symbolic sizes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .. import compat
from ..context import ParallelContext
from ..models.moe import GroupedExperts, MoE, expert_mlp, moe_layers
from ..nn.functional import _wait, all_reduce, copy_to_tp
from ..nn.layers import distribute_parameter, local
from .tensor_parallel import sequence_parallel_size


def apply_expert_parallel(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Shard the experts of every MoE layer over ``ctx.ep_mesh`` and make the layers' balancing
    statistics global (see the module docstring). Apply after tensor parallelism, before DP."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"apply_expert_parallel: {type(model).__name__} has no MoE layers "
                         f"(GPTConfig(n_experts=E) gives a GPT-2 some)")
    if any(isinstance(m.experts, ExpertParallelExperts) for m in layers):
        raise ValueError("expert parallelism was already applied to this model; apply it once")
    ep = ctx.ep_size
    for name, m in _named(model, layers):
        if m.n_experts % ep:
            raise ValueError(f"{name} has n_experts={m.n_experts}, not divisible by ep={ep}: each ep "
                             f"rank holds n_experts/ep experts. Choose an ep that divides {m.n_experts}")
    if ctx.tp_size > 1 and not any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("apply_tensor_parallel before apply_expert_parallel (tp > 1 but the model "
                         "has no tensor-parallel parameters): EP needs to know if sequence parallelism is on")
    sp = sequence_parallel_size(model) > 1
    tp_mesh = ctx.tp_mesh if sp else None
    for m in layers:
        experts, router = m.experts, m.router
        if ctx.tp_size > 1:  # replicated over tp: rank 0's copy on every tp rank, as TP does for the rest
            with torch.no_grad():
                for p in m.parameters():
                    dist.broadcast(p, group=ctx.tp_mesh.get_group(), group_src=0)
        if ep > 1:  # every parameter of the layer on the ep mesh: optimizers see one kind of tensor
            for pname, p in list(experts.named_parameters(recurse=False)):
                sharded = distribute_parameter(p, ctx.ep_mesh, Shard(0))
                # DP averages this gradient over the ranks holding the same experts (edp, x cp).
                sharded.data_parallel_mesh = ctx.edp_cp_mesh
                setattr(experts, pname, sharded)
            router.weight = distribute_parameter(router.weight, ctx.ep_mesh, Replicate())
        experts.__class__, router.__class__ = ExpertParallelExperts, ExpertParallelRouter
        for module in (experts, router):
            module.ep_mesh, module.tp_mesh = ctx.ep_mesh, tp_mesh
        meshes = [mesh for mesh in (ctx.dp_cp_mesh, tp_mesh) if mesh is not None and mesh.size() > 1]
        if meshes:
            m.reduce_stats = GlobalBatchSum(meshes, grad_scale=ctx.dp_cp_mesh.size())
    if ep > 1:
        # The all-to-all's split sizes come from the counts (.tolist()): let torch.compile
        # capture them as symbolic sizes instead of breaking the graph.
        torch._dynamo.config.capture_scalar_outputs = True
    return model


def unprepared_moe_layers(model: nn.Module) -> list[str]:
    """Names of the MoE layers that apply_expert_parallel has not prepared."""
    return [name for name, m in _named(model, moe_layers(model))
            if not isinstance(m.experts, ExpertParallelExperts)]


def _named(model: nn.Module, layers: list[MoE]) -> list[tuple[str, MoE]]:
    ids = {id(m) for m in layers}
    return [(n, m) for n, m in model.named_modules() if id(m) in ids]


def _local(module: nn.Module, p: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of a MoE parameter. Under sequence parallelism the layer sees only this
    rank's tokens, so the gradient is partial: copy_to_tp sums it over tp in backward."""
    p = local(p)
    return p if p is None or module.tp_mesh is None else copy_to_tp(p, module.tp_mesh)


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts whose weights hold this ep rank's E/ep experts (DTensor ``Shard(0)`` on
    ``ep_mesh``; plain tensors at ep=1). ``forward(x, counts)`` takes this rank's token slots
    sorted by global expert and returns their experts' outputs, in the same order."""
    ep_mesh: DeviceMesh
    tp_mesh: DeviceMesh | None  # set under sequence parallelism

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        weights = [_local(self, p) for p in (self.fc_weight, self.fc_bias, self.proj_weight, self.proj_bias)]
        if self.ep_mesh.size() == 1:
            return expert_mlp(x, counts, *weights, self.activation)
        return all_to_all_experts(x, counts, self.ep_mesh,
                                  lambda rows, n: expert_mlp(rows, n, *weights, self.activation))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ep={self.ep_mesh.size()}"


class ExpertParallelRouter(nn.Linear):
    """The router: replicated (a ``Replicate()`` DTensor on ``ep_mesh`` when ep > 1)."""
    ep_mesh: DeviceMesh
    tp_mesh: DeviceMesh | None  # set under sequence parallelism

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _local(self, self.weight), _local(self, self.bias))


def all_to_all_experts(x: torch.Tensor, counts: torch.Tensor, mesh: DeviceMesh, compute) -> torch.Tensor:
    """Send token slots to the ranks holding their experts, ``compute`` there, and bring the
    results back. x (M, C): this rank's slots sorted by expert; counts (E,): slots per expert;
    rank r of ``mesh`` holds experts [r E/ep, (r+1) E/ep). ``compute(rows, counts_per_local_expert)``
    gets the received rows sorted by local expert. Returns (M, C) in x's order. Differentiable:
    the backward of each all-to-all is the all-to-all with the splits swapped."""
    ep = mesh.size()
    local_experts = counts.numel() // ep
    # 1. How many slots each rank sends to each of my experts: [source rank, local expert].
    recv_counts = _wait(compat.all_to_all_single(counts, None, None, mesh)).view(ep, local_experts)
    send_splits = counts.view(ep, local_experts).sum(1).tolist()  # splits must be known on the host
    recv_splits = recv_counts.sum(1).tolist()
    # 2. Slots to their experts' ranks; rows arrive by source rank, then by local expert.
    received = _wait(compat.all_to_all_single_autograd(x, recv_splits, send_splits, mesh))
    # 3. Grouped by local expert for the grouped matmul, computed, put back in arrival order.
    expert_of_row = torch.repeat_interleave(
        torch.arange(local_experts, device=x.device).repeat(ep), recv_counts.flatten(),
        output_size=received.shape[0])
    order = expert_of_row.argsort(stable=True)
    y = compute(received[order], recv_counts.sum(0))[order.argsort()]
    # 4. Back to where each slot came from, in the order it left.
    return _wait(compat.all_to_all_single_autograd(y, send_splits, recv_splits, mesh))


class GlobalBatchSum:
    """``MoE.reduce_stats``: sums a layer's balancing statistics over the ranks holding other
    tokens of the batch, so the aux losses are the global batch's.

    Backward: every rank's loss holds the same aux loss of the same global sums, so the gradient
    reaching the global sums is the same on every rank, and the true backward of the sum over the
    data-parallel ranks (each with its own loss, which DP then averages) is that gradient summed
    over them: ``grad_scale`` = dp x cp times it, with no communication. With sequence
    parallelism the tp ranks share one loss (Megatron's convention, as in ``reduce_from_tp``):
    no factor for tp. DP's average then gives every rank the gradient of the global batch.
    """

    def __init__(self, meshes: list[DeviceMesh], grad_scale: int):
        self.meshes, self.grad_scale = meshes, grad_scale

    def __call__(self, stats: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(stats, self.meshes, self.grad_scale)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stats, meshes, grad_scale):
        ctx.grad_scale = grad_scale
        for mesh in meshes:
            stats = all_reduce(stats, mesh)
        return stats

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.grad_scale, None, None
