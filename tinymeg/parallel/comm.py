"""Count every collective of one training step, and the minimum the theory allows.

``comm_report(model, idx, targets, ctx)`` runs forward and backward under a dispatch mode
that records each collective: kind, mesh dim, group size, bytes and phase. ``nbytes`` is the
full tensor a collective works on (an all-reduce's input, an all-gather's output, a
reduce-scatter's input); ``wire_bytes`` is what each rank sends with ring algorithms:
(n-1)/n of it for an all-gather or a reduce-scatter, twice that for an all-reduce (which is
a reduce-scatter plus an all-gather). So SP's all-gather + reduce-scatter pair moves exactly
the bytes of the all-reduce it replaces. ``expected_gpt2_comm`` is the minimum for tinymeg's GPT-2 under a configuration;
tests assert that the two are equal, and ``recipes/bench.py comm`` prints them side by side.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from .. import compat

_funcol = torch.ops._c10d_functional
_c10d = torch.ops.c10d


@dataclass(frozen=True, order=True)
class Collective:
    phase: str      # forward | backward
    kind: str       # all_reduce | all_gather | reduce_scatter | broadcast | all_to_all
    dim: str        # mesh dim name (tp, dp) or the group's name
    ranks: int      # group size
    nbytes: int     # bytes of the full tensor (see module docstring)

    @property
    def wire_bytes(self) -> float:
        """Bytes each rank sends (ring algorithms; an all-to-all sends all but its own share,
        (n-1)/n of its input when the splits are even)."""
        share = (self.ranks - 1) / self.ranks * self.nbytes
        return 2 * share if self.kind == "all_reduce" else share


class CommCounter(TorchDispatchMode):
    """Records collectives issued while active (functional ones from TP, c10d ones from DP)."""

    def __init__(self, group_dims: dict[str, str]):
        super().__init__()
        self.group_dims, self.phase, self.records = group_dims, "forward", []

    def _group(self, group) -> tuple[str, int]:
        pg = dist.ProcessGroup.unbox(group) if not isinstance(group, str) else \
            compat.resolve_process_group(group)
        return self.group_dims.get(pg.group_name, pg.group_name), pg.size()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet, record = func.overloadpacket, None
        if packet is _funcol.all_reduce:
            record = ("all_reduce", args[2], _nbytes(args[0]))
        elif packet is _funcol.all_gather_into_tensor:
            record = ("all_gather", args[2], _nbytes(args[0]) * args[1])
        elif packet is _funcol.reduce_scatter_tensor:
            record = ("reduce_scatter", args[3], _nbytes(args[0]))
        elif packet is _c10d.allreduce_:
            record = ("all_reduce", args[1], sum(_nbytes(t) for t in args[0]))
        elif packet is _c10d.broadcast_:
            record = ("broadcast", args[1], sum(_nbytes(t) for t in args[0]))
        elif packet is _funcol.all_to_all_single:  # EP: input bytes (variable splits)
            record = ("all_to_all", args[3], _nbytes(args[0]))
        elif packet is _c10d._reduce_scatter_base_:   # ZeRO and FSDP2's gradient reduce-scatter
            record = ("reduce_scatter", args[2], _nbytes(args[1]))
        elif packet is _c10d._allgather_base_:        # ZeRO and FSDP2's parameter all-gather
            record = ("all_gather", args[2], _nbytes(args[0]))
        if record is not None:
            kind, group, nbytes = record
            self.records.append(Collective(self.phase, kind, *self._group(group), nbytes))
        return func(*args, **(kwargs or {}))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def comm_report(model, idx: torch.Tensor, targets: torch.Tensor, ctx, optimizer=None,
                **forward_kwargs) -> Counter:
    """Collectives of one forward + backward (including DP's gradient sync) and, given an
    optimizer, of its step (phase "step": ZeRO's parameter all-gather): a Counter of
    Collective -> count. forward_kwargs go to the model (GPT2Model: return_logits=False is
    the training step's loss path)."""
    dims = {ctx.mesh[d].get_group().group_name: d for d in ("tp", "dp")}
    dims.setdefault(ctx.dp_cp_mesh.get_group().group_name, "dp_cp")
    counter = CommCounter(dims)
    with counter:
        loss = model(idx, targets, **forward_kwargs)[1]
        counter.phase = "backward"
        loss.backward()
        if optimizer is not None:
            counter.phase = "step"
            optimizer.step()
    return Counter(counter.records)


def expected_gpt2_comm(model, batch: int, seq: int, ctx, sequence_parallel: bool = False,
                       loss_parallel: bool = False) -> Counter:
    """The minimum collectives of one forward + backward of tinymeg's GPT-2 (fp32).

    Per block, TP: 2 all-reduces of B*T*C forward (after attn.c_proj, mlp.c_proj) and 2
    backward (before c_attn, c_fc). SP: each becomes an all-gather + reduce-scatter pair of
    the same bytes, and the gradients of parameters that saw only this rank's tokens (norms,
    row biases) are all-reduced. Embedding: one all-reduce forward; lm_head: an all-gather of
    the logits forward (loss-parallel: instead, an all-reduce of each token's max and one of
    its sum-exp and target logit, B*T and 2*B*T floats) and an all-reduce of its input's
    gradient backward. DP: one all-reduce per bucket, together exactly the gradient bytes
    this rank holds.
    """
    cfg, tp = model.config, ctx.tp_size
    act = batch * seq * cfg.n_embd * 4
    logits = batch * seq * cfg.padded_vocab_size * 4
    L, want = cfg.n_layer, Counter()
    if tp > 1:
        want[Collective("forward", "all_reduce", "tp", tp, act)] += 1                  # vocab-parallel wte
        if loss_parallel:
            want[Collective("forward", "all_reduce", "tp", tp, batch * seq * 4)] += 1      # max
            want[Collective("forward", "all_reduce", "tp", tp, 2 * batch * seq * 4)] += 1  # sum-exp, target
        else:
            want[Collective("forward", "all_gather", "tp", tp, logits)] += 1           # lm_head logits
        if not sequence_parallel:
            want[Collective("forward", "all_reduce", "tp", tp, act)] += 2 * L
            want[Collective("backward", "all_reduce", "tp", tp, act)] += 2 * L + 1     # + lm_head input
        else:
            want[Collective("forward", "all_gather", "tp", tp, act)] += 2 * L + 1      # + lm_head input
            want[Collective("forward", "reduce_scatter", "tp", tp, act)] += 2 * L
            want[Collective("backward", "reduce_scatter", "tp", tp, act)] += 2 * L + 1
            want[Collective("backward", "all_gather", "tp", tp, act)] += 2 * L + 1     # + the split at block 0
            c = cfg.n_embd * 4
            per_norm = 2 if cfg.bias else 1
            # ln_1, ln_2 per block and ln_f; plus attn.c_proj.bias and mlp.c_proj.bias per block
            want[Collective("backward", "all_reduce", "tp", tp, c)] += per_norm * (2 * L + 1) + (2 * L if cfg.bias else 0)
    if ctx.dp_size > 1:
        want += expected_dp_comm(model, ctx)
    return want


def expected_dp_comm(model, ctx, step: bool = True) -> Counter:
    """The data-parallel collectives of one step (``step``: with the optimizer step's), by stage.

    0: one all-reduce per bucket in backward (the local gradients in the reduction dtype, and one
    used flag per parameter). 1-2: a reduce-scatter of the same buckets (each chunk padded to the
    largest) and, after the step, an all-gather of the updated parameters in their own dtype:
    together the all-reduce's bytes on the wire. 3 (FSDP2): per FSDP group, an all-gather of its
    parameters (padded, compute dtype) in forward and, except the root's, again in backward, and
    a reduce-scatter of its gradients (fp32) in backward."""
    want, n = Counter(), ctx.dp_size
    sync = getattr(model, "grad_sync", None)
    if sync is not None:
        for b in sync.buckets:
            kind = "all_reduce" if b.parts == 1 else "reduce_scatter"
            want[Collective("backward", kind, "dp", n, b.nbytes)] += 1
            if b.parts > 1 and step:
                itemsize = b.slots[0].param.element_size()
                want[Collective("step", "all_gather", "dp", n, b.parts * b.grad_numel * itemsize)] += 1
        return want
    from torch.distributed.fsdp import FSDPModule
    root = model
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue
        padded = sum(p.padded_sharded_param_size.numel() for p in group.fsdp_params)
        dtype = group.mp_policy.param_dtype or group.fsdp_params[0].sharded_param.dtype
        gathered = n * padded * dtype.itemsize
        want[Collective("forward", "all_gather", "dp", n, gathered)] += 1
        if module is not root:
            want[Collective("backward", "all_gather", "dp", n, gathered)] += 1
        want[Collective("backward", "reduce_scatter", "dp", n, n * padded * 4)] += 1
    return want


def format_comm_table(measured: Counter, expected: Counter) -> str:
    """One row per (phase, kind, dim, size): measured count, theoretical count, ratio."""
    rows = [f"{'phase':9} {'collective':15} {'dim':4} {'bytes each':>12} {'measured':>9} {'theory':>7} {'ratio':>6}"]
    for key in sorted(set(measured) | set(expected)):
        m, e = measured.get(key, 0), expected.get(key, 0)
        ratio = f"{m / e:.2f}" if e else "extra"
        rows.append(f"{key.phase:9} {key.kind:15} {key.dim:4} {key.nbytes:>12,} {m:>9} {e:>7} {ratio:>6}")
    total_m = sum(k.wire_bytes * n for k, n in measured.items())
    total_e = sum(k.wire_bytes * n for k, n in expected.items())
    rows.append(f"bytes sent per rank: measured {total_m:,.0f}, theory {total_e:,.0f}, ratio "
                f"{total_m / total_e if total_e else float('nan'):.2f}")
    return "\n".join(rows)
