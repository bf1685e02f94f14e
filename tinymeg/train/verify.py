"""tinymeg's self-check: each composition of dims, trained a few steps against one process.

``run_case(case)`` (every rank calls it) builds a small model twice from one seed: once whole, in
this process, and once on the case's mesh through ``tm.parallelize``; trains both on the same
global batch for a few steps (gradient accumulation, clipping by the global norm, AdamW); and
returns the largest relative difference of the logged loss, of the gradient norm and of the
parameters (norm-wise, every parameter gathered whole) over the steps, or the error message of
a composition that is refused. ``cases(world)`` lists the compositions that fit a world:
every dim alone, every pair, and the larger meshes that fit, with dp taking the ranks the others
leave. ``recipes/verify.py`` prints them as a table; the test suite runs each pair at the
smallest size.

The reference reproduces what the dims promise (DESIGN.md): the loss is the token mean of the
global batch, and a MoE layer's balancing statistics are those of one forward's global batch,
which under pipeline parallelism is one pipeline microbatch of every dp rank. So the batch is
laid out as ``[accumulation step, microbatch, dp rank, sequence]`` and the one process runs
``accum x microbatches`` forwards, each the ``dp x micro/microbatches`` sequences of one.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

import tinymeg as tm
from ..context import ParallelContext
from ..parallel.zero import whole_value
from .checks import world_size_from_env
from .optim import build_optimizer, clip_grad_norm_

DIMS = ("pp", "cp", "tp", "ep")      # the dims combined; dp takes the ranks they leave
SEQ, LR, CLIP, EPS = 16, 1e-2, 0.5, 1e-4   # EPS: AdamW's, large enough that float noise in a gradient
# near zero does not become a full step (tests/test_hf_models.py explains)


@dataclass(frozen=True)
class Case:
    """One composition: the sizes of the dims (dp left out: the rest of the world), ZeRO's stage,
    sequence + loss parallelism (with tp), the pipeline schedule (with pp), dense or MoE."""
    dims: tuple                      # ((dim, size), ...) of DIMS, sizes > 1
    zero: int = 0
    sp_lp: bool = False
    schedule: str = "1f1b"
    moe: bool = False

    def sizes(self, world: int) -> dict[str, int]:
        sizes = {"pp": 1, "cp": 1, "tp": 1, "ep": 1, **dict(self.dims)}
        sizes["dp"] = world // (sizes["pp"] * sizes["cp"] * sizes["tp"])
        return sizes

    def mesh(self, world: int) -> str:
        """e.g. ``pp2 dp2 cp2 +zero3``: the mesh the case runs on, and its options."""
        sizes = self.sizes(world)
        name = " ".join(f"{d}{sizes[d]}" for d in ("pp", "dp", "ep", "cp", "tp") if sizes[d] > 1) or "1 process"
        extras = [f"zero{self.zero}" if self.zero else "", "sp+lp" if self.sp_lp else "",
                  self.schedule if sizes["pp"] > 1 and self.schedule != "1f1b" else ""]
        return " ".join([name, *(f"+{e}" for e in extras if e)])

    def fits(self, world: int) -> bool:
        sizes = self.sizes(world)
        used = sizes["pp"] * sizes["cp"] * sizes["tp"]
        return world % used == 0 and sizes["dp"] % sizes["ep"] == 0 and (self.zero == 0 or sizes["dp"] > 1)


@dataclass
class Outcome:
    loss: float = 0.0          # max over steps of |loss - reference| / |reference|
    grad_norm: float = 0.0
    params: float = 0.0        # max over parameters of ||p - reference|| / ||reference|| after the steps
    refused: str | None = None  # the error of a composition tinymeg refuses

    def worst(self) -> float:
        return max(self.loss, self.grad_norm, self.params)


def cases(world: int) -> list[Case]:
    """Every composition that fits ``world`` ranks, dense and MoE: each dim alone (dp with ZeRO
    0-3, pp with each schedule, tp with and without SP + loss parallel), every pair of dims
    (with ZeRO 0 and 3 where dp > 1), and every larger set of dims that fits, at size 2 each."""
    out = []
    for n in range(len(DIMS) + 1):
        for dims in itertools.combinations(DIMS, n):
            base = tuple((d, 2) for d in dims)
            variants = [dict()]
            if "tp" in dims:
                variants = [dict(sp_lp=True)] + ([dict(sp_lp=False)] if n == 1 else [])
            if dims == ("pp",):
                variants += [dict(schedule="gpipe"), dict(schedule="interleaved-1f1b")]
            zeros = (0, 1, 2, 3) if n <= 1 else (0, 3)
            for v, zero, moe in itertools.product(variants, zeros, (False, True)):
                case = Case(base, zero=zero, moe=moe, **v)
                if case.fits(world) and (moe or "ep" not in dims):
                    out.append(case)
    return out


# ---------------------------------------------------------------- one case

_contexts: dict = {}


def _context(sizes: dict[str, int]) -> ParallelContext:
    key = tuple(sorted(sizes.items()))
    if key not in _contexts:   # building a mesh creates process groups: once per shape
        _contexts[key] = ParallelContext(sizes)
    return _contexts[key]


def _model(moe: bool, n_layer: int):
    """Dense: tinymeg's GPT-2 (tied head, learned positions). MoE: tinymeg's Llama (rotary, GQA,
    untied head) with 4 experts, top-2, in every other block."""
    if moe:
        return tm.models.Llama(tm.models.LlamaConfig.tiny(block_size=SEQ, n_layer=n_layer, n_experts=4, top_k=2,
                                                          moe_every=2))
    return tm.models.GPT2Model(tm.models.GPTConfig.tiny(block_size=SEQ, n_layer=n_layer))


def run_case(case: Case, steps: int = 3, accum: int = 2, seed: int = 0, ctx: ParallelContext | None = None,
             prepare=None, targets=None) -> Outcome:
    """Train ``case`` and one process side by side (see the module docstring); every rank calls it
    and gets the same Outcome. ``ctx``: the case's mesh, if the caller has built it already. For
    tests off the happy path: ``prepare(model)`` changes both plain models alike before sharding,
    ``targets(y)`` the batch's targets (e.g. ignores some: -1)."""
    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    sizes = case.sizes(world)
    pp, dp = sizes["pp"], sizes["dp"]
    V = 2 if case.schedule == "interleaved-1f1b" else 1
    micro = M = pp if pp > 1 else 1   # microbatches of one sequence each
    n_layer = 2 * pp * V
    ctx = ctx or _context(sizes)
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        models.append(_model(case.moe, n_layer).to(ctx.device))
        if prepare is not None:
            prepare(models[-1])
    ref, plain = models
    try:
        model = tm.parallelize(plain, ctx, zero=case.zero,
                               sequence_parallel=case.sp_lp, loss_parallel=case.sp_lp,
                               pipeline=dict(schedule=case.schedule, microbatches=M, stages_per_rank=V)
                               if pp > 1 else None)
    except (ValueError, TypeError, NotImplementedError) as e:
        return Outcome(refused=str(e))
    opts = [build_optimizer(m, LR, 0.1, eps=EPS) for m in (ref, model)]
    vocab = ref.config.vocab_size
    out = Outcome()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, vocab, (2, accum, M, dp, micro // M, SEQ), generator=g).to(ctx.device)
        if targets is not None:
            batch[1] = targets(batch[1])
        ref_loss = _reference_step(ref, batch, accum * M)
        loss = _sharded_step(model, batch[:, :, :, ctx.dp_rank], ctx, accum)
        args = model.grad_norm_args() if pp > 1 else {}
        norms = (clip_grad_norm_(ref.parameters(), CLIP), clip_grad_norm_(model.parameters(), CLIP, **args))
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.loss = max(out.loss, _rel(loss, ref_loss))
        out.grad_norm = max(out.grad_norm, _rel(norms[1], norms[0]))
    out.params = _params_rel(model, ref)
    worst = torch.tensor([out.loss, out.grad_norm, out.params], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)   # every rank reports the worst of any rank
    out.loss, out.grad_norm, out.params = worst.tolist()
    return out


def _reference_step(ref, batch: torch.Tensor, forwards: int) -> torch.Tensor:
    """One process: every forward of the step (an accumulation step's microbatch, every dp rank's
    sequences of it), its loss / forwards accumulated. Returns the mean loss."""
    x, y = batch.flatten(1, 2).flatten(2, 3)   # (forwards, dp x micro/M, SEQ)
    total = torch.zeros(())
    # each forward's cross-entropy is its share of the step's token mean (ignored targets may fall
    # unevenly between forwards): tinymeg.models.base.token_share
    ref.loss_tokens.copy_(torch.stack([(y != -1).sum(), torch.tensor(forwards, device=y.device)]))
    try:
        for xf, yf in zip(x, y):
            loss = ref(xf, yf, return_logits=False)[1]
            (loss / forwards).backward()
            total += loss.detach().cpu()
    finally:
        ref.loss_tokens.zero_()
    return total / forwards


def _sharded_step(model, batch: torch.Tensor, ctx: ParallelContext, accum: int) -> torch.Tensor:
    """This dp rank's micro-batches (accum of them, each its rows of every microbatch), the
    gradients reduced once, on the last. Returns the loss averaged over dp."""
    x, y = batch.flatten(2, 3)                 # (accum, M x micro/M, SEQ)
    total = torch.zeros((), device=ctx.device)
    for a in range(accum):
        last = a == accum - 1
        with contextlib.nullcontext() if last else model.no_sync():
            if ctx.pp_size > 1:
                loss = model.train_step(x[a], y[a], grad_scale=1 / accum)
            else:
                loss = model(x[a], y[a], return_logits=False)[1]
                (loss / accum).backward()
        total += loss.detach().float()
    if ctx.dp_size > 1:
        dist.all_reduce(total, group=ctx.dp_mesh.get_group())
    return (total / (accum * ctx.dp_size)).cpu()


@torch.no_grad()
def _params_rel(model, ref) -> float:
    """The largest norm-wise relative difference of this rank's parameters (a pipeline stage's,
    gathered whole over tp, dp, ep) from the reference's of the same name."""
    want = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        worst = max(worst, _rel(whole_value(p.detach()).cpu(), want[name].detach().cpu()))
    return worst


def _rel(got, want) -> float:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def table(world: int, results: list[tuple[Case, Outcome]], tolerance: float = 1e-5) -> str:
    """The results as a Markdown table: one row per mesh, a column per model."""
    rows: dict[str, dict] = {}
    for case, outcome in results:
        rows.setdefault(case.mesh(world), {})["MoE Llama" if case.moe else "dense GPT-2"] = outcome
    lines = ["| mesh | dense GPT-2: loss / grad norm / params | MoE Llama: loss / grad norm / params |",
             "|---|---|---|"]
    for mesh, by_model in rows.items():
        cells = [_cell(by_model.get(m), tolerance) for m in ("dense GPT-2", "MoE Llama")]
        lines.append(f"| {mesh} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _cell(outcome: Outcome | None, tolerance: float) -> str:
    if outcome is None:
        return "-"
    if outcome.refused is not None:
        return f"refused: {outcome.refused}"
    mark = "ok" if outcome.worst() <= tolerance else "FAIL"
    return f"{mark} {outcome.loss:.1e} / {outcome.grad_norm:.1e} / {outcome.params:.1e}"


def largest_difference(results: list[tuple[Case, Outcome]]) -> float:
    return max((o.worst() for _, o in results if o.refused is None), default=math.nan)
