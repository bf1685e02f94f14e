"""The trainer and the recipes, end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rank_pool import get_ctx, world
from tinymeg.train import TrainConfig, lr_at, train
from tinymeg.train.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=10, n_layer=2, n_head=4, n_embd=32, seq_len=16, eval_every=0, eval_iters=2,
            sample_tokens=0, progress=False, lr=3e-3, warmup=2)


def _train_body(tp, dp, micro, **kw):
    out = train(TrainConfig(tp=tp, dp=dp, micro_batch=micro, **TINY, **kw), ctx=get_ctx(dp=dp, tp=tp))
    return out["losses"]


def test_first_ten_losses_agree_across_meshes():
    """(1,1), (2,1), (1,2), (2,2) on the same global batch of 4 sequences per step.

    Tolerance 1e-4 relative: ten AdamW steps compound the ~1e-7 float-reassociation
    differences of TP and DP sums; a wrong batch split or gradient scale is off by >1e-2.
    """
    runs = {(tp, dp): world(tp * dp).run(_train_body, tp, dp, 4 // dp)[0]
            for tp, dp in [(1, 1), (2, 1), (1, 2), (2, 2)]}
    # and with sequence parallel + loss parallel
    runs["(2,2)+sp+lp"] = world(4).run(_train_body, 2, 2, 2, sequence_parallel=True, loss_parallel=True)[0]
    base = runs[(1, 1)]
    assert len(base) == 10 and base[-1] < base[0]
    for mesh, losses in runs.items():
        assert losses == pytest.approx(base, rel=1e-4), f"{mesh}: {losses} vs {base}"


def _replicas_body():
    """Train tp=2 with dropout: the replicated parameters (norms, row biases, wpe) must stay
    identical on both TP ranks, which needs the same dropout masks in replicated regions."""
    from torch.distributed.tensor import DTensor, Replicate
    out = train(TrainConfig(tp=2, dp=1, micro_batch=2, dropout=0.2, **{**TINY, "steps": 3}), ctx=get_ctx(tp=2))
    return {n: p.to_local().detach().clone() for n, p in out["model"].named_parameters()
            if isinstance(p, DTensor) and all(isinstance(pl, Replicate) for pl in p.placements)}


def test_replicated_parameters_stay_identical_across_tp_ranks_with_dropout():
    a, b = world(2).run(_replicas_body)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_lr_schedule_warms_up_then_decays_to_min():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=100)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.55) and lr_at(100, **kw) == pytest.approx(0.1)


def test_recipe_infers_dp_and_rejects_a_mesh_that_does_not_fit(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (parse_args([]).tp, parse_args([]).dp) == (1, 4)            # dp: world / tp
    assert (parse_args(["--tp", "2"]).dp, parse_args([], tp=2, dp=2).dp) == (2, 2)
    for argv, message in [(["--tp", "3"], "cannot infer dp: the world has 4 processes, which pp=1 x cp=1 x "
                                          "tp=3 = 3 does not divide"),
                          (["--tp", "2", "--dp", "1"], "= 2 ranks, but the world has 4 processes: launch with "
                                                       "`torchrun --nproc_per_node=2`")]:
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err    # one line, no usage block


def _torchrun(recipe, nproc, *flags, tmp_path):
    log = tmp_path / f"{recipe}.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", str(ROOT / "recipes" / recipe),
           "--steps", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
           "--micro-batch", "4", "--lr", "3e-3", "--warmup", "2", "--eval-every", "4", "--eval-iters", "2",
           "--sample-tokens", "16", "--log-jsonl", str(log), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()], done.stdout


@pytest.mark.parametrize("recipe,nproc,flags", [("hybrid.py", 4, []), ("dp.py", 2, ["--grad-accum", "2"]),
                                                 ("tp.py", 2, ["--sequence-parallel", "--loss-parallel"])])
def test_recipe_trains_end_to_end_under_torchrun(recipe, nproc, flags, tmp_path):
    records, stdout = _torchrun(recipe, nproc, *flags, tmp_path=tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))   # steps done, as the console counts
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "ms_per_step", "peak_mem_mb", "grad_norm"} <= r.keys()
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert "step 4/8: train loss" in stdout and "step 8/8: train loss" in stdout
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert "--- sample ---" in stdout
