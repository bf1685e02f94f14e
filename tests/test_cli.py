"""The recipes' command line, as a newcomer meets it: --help, one-line errors printed once,
a mesh that fits the launch, and what sample.py, the tokenizer and .gitignore say."""
import argparse
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tinymeg.train import TrainConfig
from tinymeg.train.checks import check_config
from tinymeg.train.cli import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
HYBRID = dict(tp=2, steps=2000, eval_every=250, warmup=100)   # recipes/hybrid.py's defaults


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **kw}


def test_help_has_a_line_and_a_default_for_every_flag():
    p = build_parser(TrainConfig(), {})
    text = p.format_help()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings} has no help"
        shown = "(default:" in action.help or action.default is not argparse.SUPPRESS
        assert shown, action.option_strings
    assert text.count("(default:") >= len(p._actions) - 1
    assert "--no-progress" in text and "--peak-tflops" in text


def test_a_recipes_help_shows_its_own_defaults(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"], **HYBRID)
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    assert "optimizer steps to train for (default: 2000)" in out
    assert "(default: 100, or a tenth of --steps if that is fewer)" in out
    assert "This recipe's defaults differ from recipes/train.py's: --tp 2 --steps 2000" in out


def test_a_config_built_in_python_gets_the_default_warmup_too():
    """TrainConfig(steps=5) without a warmup trains (5 steps would never reach a 20-step warmup)."""
    assert check_config(TrainConfig(steps=5), 1).warmup == 1
    assert check_config(TrainConfig(steps=1000), 1).warmup == 20
    assert check_config(TrainConfig(steps=1000, warmup=7), 1).warmup == 7


def test_short_runs_get_a_short_default_warmup_and_a_long_explicit_one_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_args(["--steps", "30"], **HYBRID).warmup == 3      # 100 would never reach the peak LR
    assert parse_args([], **HYBRID).warmup == 100
    assert parse_args(["--steps", "30", "--warmup", "30"], **HYBRID).warmup == 30
    with pytest.raises(SystemExit):
        parse_args(["--steps", "30", "--warmup", "100"], **HYBRID)
    assert "--warmup 100 is longer than --steps 30" in capsys.readouterr().err


@pytest.mark.parametrize("argv,world,message", [
    (["--n-head", "3"], 1, "n_embd=128 must be divisible by n_head=3: pass an --n-head that divides --n-embd 128 "
                           "(e.g. --n-head 4)"),
    (["--tp", "2", "--n-head", "3", "--n-embd", "96"], 2, "--n-head 3 is not divisible by tp=2"),
    (["--tp", "2", "--seq-len", "63", "--sequence-parallel"], 2, "--seq-len 63 is not divisible by 2: pass --seq-len 62"),
    (["--sequence-parallel"], 2, "--sequence-parallel shards over the tensor-parallel ranks, but tp=1"),
    (["--loss-parallel"], 1, "--loss-parallel shards over the tensor-parallel ranks, but tp=1"),
    (["--device", "cuda"], 1, "--device cuda, but this torch is built without CUDA"),
    (["--micro-batch", "0"], 1, "--micro-batch must be an integer >= 1, got 0"),
    (["--min-lr", "1"], 1, "0 <= --min-lr <= --lr"),
])
def test_bad_flags_are_one_line_with_the_fix(argv, world, message, monkeypatch, capsys):
    if "cuda" in argv:
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: --device cuda is valid here")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert err.count("\n") == 1 and "usage:" not in err, err


def test_other_ranks_exit_quietly_with_the_same_status(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        parse_args(["--tp", "3"])
    assert e.value.code == 2 and capsys.readouterr().err == ""


def _no_rank_traceback(stderr: str) -> bool:
    """No frame of tinymeg's code or the recipe in stderr: the ranks printed no traceback
    (torchrun prints its own ChildFailedError traceback for any failed child; that one is fine)."""
    return "tinymeg/train/" not in stderr and 'recipes/train.py", line' not in stderr


def _torchrun_train(tmp_path, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(ROOT / "recipes" / "train.py"),
           *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)


def test_torchrun_with_a_bad_mesh_prints_one_error(tmp_path):
    done = _torchrun_train(tmp_path, "--tp", "3")
    assert done.returncode != 0
    lines = [l for l in done.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: cannot infer dp"), done.stderr[-3000:]
    assert _no_rank_traceback(done.stderr), done.stderr[-3000:]


def test_a_setup_error_under_torchrun_is_printed_once_and_every_rank_exits_1(tmp_path):
    """A fresh run into a --ckpt-dir that holds a checkpoint: every rank finds it (before any
    collective), rank 0 says so in one line, and all exit with status 1."""
    step = tmp_path / "ck" / "step_000004"
    step.mkdir(parents=True)
    (step / "tinymeg.json").write_text('{"step": 4, "files": {}}')
    done = _torchrun_train(tmp_path, "--ckpt-dir", "ck", "--steps", "2", "--n-layer", "1", "--sample-tokens", "0")
    lines = [l for l in done.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1 and "already holds checkpoints (step_000004)" in lines[0], done.stderr[-3000:]
    assert done.returncode == 1 and "exitcode  : 1" in done.stderr
    assert _no_rank_traceback(done.stderr), done.stderr[-3000:]


# ---- sample.py, the tokenizer, .gitignore, bench.py ----

def test_sample_on_a_missing_model_names_it(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "sample.py"), str(tmp_path / "x.pt")],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 1
    assert f"error: {tmp_path / 'x.pt'} does not exist" in done.stderr and "x.json" not in done.stderr


def test_sample_help_defaults_to_device_auto():
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "sample.py"), "--help"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert "(default: auto)" in " ".join(done.stdout.split())


def test_gpt2_bpe_without_network_says_how_to_get_the_files(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=offline))
    from tinymeg.data import GPT2Tokenizer
    tokenizer = GPT2Tokenizer()  # the encoding is loaded when text is first encoded or decoded
    with pytest.raises(RuntimeError, match=r"downloads on first use .* Offline: on a machine with network run "
                                           r"`TIKTOKEN_CACHE_DIR=bpe python -c"):
        tokenizer.encode("x")


def test_a_bin_trains_offline_and_only_the_sample_is_skipped(tmp_path):
    """A .bin of GPT-2 tokens trains on a machine without network, tiktoken installed: its
    tokenizer is made only when text is decoded, and the end sample, which needs the BPE files,
    is skipped with one line. Offline here: an empty tiktoken cache and a proxy that refuses."""
    pytest.importorskip("tiktoken", reason="the offline path under test is tiktoken's (pip install tiktoken)")
    import numpy as np
    np.random.default_rng(0).integers(0, 50257, 4096).astype("<u2").tofile(tmp_path / "x.bin")
    offline = _env(TIKTOKEN_CACHE_DIR=str(tmp_path / "empty"), HTTPS_PROXY="http://127.0.0.1:9",
                   HTTP_PROXY="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), "--data", "x.bin", "--steps", "2",
                           "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
                           "--micro-batch", "2", "--eval-every", "0", "--sample-tokens", "5", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=offline)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    skipped = [line for line in out.splitlines() if line.startswith("no sample:")]
    assert len(skipped) == 1 and "GPT-2 BPE needs its encoding files" in skipped[0], out[-3000:]
    assert "--- sample ---" not in out and "Traceback" not in out


def test_what_the_readme_commands_write_is_ignored_by_git():
    paths = ["ck/latest", "ck/step_000100/.metadata", "ck_tp4/latest", "model.pt", "model.json", "log.jsonl"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == paths, done.stdout + done.stderr


def test_bench_help_shows_no_internal_note():
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "bench.py"), "--help"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0 and "recipes/bench.py ops" in done.stdout
    assert "SUBCOMMANDS" not in done.stdout


def test_bench_e2e_reports_a_failing_variant_and_times_the_others(capsys):
    """A variant that fails (inductor's RecursionError compiling a baseline, seen in bench e2e's
    TP half) is dropped and reported as "failed: <root exception>"; the others are still timed."""
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from benchmarks import e2e as bench
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    from torch._dynamo.exc import BackendCompilerFailed

    def fails():
        try:
            raise RecursionError("maximum recursion depth exceeded")
        except RecursionError as e:
            raise BackendCompilerFailed(fails, e, None) from e

    calls = []
    steps = {("tinymeg", False): lambda: calls.append("te"), ("native", False): lambda: calls.append("ne"),
             ("tinymeg", True): lambda: calls.append("tc"), ("native", True): fails}
    _, failed = bench._warm(steps)
    assert list(failed) == [("native", True)] and ("native", True) not in steps
    assert calls.count("tc") == 2  # every other variant warmed as before
    ms = bench._time_wall_and_cpu(steps, 3)
    row = bench._e2e_row("w256", ms, failed, ("tinymeg", "native"))
    assert row[0] == "w256" and row[6] == "failed: RecursionError" and row[7] is None and row[8] is None
    assert all(isinstance(c, float) for c in row[1:6])
    bench._print_failures([("w256", failed)])
    assert capsys.readouterr().out.strip() == ("- w256 native compiled failed: RecursionError (in "
                                               "BackendCompilerFailed): maximum recursion depth exceeded")


def test_bench_gpu_refuses_gpt2_without_a_gpu_and_its_smoke_size_runs_on_cpu():
    """bench gpu's GPT-2 small needs CUDA: on a CPU it says so in one line; --size tiny runs the
    same code there (both forms, both models, the table, the tuner's picks, a profile), so that
    the GPU benchmark cannot rot between GPU sessions. (Compiled modes: tests/test_precision.py
    compiles the same model under autocast.)"""
    bench = str(ROOT / "recipes" / "bench.py")
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, bench, "gpu"], capture_output=True, text=True, timeout=300,
                                 env=_env())
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "error: bench gpu measures GPT-2 small on a CUDA GPU" in refused.stderr and "--size tiny" in refused.stderr
    done = subprocess.run([sys.executable, bench, "gpu", "--size", "tiny", "--device", "cpu", "--modes", "autocast-eager",
                           "bf16-eager", "--repeats", "1", "--warmup", "1", "--profile", "bf16-eager", "--kernels", "3"],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith(("autocast-", "bf16-"))}
    assert set(rows) == {"autocast-eager", "bf16-eager"}, done.stdout
    for row in rows.values():
        assert float(row[12]) < 0.02, f"the first step's losses differ: {row}"   # loss rel diff
    assert "the autotuner's picks" in done.stdout and "top kernels, bf16-eager, plain" in done.stdout
