"""The recipes' command line, as a newcomer meets it: --help, one-line errors printed once,
a mesh that fits the launch, and what sample.py, the tokenizer and .gitignore say."""
import argparse
import json
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
    (["--device", "cuda"], 1, "--device cuda, but this torch is built without CUDA" if torch.version.cuda is None
     else "--device cuda, but torch sees no CUDA device"),   # a CUDA build on a machine without a GPU
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
    paths = ["ck/latest", "ck/step_000100/.metadata", "ck_tp4/latest", "model.pt", "model.json", "log.jsonl",
             "loss.png", "gpt2_hf/config.json", "gpt2_hf_again/model.safetensors", "tb/events.out"]
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


# ---- the newcomer's mistakes, each answered by one line (issue 24) ----

def _one_error_line(argv, capsys, **defaults) -> str:
    with pytest.raises(SystemExit) as e:
        parse_args(argv, **defaults)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "usage:" not in err, err
    return err


def test_a_recipe_run_without_torchrun_says_to_launch_it_with_torchrun(monkeypatch, capsys):
    """`python recipes/hybrid.py`: the world is one process and the mesh needs more."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["recipes/hybrid.py"])
    err = _one_error_line([], capsys, **HYBRID)
    assert err.startswith("hybrid.py: error: launch with torchrun: the mesh tp=2 needs 2 processes (or a multiple "
                          "of it: dp takes the processes the others leave) and this is one, e.g. `torchrun "
                          "--nproc_per_node=2 recipes/hybrid.py`"), err


def test_a_misspelt_flag_names_the_flag_it_is_closest_to(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)
    err = _one_error_line(["--setps", "5", "--n-embed=64"], capsys)
    assert ("error: --setps is not a flag: did you mean '--steps'?; --n-embed is not a flag: did you mean "
            "'--n-embd'?") in err, err


def _toml(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_config_file_sets_flags_and_the_command_line_overrides_it(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    config = _toml(tmp_path, 'n_layer = 6\nn-embd = 192\nsteps = 3000\nlr = 3e-4\ncompile = true\n'
                             'sequence_parallel = false\ntp = 2\ndata = "shakespeare.txt"\n')
    cfg = parse_args(["--config", config, "--steps", "500"], **HYBRID)
    assert (cfg.n_layer, cfg.n_embd, cfg.lr, cfg.compile, cfg.tp, cfg.dp, cfg.data) == (
        6, 192, 3e-4, True, 2, 2, "shakespeare.txt")
    assert cfg.steps == 500                           # the flag wins over the file
    assert parse_args(["--config", config, "--no-compile"], **HYBRID).compile is False


@pytest.mark.parametrize("text,message", [
    ("n_emb = 64\n", "unknown key 'n_emb': did you mean 'n_embd'? (keys are the flags without --"),
    ("zero = 5\n", "argument --zero: invalid choice: 5"),
    ("compile = 1\n", "compile = 1: true or false"),
    ("steps = true\n", "steps = True: a value for --steps, not a boolean"),
    ("n_layer = [1, 2]\n", "n_layer = [1, 2]: each key takes one value"),
    ("steps = \n", "cannot be read as TOML"),
])
def test_a_bad_config_file_is_one_line_naming_the_key(text, message, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)
    assert message in _one_error_line(["--config", _toml(tmp_path, text)], capsys)


def test_a_missing_config_file_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert f"--config {tmp_path}/nope.toml: no such file" in _one_error_line(["--config", str(tmp_path / "nope.toml")],
                                                                             capsys)


def _fake_checkpoint(ckpt_dir, step, model="gpt2", **model_config):
    """A checkpoint directory as far as the command line reads it: tinymeg.json (no tensors)."""
    path = ckpt_dir / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "tinymeg.json").write_text(json.dumps({"step": step, "files": {}, "model": model, "model_config": {
        "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, "n_experts": 0, **model_config}}))
    (ckpt_dir / "latest").write_text(path.name + "\n")


def test_resuming_takes_the_model_shape_from_the_checkpoint(monkeypatch, tmp_path):
    """nanoGPT's init_from='resume': --resume, --auto-resume and --resume-from build the
    checkpoint's model, unless a shape flag is given (then the checkpoint check says it differs)."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    _fake_checkpoint(tmp_path / "ck", 300, n_layer=6, n_head=6, n_embd=192, block_size=128)
    shape = lambda c: (c.n_layer, c.n_head, c.n_embd, c.seq_len)  # noqa: E731
    ck = str(tmp_path / "ck")
    assert shape(parse_args(["--ckpt-dir", ck, "--resume"])) == (6, 6, 192, 128)
    assert shape(parse_args(["--ckpt-dir", ck, "--auto-resume"])) == (6, 6, 192, 128)
    assert shape(parse_args(["--resume-from", ck, "--ckpt-dir", str(tmp_path / "new")])) == (6, 6, 192, 128)
    assert shape(parse_args(["--ckpt-dir", ck, "--resume", "--n-embd", "96"])) == (6, 6, 96, 128)  # given: kept
    assert shape(parse_args(["--ckpt-dir", str(tmp_path / "empty"), "--auto-resume"])) == (4, 4, 128, 64)  # fresh
    assert shape(parse_args(["--ckpt-dir", ck])) == (4, 4, 128, 64)  # not resuming (refused later: ck is not empty)
    _fake_checkpoint(tmp_path / "ck_llama", 20, model="llama", n_kv_head=2, ffn_hidden=384, tie_embeddings=True)
    cfg = parse_args(["--ckpt-dir", str(tmp_path / "ck_llama"), "--resume"])
    assert (cfg.model, cfg.n_kv_head, cfg.ffn_hidden, cfg.tie_embeddings) == ("llama", 2, 384, True)


# ---- metrics: TensorBoard and recipes/plot.py ----

def test_tensorboard_without_the_package_is_one_line_with_the_fix(monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ('--tensorboard tb needs the tensorboard package, which is not installed: pip install -e ".[tensorboard]"'
            in _one_error_line(["--tensorboard", "tb"], capsys))


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tinymeg.train.metrics import MetricLog
    log = MetricLog(str(tmp_path / "run.jsonl"), str(tmp_path / "tb"), main=True)
    log.write({"step": 1, "loss": 4.0, "lr": 1e-3})
    log.write({"step": 2, "loss": 3.5, "lr": 1e-3, "val_loss": 3.6})
    log.close()
    assert [json.loads(line)["loss"] for line in (tmp_path / "run.jsonl").read_text().splitlines()] == [4.0, 3.5]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 4.0), (2, 3.5)]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(2, pytest.approx(3.6))]
    quiet = MetricLog(str(tmp_path / "other.jsonl"), str(tmp_path / "tb2"), main=False)  # ranks other than 0
    quiet.write({"step": 1, "loss": 1.0})
    quiet.close()
    assert not (tmp_path / "other.jsonl").exists() and not (tmp_path / "tb2").exists()


def _plot():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import plot
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    return plot


def test_plot_draws_a_runs_loss_curves_once_per_step(tmp_path, capsys):
    """A run resumed after a crash logs the steps it redid twice: the later line counts."""
    lines = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0, "val_loss": 3.1}, {"step": 3, "loss": 9.9},
             {"step": 3, "loss": 2.5}, {"step": 4, "loss": 2.0, "val_loss": 2.2}]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    plot = _plot()
    assert {s: r["loss"] for s, r in plot.read_log(str(tmp_path / "run.jsonl")).items()} == {1: 4.0, 2: 3.0, 3: 2.5,
                                                                                           4: 2.0}
    out = plot.main([str(tmp_path / "run.jsonl"), "-o", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {out}: 4 steps, val loss 2.2000 at step 4\n"
    (tmp_path / "bad.jsonl").write_text('{"loss": 1}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl line 1 is not a JSON record with a \"step\""):
        plot.main([str(tmp_path / "bad.jsonl")])


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib raises ModuleNotFoundError
    with pytest.raises(SystemExit, match=r'needs matplotlib, which is not installed: pip install -e "\.\[plot\]"'):
        _plot().main([str(tmp_path / "run.jsonl")])
