"""Every dim with every other, against one process on the same global batch.

- Each pair of dims at the smallest size (4 ranks), dense GPT-2 and MoE Llama, through
  ``tinymeg.train.verify.run_case`` (what ``recipes/verify.py`` prints for a whole world): the
  largest relative difference of the losses, gradient norms and parameters after AdamW steps with
  gradient accumulation and clipping must be within 1e-5.
- Off the happy path for the compositions this file is about: pp x cp (targets ignored unevenly
  between microbatches and between the cp ranks' chunks; sequence lengths the layout cannot
  split; eval, logits and sampling), pp x MoE x EP (an expert that no token reaches on the last
  stage), pp x ZeRO-3 (eval and sampling through FSDP2's stage roots), a resume across meshes
  (pp2 x cp2 -> cp4 -> one process).
- A transformers LlamaForCausalLM (GQA) adapted by ``tm.models.from_transformers`` under pp=2,
  cp=2 x tp=2 and dp=2 ZeRO-3 (and Qwen2, Mistral under pp2 x cp2): logits, loss, every gradient
  and an AdamW step equal the unsharded transformers model's (fp32, atol=rtol=1e-5).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import tinymeg as tm
from rank_pool import get_ctx, world
from test_tensor_parallel import assert_close
from tinymeg.models.moe import moe_layers
from tinymeg.parallel.zero import whole_value
from tinymeg.train import TrainConfig, train
from tinymeg.train.verify import Case, cases, run_case

TOLERANCE = 1e-5


# ---- every pair, at the smallest size

def _pairs() -> list[Case]:
    """cases(4): every pair of dims on 4 ranks, ZeRO 0 and 3 (and 1, 2 with ep: the router's
    shards), the 1F1B schedule (tests/test_pipeline_parallel.py runs the others)."""
    return [c for c in cases(4) if c.schedule == "1f1b" and (c.zero in (0, 3) or dict(c.dims) == {"ep": 2})
            and (c.sp_lp or "tp" not in dict(c.dims))]


def _case_body(case, **kw):
    """run_case on the pool's context for the case's mesh (rank_pool builds each mesh once)."""
    return run_case(case, steps=2, ctx=get_ctx(**case.sizes(4)), **kw)


@pytest.mark.parametrize("case", _pairs(), ids=lambda c: f"{c.mesh(4)}-{'moe' if c.moe else 'dense'}")
def test_every_pair_equals_one_process(case):
    outcome = world(4).run(_case_body, case)[0]
    assert outcome.refused is None, outcome.refused
    assert outcome.worst() <= TOLERANCE, (outcome, case.mesh(4))


# ---- off the happy path

def _ignore_unevenly(y):
    """Targets ignored unevenly between pipeline microbatches and between the cp ranks' chunks
    (evenly between dp ranks and accumulation steps: without tm.token_mean each dp rank's loss is
    its own micro-batch's token mean)."""
    y = y.clone()                           # (accum, microbatches, dp, sequences, SEQ=16)
    y[:, 0, ..., :3] = -1                   # cp2: rank 0's first chunk and a token of rank 1's
    y[:, -1, ..., 12:] = -1                 # cp2: rank 0's second chunk, whole
    return y


def _ignored_body(case):
    return _case_body(case, targets=_ignore_unevenly)


@pytest.mark.parametrize("case", [Case((("pp", 2), ("cp", 2))), Case((("pp", 2), ("cp", 2)), moe=True),
                                  Case((("cp", 2), ("ep", 2)), moe=True)],
                         ids=["pp2-cp2-dense", "pp2-cp2-moe", "dp2-ep2-cp2-moe"])
def test_cp_with_targets_ignored_unevenly(case):
    """(cp x MoE without pp: the aux losses were weighted by each cp rank's share of the counted
    targets, and so was their gradient, until CP took the mean in loss_share, before they are added.)"""
    outcome = world(4).run(_ignored_body, case)[0]
    assert outcome.worst() <= TOLERANCE, outcome


def _starve(model):
    """The last MoE layer (on the last pipeline stage) routes top-1 between experts 0 and 1 only:
    router rows (w, -w, 0, 0) give logits (a, -a, 0, 0), whose top-1 is never expert 2 or 3 (the
    second ep rank's), unless a is exactly 0."""
    layer = moe_layers(model)[-1]
    layer.top_k = 1
    with torch.no_grad():
        w = layer.router.weight
        w[1], w[2:] = -w[0], 0


def test_starved_experts_get_no_token():
    torch.manual_seed(0)
    model = tm.models.Llama(tm.models.LlamaConfig.tiny(block_size=16, n_layer=4, n_experts=4, top_k=2, moe_every=2))
    _starve(model)
    model(torch.randint(0, 65, (4, 16)), torch.randint(0, 65, (4, 16)))
    counts = moe_layers(model)[-1].tokens_per_expert
    assert counts[2:].sum() == 0 and counts[:2].sum() == 4 * 16, counts


def _pp_ep_starved_body(zero):
    return _case_body(Case((("pp", 2), ("ep", 2)), moe=True, zero=zero), prepare=_starve, targets=_ignore_unevenly)


@pytest.mark.parametrize("zero", [0, 3])
def test_pp_ep_with_an_expert_no_token_reaches_on_the_last_stage(zero):
    outcome = world(4).run(_pp_ep_starved_body, zero)[0]
    assert outcome.worst() <= TOLERANCE, outcome


def _eval_and_sample_body(dims, zero, moe):
    """Eval (logits, loss), sampling and a train_step on a pipelined model against one process
    (a MoE's in one microbatch: the one process's single forward has its balancing statistics)."""
    ctx = get_ctx(**dims)
    cfg = dict(block_size=16, n_layer=4)
    make = (lambda: tm.models.Llama(tm.models.LlamaConfig.tiny(**cfg, n_experts=4, moe_every=2))) if moe else \
        (lambda: tm.models.GPT2Model(tm.models.GPTConfig.tiny(**cfg)))
    torch.manual_seed(0)
    ref = make()
    torch.manual_seed(0)
    model = tm.parallelize(make(), ctx, zero=zero, pipeline=dict(schedule="gpipe", microbatches=1 if moe else 2))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 65, (2, 2, 16), generator=g)
    y[0, :5] = -1
    ref.eval(), model.eval()
    ref_logits, ref_loss = ref(x, y)
    logits, loss = model(x, y)
    assert_close(logits, ref_logits.detach(), "logits")
    assert_close(loss, ref_loss.detach(), "loss")
    assert_close(model(x, y, return_logits=False)[1], ref_loss.detach(), "loss without logits")
    with pytest.raises(ValueError, match=r"2 x cp = 4 equal chunks, but the sequence length is 6") if dims.get("cp") \
            else contextlib.nullcontext():
        model(x[:, :6])
    prompt = x[:1, :3]
    text = model.generate(prompt, 4, top_k=1)
    assert torch.equal(text, ref.generate(prompt, 4, top_k=1)), "sampled text"
    model.train(), ref.train()
    loss = model.train_step(x, y)
    ref_loss = ref(x, y, return_logits=False)[1]
    ref_loss.backward()
    assert_close(loss, ref_loss.detach(), "train loss")
    grads = dict((n, p.grad) for n, p in ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(whole_value(p.grad), grads[name], f"grad of {name}")
    if dims.get("cp"):
        with pytest.raises(ValueError, match=r"2 x cp = 4 equal chunks, but the sequence length is 6"):
            model.train_step(x[:, :6], y[:, :6])


@pytest.mark.parametrize("dims, zero, moe", [({"pp": 2, "cp": 2}, 0, True), ({"pp": 2, "dp": 2}, 3, False)],
                         ids=["pp2-cp2-moe", "pp2-dp2-zero3"])
def test_pipeline_eval_sampling_and_errors(dims, zero, moe):
    world(4).run(_eval_and_sample_body, dims, zero, moe)


# ---- resume across meshes: pp2 x cp2 -> cp4 -> one process

RESUME = dict(model="llama", n_kv_head=2, steps=6, n_layer=2, n_head=4, n_embd=32, seq_len=16, micro_batch=4,
              eval_every=0, eval_iters=1, sample_tokens=0, progress=False, lr=3e-3, warmup=1, ckpt_every=2)


def _resume_body(dims, **kw):
    result = train(TrainConfig(**{**RESUME, **dims, **kw}), ctx=get_ctx(**dims))
    return result["losses"]


def test_resume_pp2_cp2_then_cp4_then_one_process(tmp_path):
    """A Llama trained with pp2 x cp2 (checkpoints every 2 steps), resumed from step 2 with cp4,
    resumed from that run's step 4 in one process: each logs the straight one-process run's losses."""
    d = str(tmp_path)
    straight = world(1).run(_resume_body, {}, ckpt_dir=f"{d}/one")[0]
    first = world(4).run(_resume_body, {"pp": 2, "cp": 2}, ckpt_dir=f"{d}/a")[0]
    second = world(4).run(_resume_body, {"cp": 4}, ckpt_dir=f"{d}/b", resume_from=f"{d}/a/step_000002")[0]
    third = world(1).run(_resume_body, {}, ckpt_dir=f"{d}/c", resume_from=f"{d}/b/step_000004")[0]
    assert first == pytest.approx(straight, rel=TOLERANCE), (first, straight)
    assert second == pytest.approx(straight[2:], rel=TOLERANCE), (second, straight)
    assert third == pytest.approx(straight[4:], rel=TOLERANCE), (third, straight)


# ---- a transformers model, adapted

transformers = pytest.importorskip("transformers", reason="transformers is in the [test] extra")
from test_hf_models import hf_model  # noqa: E402  (needs transformers)


def _hf_body(kind, dims, sp, zero, pipeline):
    """The adapted transformers model on ``dims`` against the unsharded transformers model: logits
    and loss (eval), the training loss, every gradient, the parameters after one AdamW step."""
    ctx = get_ctx(**dims)
    torch.manual_seed(0)
    # 4 heads, 2 key/value heads, 2 layers; Mistral's sliding window as long as the sequences
    ref = hf_model(kind, 2, **({"sliding_window": 8} if kind == "mistral" else {}))
    model = tm.parallelize(tm.models.from_transformers(copy.deepcopy(ref)), ctx, sequence_parallel=sp,
                           loss_parallel=sp, zero=zero, pipeline=pipeline)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, ref.config.vocab_size, (2, 4, 8), generator=g)
    y[1::2, :3] = -1   # as many in each dp rank's rows (without tm.token_mean a rank's loss is its rows' mean)
    rows = x.size(0) // ctx.dp_size
    mine = slice(ctx.dp_rank * rows, (ctx.dp_rank + 1) * rows)
    ref_logits = ref(input_ids=x).logits
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    with torch.no_grad():
        logits, loss = model(x[mine], y[mine])
    assert_close(logits, ref_logits[mine].detach(), "logits")
    assert_close(loss, F.cross_entropy(ref_logits[mine].flatten(0, 1), y[mine].flatten(), ignore_index=-1).detach(),
                 "loss")
    ref_loss.backward()
    if ctx.pp_size > 1:
        loss = model.train_step(x, y)
    else:
        loss = model(x[mine], y[mine], return_logits=False)[1]
        loss.backward()
    if ctx.dp_size == 1:
        assert_close(loss, ref_loss.detach(), "training loss")
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(whole_value(p.grad), ref_params[name].grad, f"grad of {name}")
    for m in (ref, model):
        torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.1).step()
    for name, p in model.named_parameters():
        assert_close(whole_value(p.detach()), ref_params[name].detach(), f"{name} after AdamW")


HF_MESHES = [("llama", {"pp": 2}, False, 0, dict(schedule="1f1b", microbatches=2)),
             ("llama", {"cp": 2, "tp": 2}, True, 0, None),
             ("llama", {"dp": 2}, False, 3, None),
             ("qwen2", {"pp": 2, "cp": 2}, False, 0, dict(schedule="gpipe", microbatches=2)),
             ("mistral", {"pp": 2, "cp": 2}, False, 0, dict(schedule="gpipe", microbatches=2))]


@pytest.mark.parametrize("kind, dims, sp, zero, pipeline", HF_MESHES,
                         ids=["llama-pp2", "llama-cp2-tp2-sp-lp", "llama-dp2-zero3", "qwen2-pp2-cp2", "mistral-pp2-cp2"])
def test_transformers_model_on_the_mesh_equals_unsharded(kind, dims, sp, zero, pipeline):
    n = 1
    for size in dims.values():
        n *= size
    world(n).run(_hf_body, kind, dims, sp, zero, pipeline)


def test_adapter_keeps_names_and_refuses_what_it_cannot_compute():
    torch.manual_seed(0)
    ref = hf_model("mistral", 1)                  # sliding window of 4 positions
    model = tm.models.from_transformers(copy.deepcopy(ref))
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randint(0, ref.config.vocab_size, (1, 4))
    assert_close(model(x)[0], ref(input_ids=x).logits.detach(), "logits within the window")
    assert model.config.block_size == 4, "within the window, causal attention is the sliding window's"
    with pytest.raises(ValueError, match=r"sequence length 6 exceeds block_size 4"):
        model(torch.randint(0, ref.config.vocab_size, (1, 6)))
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel has no model.embed_tokens, model.layers"):
        tm.models.from_transformers(hf_model("gpt2", 1))
    with pytest.raises(TypeError, match=r"adapt a transformers Llama, Qwen2 or Mistral with "
                                        r"tm.models.from_transformers\(model\)"):
        tm.apply_pipeline_parallel(copy.deepcopy(ref), None)
