"""Mixed precision: tinymeg's ops under torch.autocast do what autocast does to the aten ops they
replace, a GPT-2 under autocast trains like the same model in plain PyTorch, and every matmul of a
training step, under bf16 in either form (autocast, or bf16 parameters), runs in bf16 on shapes
the tensor cores take.

Tolerances: bf16 keeps 8 bits of mantissa (one rounding: 2^-9 relative). Two computations that
round at different places (the fused loss vs logits + F.cross_entropy, a TP all-reduce of bf16
partial sums vs one matmul) differ by a few roundings per element, amplified through a few layers:
losses agree to 1e-2 and each gradient to 5% of its norm, where a real bug (a missing cast, a
wrong shard, a float32 path taken) is off by O(1) or crashes.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tinymeg as tm
from rank_pool import get_ctx, world
from tinymeg import compat
from tinymeg.ops import cross_entropy

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("plain", "op")
FORCE = {"plain": "layer_norm=plain,bias_gelu=plain,linear_cross_entropy=plain",
         "op": "layer_norm=op,bias_gelu=op,linear_cross_entropy=op"}

pytestmark = pytest.mark.usefixtures("fresh_tuner")  # tests/conftest.py: tuning off, nothing forced


def rel_close(actual, expected, tol, what):
    actual, expected = compat.full_tensor(actual).float(), compat.full_tensor(expected).float()
    err = (actual - expected).norm() / expected.norm().clamp(min=1e-12)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


# ---------------------------------------------------------------- each op under autocast

def _op_cases(low, device):
    """(op, tinymeg's call, the aten ops it replaces) on float32 inputs, as a model makes them."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()
    x, w, b = leaf(4, 8, 64), leaf(64), leaf(64)
    h, bias = leaf(32, 256).detach().to(low).requires_grad_(), leaf(256)   # h: a Linear's autocast output
    hidden, weight = leaf(96, 64), leaf(320, 64, scale=0.1)
    targets = torch.randint(0, 257, (96,), generator=g).to(device)
    eye = torch.eye(256, dtype=low, device=device)
    yield ("layer_norm", lambda: tm.ops.layer_norm(x, w, b), lambda: F.layer_norm(x, (64,), w, b), (x, w, b))
    yield ("bias_gelu", lambda: tm.ops.bias_gelu(h, bias),   # the bias add of an addmm, then GELU
           lambda: F.gelu(torch.addmm(bias, h, eye), approximate="tanh"), (h, bias))
    yield ("linear_cross_entropy", lambda: tm.ops.linear_cross_entropy(hidden, weight, targets, 257),
           lambda: F.cross_entropy(F.linear(hidden, weight)[:, :257], targets), (hidden, weight))


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("low", list(LOW))
@pytest.mark.parametrize("path", PATHS)
def test_each_op_under_autocast_does_what_aten_does(monkeypatch, device, low, path):
    """Output dtype and value, and the float32 inputs' gradients, as the aten ops it replaces
    compute them under torch.autocast: a matmul in the autocast dtype, the loss in float32,
    layer_norm in float32 on CUDA and in its input's dtype on the CPU. Both paths; fp16 too."""
    monkeypatch.setenv("TINYMEG_OP_IMPL", FORCE[path])
    for op, ours, aten, leaves in _op_cases(LOW[low], device):
        results = []
        for fn in (ours, aten):
            with torch.autocast(device, LOW[low]):
                out = fn()
            grads = torch.autograd.grad(out.float().sum(), leaves)
            results.append((out, grads))
        (out, grads), (want, want_grads) = results
        assert out.dtype == want.dtype, f"{op}: {out.dtype}, aten gives {want.dtype}"
        rel_close(out, want, 1e-2, f"{op} output")
        for leaf, g, want_g in zip(leaves, grads, want_grads):
            assert g.dtype == leaf.dtype
            rel_close(g, want_g, 5e-2, f"{op} gradient")


def test_the_ops_themselves_cast_under_autocast():
    """torch.ops.tinymeg.* called directly under autocast cast as aten does (and do not crash:
    the loss's kernel used to meet bf16 logits with float32 hidden states)."""
    x, w = torch.randn(8, 64), torch.randn(64)
    hidden, weight, targets = torch.randn(64, 32), torch.randn(128, 32), torch.randint(0, 100, (64,))
    xs, ws, offs = torch.randn(8, 32), torch.randn(2, 32, 32), torch.tensor([3, 8], dtype=torch.int32)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.ops.tinymeg.layer_norm(x, w, w, 1e-5)[0].dtype == torch.float32   # CPU: not on autocast's list
        assert torch.ops.tinymeg.bias_gelu(x, w).dtype == torch.bfloat16
        loss, gh, gw = torch.ops.tinymeg.linear_cross_entropy(hidden, weight, targets, 100, -1, "mean", True)
        assert (loss.dtype, gh.dtype, gw.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
        assert torch.ops.tinymeg.grouped_mm(xs, ws, offs).dtype == torch.bfloat16
    with torch.no_grad():
        want = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float()[:, :100], targets)
    rel_close(loss, want, 1e-2, "loss")


# ---------------------------------------------------------------- a GPT-2 under autocast vs plain PyTorch

def _plain_gpt():
    """The bench's GPT-2 in plain PyTorch modules (recipes/benchmarks/e2e.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    try:
        from benchmarks.e2e import PlainGPT
    finally:
        sys.path.pop(0)
    return PlainGPT


CFG = dict(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=64)   # every dim a multiple of 32 but V


def _batch(cfg, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=g),
            torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=g))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpt2_under_autocast_trains_like_plain_pytorch(compiled):
    """The same weights and batch in tinymeg's GPT2Model and in plain PyTorch (nn.Linear,
    nn.LayerNorm, F.gelu, SDPA, F.cross_entropy), both under torch.autocast(bf16): loss and
    every gradient agree to bf16 tolerance; compiled with fullgraph=True too."""
    cfg = tm.models.GPTConfig(**CFG)
    torch.manual_seed(0)
    model = tm.models.GPT2Model(cfg)
    plain = _plain_gpt()(cfg)
    plain.load_state_dict(model.state_dict())
    idx, targets = _batch(cfg)
    if compiled:
        torch._dynamo.reset()
    ours = torch.compile(model, fullgraph=True) if compiled else model
    with torch.autocast("cpu", torch.bfloat16):
        loss = ours(idx, targets, return_logits=False)[1]
        want = plain(idx, targets)
    assert loss.dtype == want.dtype == torch.float32
    assert abs(loss.item() - want.item()) < 1e-2 * want.item(), (loss.item(), want.item())
    loss.backward()
    want.backward()
    plain_params = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        rel_close(p.grad, plain_params[name].grad, 5e-2, f"grad of {name}")


# ---------------------------------------------------------------- every matmul of a training step

# aten op -> positions of its matrix operands (the others: a bias, softmax statistics)
# (matmul and linear show up undecomposed inside a custom op's kernel, below autograd.)
OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2), "addbmm": (1, 2), "matmul": (0, 1),
            "linear": (0, 1),
            "mv": (0, 1), "addmv": (1, 2), "dot": (0, 1), "_grouped_mm": (0, 1),
            "_scaled_dot_product_flash_attention_for_cpu": (0, 1, 2),
            "_scaled_dot_product_flash_attention_for_cpu_backward": (0, 1, 2, 3, 4),
            "_scaled_dot_product_flash_attention": (0, 1, 2), "_scaled_dot_product_efficient_attention": (0, 1, 2),
            "_scaled_dot_product_cudnn_attention": (0, 1, 2)}
BIAS = {"addmm": 0, "baddbmm": 0, "addbmm": 0, "addmv": 0}  # linear's bias, when given: below
# With every dim of the model a multiple of 32 (width, heads, sequence, tokens; the vocabulary
# padded from 257 to 320), a matmul dim that is not one is an unpadded vocabulary (257), a slice
# of a weight (257 - 160 = 97 rows of a TP shard) or a chunk of tokens of an odd size.
ALIGN = 32


class MatmulRecorder(TorchDispatchMode):
    """Records (op, dtypes, shapes) of every matmul-class aten call, including those inside
    tinymeg's custom ops (a custom op is re-dispatched to its kernel with the mode still on)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "tinymeg":
            backend = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
            with self:
                return func.redispatch(backend, *args, **kwargs)
        name = func.overloadpacket.__name__
        if name in OPERANDS:
            operands = [args[i] for i in OPERANDS[name]] + ([args[BIAS[name]]] if name in BIAS else [])
            if name == "linear" and len(args) > 2 and args[2] is not None:
                operands.append(args[2])
            self.calls.append((name, [(t.dtype, tuple(t.shape)) for t in operands]))
        elif "mm" in name or "matmul" in name or "scaled_dot_product" in name:
            self.calls.append((name, None))  # a matmul this test does not know: fails below
        return func(*args, **kwargs)

    def violations(self, low: torch.dtype) -> list:
        bad = []
        for name, operands in self.calls:
            if operands is None:
                bad.append(f"{name}: a matmul-class op this test does not classify")
                continue
            for i, (dtype, shape) in enumerate(operands):
                if dtype != low:
                    bad.append(f"{name} operand {i} {shape} in {dtype}")
                if len(shape) >= 2 and any(d % ALIGN for d in shape[-2:]):   # (rows, cols); SDPA: (T, head_dim)
                    bad.append(f"{name} operand {i} of shape {shape}: a dim not a multiple of {ALIGN}")
        return bad


def _recorded_step(model, idx, targets, form, **kwargs):
    """One training step (forward, backward, AdamW) and an eval forward with logits, recorded."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recorder = MatmulRecorder()
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=form == "autocast")
    with recorder:
        with autocast:
            loss = model(idx, targets, return_logits=False, **kwargs)[1]
        loss.backward()
        optimizer.step()
        with autocast, torch.no_grad():
            model(idx)
    return recorder


def _check_gemms(recorder, heads):
    bad = recorder.violations(torch.bfloat16)
    assert not bad, "\n".join(bad[:20])
    widths = {d for _, operands in recorder.calls for _, shape in operands for d in shape}
    assert heads <= widths, f"the LM head's matmuls ({heads}) were not recorded: {sorted(widths)}"


@pytest.mark.parametrize("form", ["autocast", "bf16"])
@pytest.mark.parametrize("path", PATHS)
def test_every_matmul_of_a_training_step_is_bf16_on_padded_shapes(monkeypatch, form, path):
    """Unsharded, both paths of every op: under autocast or with bf16 parameters, no matmul runs
    in float32, and the head / loss matmuls run on the padded vocabulary (320 rows for 257
    tokens, padding masked), in chunks of tokens that are multiples of 64 (chunks forced small
    here: 100 x 320 logits round down to 64 rows, two chunks of the 128 tokens)."""
    monkeypatch.setenv("TINYMEG_OP_IMPL", FORCE[path])
    monkeypatch.setitem(cross_entropy.CHUNK_ELEMENTS, "cpu", 100 * 320)
    cfg = tm.models.GPTConfig(**CFG)
    torch.manual_seed(0)
    model = tm.models.GPT2Model(cfg)
    if form == "bf16":
        model = model.to(torch.bfloat16)
    _check_gemms(_recorded_step(model, *_batch(cfg), form), {320})


def _tp_gemms_body(form, sp_lp):
    ctx = get_ctx(tp=2)
    cfg = tm.models.GPTConfig(**CFG)
    torch.manual_seed(0)
    model = tm.models.GPT2Model(cfg)
    if form == "bf16":
        model = model.to(torch.bfloat16)
    plan = {**tm.GPT2_TP_CONFIG, "sequence_parallel": sp_lp, "loss_parallel": sp_lp}
    model = tm.apply_tensor_parallel(model, ctx, plan)
    recorder = _recorded_step(model, *_batch(cfg), form)
    _check_gemms(recorder, {160})   # this rank's half of the padded vocabulary
    return len(recorder.calls)


@pytest.mark.parametrize("form", ["autocast", "bf16"])
def test_every_matmul_under_tp_is_bf16_on_padded_shapes(form):
    """tp=2 with sequence and loss parallel (the vocab-sharded loss: rank 1 holds ids 160..319,
    of which 97 are tokens), and plain TP (logits gathered): the same rule on every rank."""
    for sp_lp in (True, False):
        counts = world(2).run(_tp_gemms_body, form, sp_lp)
        assert counts[0] == counts[1] > 0


# ---------------------------------------------------------------- parallel dims under autocast

def _sharded_autocast_body(dims, kwargs):
    """A parallel model under autocast(bf16) against the unsharded one under autocast: loss and
    every gradient (each dp rank: its half of the batch, the loss a mean over the whole)."""
    ctx = get_ctx(**dims)
    cfg = tm.models.GPTConfig(**CFG)
    torch.manual_seed(0)
    ref = tm.models.GPT2Model(cfg)
    torch.manual_seed(0)
    model = tm.parallelize(tm.models.GPT2Model(cfg), ctx, **kwargs)
    idx, targets = _batch(cfg, batch=2 * ctx.dp_size)
    mine = slice(2 * ctx.dp_rank, 2 * ctx.dp_rank + 2)
    with torch.autocast("cpu", torch.bfloat16):
        want = ref(idx, targets, return_logits=False)[1]
        loss = model(idx[mine], targets[mine], return_logits=False)[1]
    want.backward()
    loss.backward()
    if ctx.dp_size > 1:   # each dp rank's loss is its half's mean
        loss = compat.all_reduce(loss.detach(), "sum", ctx.mesh["dp"]) / ctx.dp_size
    assert abs(loss.item() - want.item()) < 1e-2 * want.item(), (loss.item(), want.item())
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        rel_close(p.grad, ref_params[name].grad, 5e-2, f"{dims} grad of {name}")


TP_SP_LP = {"sequence_parallel": True, "loss_parallel": True}


# (Compiled under autocast: test_gpt2_under_autocast_trains_like_plain_pytorch, one process; a
# compiled TP model under autocast costs two more compiles per rank, minutes on CI's 2 cores.)
@pytest.mark.parametrize("dims,kwargs", [({"tp": 2}, TP_SP_LP), ({"dp": 2}, {}), ({"cp": 2}, {})],
                         ids=["tp+sp+lp", "dp", "cp"])
def test_parallel_dims_under_autocast_equal_one_process(dims, kwargs):
    world(2).run(_sharded_autocast_body, dims, kwargs)
