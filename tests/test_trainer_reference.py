"""The trainer against a training loop written out plainly in this file.

The other trainer tests compare the trainer with other runs of itself (another mesh, resumed
vs straight), so a mistake shared by both sides cannot show. Here the reference is a plain
GPT2Model trained by torch's AdamW with the same two groups, the learning rate computed by
hand, the loss from full logits and F.cross_entropy over the whole global batch at once (no
accumulation, no fused loss), torch's own clip_grad_norm_, and the validation loss computed
on windows of the val split read directly. The trainer runs a few steps on several meshes,
with gradient accumulation, sequence and loss parallelism, clipping, the LR schedule and
evaluation; its logged loss, lr, grad_norm and val_loss, and its final parameters, must be
the reference's.
"""
import math

import pytest
import torch

from rank_pool import get_ctx, world
from tinymeg import compat
from tinymeg.data import global_batch, load_corpus
from tinymeg.models import GPT2Model, GPTConfig
from tinymeg.train import TrainConfig, train

STEPS, GLOBAL_BATCH, SEQ = 4, 8, 16
BASE = dict(steps=STEPS, n_layer=2, n_head=4, n_embd=32, seq_len=SEQ, lr=3e-3, min_lr=3e-4, warmup=2,
            weight_decay=0.1, grad_clip=0.5, seed=7, eval_every=2, eval_iters=2, sample_tokens=0,
            progress=False)
MESHES = {  # name: (tp, dp, micro_batch, grad_accum, sequence_parallel, loss_parallel); all 8 sequences
    "1x1 accum2": (1, 1, 4, 2, False, False),
    "tp2 accum2 sp lp": (2, 1, 4, 2, True, True),
    "dp2 accum2": (1, 2, 2, 2, False, False),
    "tp2xdp2 accum2 lp": (2, 2, 2, 2, False, True),
}
# Float reassociation only (other summation orders under TP/DP, fused vs plain loss), over 4
# AdamW steps. The bugs this file exists for are off by far more: a grad_norm 2x, a val loss
# on other data, an LR one step early.
RTOL = 1e-5


def hand_lr(step: int) -> float:
    """Linear warmup to lr over `warmup` steps (step 0 gets lr / warmup), then a cosine from lr
    down to min_lr, reached at `steps`."""
    lr, min_lr, warmup = BASE["lr"], BASE["min_lr"], BASE["warmup"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / (STEPS - warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def val_windows(val: torch.Tensor, n: int):
    """n windows of the val split, evenly spaced from offset 0 to the last full one."""
    last = len(val) - SEQ - 1
    starts = [i * last // (n - 1) for i in range(n)]
    x = torch.stack([val[s:s + SEQ] for s in starts])
    y = torch.stack([val[s + 1:s + 1 + SEQ] for s in starts])
    return x, y


@pytest.fixture(scope="module")
def reference():
    corpus = load_corpus()
    torch.manual_seed(BASE["seed"])
    model = GPT2Model(GPTConfig(block_size=SEQ, vocab_size=corpus.vocab_size, n_layer=BASE["n_layer"],
                                n_head=BASE["n_head"], n_embd=BASE["n_embd"]))
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": BASE["weight_decay"]},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=BASE["lr"], betas=(0.9, 0.95), eps=1e-8)
    records = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = hand_lr(step)
        x, y = global_batch(corpus.train, seq_len=SEQ, batch_size=GLOBAL_BATCH, seed=BASE["seed"], step=step)
        _, loss = model(x, y)                       # full logits, F.cross_entropy, the whole batch
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), BASE["grad_clip"])
        opt.step()
        record = {"step": step + 1, "loss": loss.item(), "lr": hand_lr(step), "grad_norm": norm.item()}
        if (step + 1) % BASE["eval_every"] == 0:
            model.eval()
            with torch.no_grad():
                record["val_loss"] = model(*val_windows(corpus.val, BASE["eval_iters"] * GLOBAL_BATCH))[1].item()
            model.train()
        records.append(record)
    assert norm > BASE["grad_clip"]   # clipping is active: the test covers it
    return records, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trainer_body(tp, dp, micro, accum, sp, lp):
    import torch.distributed as dist
    cfg = TrainConfig(tp=tp, dp=dp, micro_batch=micro, grad_accum=accum, sequence_parallel=sp,
                      loss_parallel=lp, **BASE)
    out = train(cfg, ctx=get_ctx(dp=dp, tp=tp))
    state = {k: compat.full_tensor(v).detach().clone()
             for k, v in out["model"].state_dict().items()}
    return {"records": out["records"], "state": state if dist.get_rank() == 0 else None}


@pytest.mark.parametrize("mesh", MESHES)
def test_trainer_equals_a_plain_training_loop(mesh, reference):
    want, want_state = reference
    tp, dp, *_ = MESHES[mesh]
    got = world(tp * dp).run(_trainer_body, *MESHES[mesh])[0]
    assert [r["step"] for r in got["records"]] == [r["step"] for r in want]
    for g, w in zip(got["records"], want):
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12), (mesh, g["step"], "lr")
        for key in ("loss", "grad_norm", "val_loss"):
            assert (key in g) == (key in w), (mesh, g["step"], key)
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=RTOL), (mesh, g["step"], key, g[key], w[key])
    assert got["state"].keys() == want_state.keys()
    for name, value in want_state.items():
        torch.testing.assert_close(got["state"][name], value, rtol=RTOL, atol=RTOL, msg=f"{mesh}: {name}")
