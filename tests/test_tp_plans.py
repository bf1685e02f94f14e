"""Plans for models tinymeg has never seen: any module class replicated (with and without
sequence parallelism, compiled, checkpointed), subclasses of nn.Linear/nn.Embedding, and
plans that pair column and row layers wrongly, refused when they are applied."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import tinymeg as tm
from rank_pool import get_ctx, world
from test_tensor_parallel import assert_close, compare_training_step, full


class ScaledEmbedding(nn.Embedding):
    """Gemma-style: an nn.Embedding subclass with its own forward (replicated, not planned)."""

    def __init__(self, n, d):
        super().__init__(n, d)
        self.register_buffer("scale", torch.tensor(d ** 0.5))

    def forward(self, ids):
        return super().forward(ids) * self.scale


class OffsetRMSNorm(nn.Module):
    """A norm class tinymeg does not know, with two learned vectors."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.offset = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) + self.offset


class Gate(nn.Module):
    """A learned scalar on the residual branch."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return x * torch.tanh(self.alpha)


class TaggedLinear(nn.Linear):
    """An nn.Linear subclass that keeps nn.Linear's forward: planned like nn.Linear."""
    tag = "mine"


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.head_dim = dim // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.q_norm = OffsetRMSNorm(self.head_dim)   # per head, between the column and row layers
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        B, T, _ = q.shape
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        q = self.q_norm(q)
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up = TaggedLinear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.attn = OffsetRMSNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp, self.gate = OffsetRMSNorm(dim), MLP(dim, hidden), Gate()

    def forward(self, x):
        x = x + self.gate(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, vocab=32, dim=16, heads=4, hidden=32, layers=2):
        super().__init__()
        self.embed = ScaledEmbedding(vocab, dim)
        self.embed_norm = OffsetRMSNorm(dim)   # before the SP span: whole tokens, whole gradients
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = OffsetRMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, targets=None, return_logits=True):
        x = self.embed_norm(self.embed(ids))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


PLAN = {"attn.q_proj": tm.ColumnParallel(), "attn.k_proj": tm.ColumnParallel(), "attn.v_proj": tm.ColumnParallel(),
        "attn.o_proj": tm.RowParallel(), "mlp.up": tm.ColumnParallel(), "mlp.down": tm.RowParallel()}


def _plan(sp, sharded_head):
    plan = {**PLAN, "sequence_parallel": sp}
    if sharded_head:
        plan["head"] = tm.ColumnParallel(gather_output=True)
    return plan


def _any_module_body(tp, sp, sharded_head, seed):
    from tinymeg.nn.layers import Replicated
    ctx = get_ctx(tp=tp)
    torch.manual_seed(seed)
    ref = Model(heads=tp, hidden=8 * tp)
    sharded = tm.apply_tensor_parallel(copy.deepcopy(ref), ctx, _plan(sp, sharded_head))
    for name in ("embed", "embed_norm", "blocks.0.norm1", "blocks.0.gate", "blocks.0.attn.q_norm", "norm"):
        module = sharded.get_submodule(name)
        assert isinstance(module, Replicated) and isinstance(module, type(ref.get_submodule(name))), name
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 32, (2, 2 * tp), generator=g), torch.randint(0, 32, (2, 2 * tp), generator=g)
    compare_training_step(ref, sharded, idx, targets)


@given(tp=st.sampled_from([2, 4]), sp=st.booleans(), sharded_head=st.booleans(), seed=st.integers(0, 2**16))
def test_any_module_class_is_replicated_and_exact(tp, sp, sharded_head, seed):
    """Unknown norms (also per head, between q_proj and o_proj), a gate, an Embedding subclass
    with its own forward: every gradient is the full model's, on sequence shards too."""
    world(tp).run(_any_module_body, tp, sp, sharded_head, seed)


def _compile_any_module_body():
    from test_compile import check_compiled_matches_eager
    ctx = get_ctx(tp=2)
    torch.manual_seed(0)
    model = tm.apply_tensor_parallel(Model(heads=2, layers=1), ctx, _plan(True, True))
    g = torch.Generator().manual_seed(0)
    check_compiled_matches_eager(model, torch.randint(0, 32, (2, 8), generator=g),
                                 torch.randint(0, 32, (2, 8), generator=g))


def test_replicated_modules_compile_with_fullgraph():
    world(2).run(_compile_any_module_body)


def _dcp_body(path):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    ctx = get_ctx(tp=2)
    torch.manual_seed(0)
    ref = Model(heads=2)
    sharded = tm.apply_tensor_parallel(copy.deepcopy(ref), ctx, _plan(True, True))
    dcp.save(sharded.state_dict(), checkpoint_id=path)
    torch.manual_seed(1)
    other = tm.apply_tensor_parallel(Model(heads=2), ctx, _plan(True, True))
    state = other.state_dict()
    dcp.load(state, checkpoint_id=path)
    other.load_state_dict(state)
    for name, p in other.named_parameters():
        assert torch.equal(full(p), ref.get_parameter(name)), name
    if dist.get_rank() == 0:  # the checkpoint also loads into the unsharded model
        dcp_to_torch_save(path, path + ".pt")
        plain = torch.load(path + ".pt")
        assert plain.keys() == ref.state_dict().keys()
        assert all(torch.equal(plain[k], v) for k, v in ref.state_dict().items())


def test_replicated_modules_in_dcp_checkpoints(tmp_path):
    world(2).run(_dcp_body, str(tmp_path / "ck"))


# ---- which classes can be planned

class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _subclass_errors_body():
    ctx = get_ctx(tp=2)
    model = Model()
    model.blocks[0].mlp.up = DoubledLinear(16, 32)
    with pytest.raises(TypeError, match=r"'blocks.0.mlp.up' is a DoubledLinear \(a subclass of Linear with its "
                                        r"own forward, which tinymeg's parallel layer would replace\)"):
        tm.apply_tensor_parallel(model, ctx, PLAN)
    with pytest.raises(TypeError, match=r"'embed' is a ScaledEmbedding \(a subclass of Embedding with its own "
                                        r"forward.*VocabParallel shards nn.Embedding"):
        tm.apply_tensor_parallel(Model(), ctx, {**PLAN, "embed": tm.VocabParallel()})
    with pytest.raises(TypeError, match=r"'blocks.0.norm1' is a OffsetRMSNorm; RowParallel shards nn.Linear"):
        tm.apply_tensor_parallel(Model(), ctx, {**PLAN, "norm1": tm.RowParallel()})
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.up' has 15 output features in 3 chunk\(s\), not divisible by tp=2"):
        model = Model(layers=1)
        model.blocks[0].mlp.up = nn.Linear(16, 15)  # q|k|v of 5 features each
        tm.apply_tensor_parallel(model, ctx, {**PLAN, "mlp.up": tm.ColumnParallel(output_chunks=3)})


def test_module_classes_that_cannot_be_planned_as_asked():
    world(2).run(_subclass_errors_body)


# ---- tied weights under the default rule and under a plan (issue 23)

def _tied_body():
    """A tied embedding the default rule cannot vocab-shard (a subclass with its own forward) is
    left replicated with its head, not refused, and the model is exact; a plan that shards the
    tied head but not the embedding is refused (it untied them: 17 parameters instead of 16)."""
    ctx = get_ctx(tp=2)
    torch.manual_seed(0)
    ref = Model(heads=2, hidden=16)
    ref.head.weight = ref.embed.weight
    sharded = tm.apply_tensor_parallel(copy.deepcopy(ref), ctx, PLAN)
    assert sharded.head.weight is sharded.embed.weight
    idx = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(0))
    (ref_logits, ref_loss), (logits, loss) = ref(idx, idx), sharded(idx, idx)
    assert_close(logits, ref_logits, "logits")
    ref_loss.backward()
    loss.backward()   # (no AdamW step: k_proj.bias's gradient is 0 up to float noise, which AdamW amplifies)
    ref_params = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        assert_close(p.grad, ref_params[name].grad, f"grad of {name}")
    gpt = tm.models.GPT2Model(tm.models.GPTConfig.tiny())
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with \['transformer.wte'\] \(tied\), which the "
                                         r"plan does not shard as VocabParallel.*Plan 'transformer.wte' as VocabParallel"):
        tm.apply_tensor_parallel(gpt, ctx, {**tm.GPT2_TP_CONFIG, "lm_head": tm.ColumnParallel(gather_output=True),
                                            "vocab_embedding_patterns": []})
    # a vocab-parallel embedding takes only nn.Linear heads along (a head with its own forward lost
    # it): asked for, refused; by default, both replicated and exact
    torch.manual_seed(0)
    doubled = tm.models.GPT2Model(tm.models.GPTConfig.tiny())
    doubled.lm_head.__class__ = DoubledLinear
    with pytest.raises(ValueError, match=r"'transformer.wte' shares its weight with \['lm_head'\] \(tied\), which "
                                         r"VocabParallel cannot shard along"):
        tm.apply_tensor_parallel(copy.deepcopy(doubled), ctx, {**tm.GPT2_TP_CONFIG, "vocab_embedding_patterns": ["wte"]})
    sharded = tm.apply_tensor_parallel(copy.deepcopy(doubled), ctx, tm.GPT2_TP_CONFIG)
    with torch.no_grad():
        assert_close(sharded(idx)[0], doubled(idx)[0], "logits of a tied head with its own forward")


def test_tied_weights_stay_tied_or_the_plan_is_refused():
    world(2).run(_tied_body)


# ---- pairing: a row layer's input comes from column layers, in the same parent module

class MoEExpert(nn.Module):
    """Mixtral's expert registers w1 (gate), w2 (down), w3 (up): a row between two columns."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Linear(dim, hidden)

    def forward(self, x, targets=None):
        y = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return y, (y - targets).pow(2).mean()


class ShortCircuit(nn.Module):
    """Registers a column and a row layer, but feeds the row its own input."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.down(x)


def _pairing_body():
    ctx = get_ctx(tp=2)
    gpt = lambda: tm.models.GPT2Model(tm.models.GPTConfig.tiny())  # noqa: E731
    bad = {
        "row without column": ({"row_linear_patterns": ["attn.c_proj", "mlp.c_proj"]},
                               r"'transformer.h.0.attn.c_proj' is RowParallel, but nothing in 'transformer.h.0.attn' "
                               r"is ColumnParallel.*modules there: \['transformer.h.0.attn.c_attn'\]"),
        "column without row": ({"column_linear_patterns": ["attn.c_attn", "mlp.c_fc"], "row_linear_patterns": ["attn.c_proj"]},
                               r"'transformer.h.0.mlp.c_fc' is ColumnParallel, which leaves its output sharded over tp, "
                               r"but nothing in 'transformer.h.0.mlp' is RowParallel.*\['transformer.h.0.mlp.c_proj'\]"),
        "swapped": ({"column_linear_patterns": ["attn.c_proj", "mlp.c_proj"], "row_linear_patterns": ["attn.c_attn", "mlp.c_fc"]},
                    r"'transformer.h.0.attn.c_attn' is RowParallel but comes before every ColumnParallel layer of "
                    r"'transformer.h.0.attn' \('transformer.h.0.attn.c_proj'\): the column and row patterns look swapped"),
    }
    for what, (plan, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            tm.apply_tensor_parallel(gpt(), ctx, plan)
    # valid plans the rule must accept: q/k/v + o (GQA in test_foreign_model), w1, w2, w3
    torch.manual_seed(0)
    ref = MoEExpert(8, 16)
    sharded = tm.apply_tensor_parallel(copy.deepcopy(ref), ctx, {"w1": tm.ColumnParallel(), "w2": tm.RowParallel(),
                                                                "w3": tm.ColumnParallel()})
    compare_training_step(ref, sharded, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    # what no static rule sees is caught at the first forward, with the module's name
    model = tm.apply_tensor_parallel(ShortCircuit(), ctx, {"up": tm.ColumnParallel(), "down": tm.RowParallel()})
    with pytest.raises(RuntimeError, match=r"row-parallel layer 'down' expects this rank's 4 of its 8 input features"):
        model(torch.randn(2, 8))


def test_wrongly_paired_plans_are_refused_when_applied():
    world(2).run(_pairing_body)
