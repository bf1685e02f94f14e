"""The README is a tested artifact: every shell command and Python snippet in its code blocks
runs, as pasted, in order, in one fresh directory, as a newcomer would run them after
installing (README: "The README is tested" says the same rules to its readers).

- ```bash blocks run as bash scripts (stopping at the first failing command) in a fresh working
  directory shared by all blocks, which holds the clone's recipes/ and nothing else, with a
  fresh TINYMEG_CACHE_DIR and the autotuner on, as users run it. Step counts are shortened:
  every ``--steps``, ``--ckpt-every``, ``--eval-every`` and ``--warmup`` N becomes
  max(1, N // 100), and a recipe that trains (one that takes --steps) without ``--steps`` gets
  ``--steps 20``. torchrun gets a free port (PET_MASTER_PORT), so that runs do not collide.
- ```python blocks are one script each, run with python, or under ``torchrun
  --nproc_per_node=N`` when a comment in it says ``torchrun --nproc_per_node=N``.
- ```toml blocks whose first line is a comment naming a file (``# run.toml``) are written to it.
- ```text blocks are output, not run.
- A block whose first line is ``# not run: <why>`` is not run, and says why where a reader sees it.

Any other block (no language, another language) fails the structure test: every block of the
README is run or visibly not run. Each block is one test, in README order.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN, OUTPUT, FILE = ("bash", "python"), ("text",), ("toml",)
NOT_RUN = re.compile(r"#\s*not run:\s*(\S.*)")
STEP_FLAGS = re.compile(r"(--(?:steps|ckpt-every|eval-every|warmup)[ =])(\d+)")
SHORT_DEFAULT_STEPS = 20
TORCHRUN = re.compile(r"torchrun --nproc_per_node=(\d+)")
TIMEOUT_S = 1200  # per block; a loaded machine takes 3-4x an idle one's time


@dataclass
class Block:
    line: int      # of the opening fence, 1-based
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang or 'untagged'}"

    @property
    def not_run(self) -> str | None:
        """Why the block is not run (its first line says so), or None."""
        first = self.code.lstrip().split("\n", 1)[0]
        match = NOT_RUN.match(first)
        return match.group(1) if match else None


def readme_blocks(text: str) -> list[Block]:
    """Every fenced code block, indented ones (in list items) included."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, start = len(opening.group(1)), i
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())  # the fence's indent
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md:{start + 1}: a code block is never closed")
        blocks.append(Block(start + 1, opening.group(2), "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def shortened(script: str, recipes: Path) -> str:
    """The script with the README test's step counts (module docstring)."""
    script = re.sub(r"\\\n\s*", " ", script)  # one logical line per command
    script = STEP_FLAGS.sub(lambda m: f"{m.group(1)}{max(1, int(m.group(2)) // 100)}", script)
    out = []
    for line in script.split("\n"):
        recipe = re.search(r"recipes/(\w+)\.py", line)
        if recipe and "--steps" not in line and _trains(recipes / f"{recipe.group(1)}.py"):
            code, comment = re.match(r"^(.*?)(\s+#\s.*)?$", line).groups()
            line = f"{code} --steps {SHORT_DEFAULT_STEPS}{comment or ''}"
        out.append(line)
    return "\n".join(out)


def _trains(recipe: Path) -> bool:
    source = recipe.read_text() if recipe.is_file() else ""
    return '"--steps"' in source or "tinymeg.train.cli" in source


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh directory that looks like the clone to the README's commands (recipes/), and the
    environment of a user's shell: no test settings, the autotuner on, a fresh cache."""
    work = tmp_path_factory.mktemp("readme")
    (work / "recipes").symlink_to(ROOT / "recipes")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TINYMEG_", "PYTEST_", "PET_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                             "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python, torchrun: ours
    env["TINYMEG_CACHE_DIR"] = str(work / ".cache")
    env["PYTHONUNBUFFERED"] = "1"
    yield work, env
    shutil.rmtree(work, ignore_errors=True)


def test_every_block_is_run_or_visibly_not_run():
    assert BLOCKS, "no code block found in README.md"
    for block in BLOCKS:
        assert block.lang in RUN + OUTPUT + FILE, (
            f"{block.id}: tag the block ```bash or ```python (run by this test), ```text (output), or ```toml "
            f"(a file, named by its first line); a block that must not run starts with `# not run: <why>`")
        if block.lang in FILE:
            assert re.match(r"#\s*[\w.-]+\.toml\s*$", block.code.split("\n", 1)[0]), (
                f"{block.id}: a ```toml block starts with a comment naming its file, e.g. `# run.toml`")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang not in OUTPUT], ids=lambda b: b.id)
def test_readme_block(block, workdir):
    work, env = workdir
    if block.not_run:
        pytest.skip(f"marked in the README: not run: {block.not_run}")
    if block.lang == "toml":
        name = block.code.split("\n", 1)[0].lstrip("# ").strip()
        (work / name).write_text(block.code)
        return
    if block.lang == "bash":
        argv = ["bash", "-e", "-x", "-o", "pipefail", "-c", shortened(block.code, work / "recipes")]
    else:
        script = work / f"readme_{block.line}.py"
        script.write_text(block.code)
        launch = TORCHRUN.search(block.code)
        argv = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launch.group(1)}", script.name]
                if launch else [sys.executable, script.name])
    status, out, err, cpu_s = _run(argv, work, {**env, "PET_MASTER_PORT": str(_free_port())})
    if status != 0 and block.lang == "python" and TEARDOWN_ABORT in err:
        # torch's known abort at interpreter exit (README: "Clean exits"; the recipes avoid it with
        # exit_process, a bare example script does not): once more, so that only this signature,
        # and only once, is forgiven; any other failure fails at once
        status, out, err, more_s = _run(argv, work, {**env, "PET_MASTER_PORT": str(_free_port())})
        cpu_s += more_s
    print(f"{block.id}: {cpu_s:.0f} CPU seconds")  # what the block costs CI (pytest -s shows it)
    assert status == 0, (f"{block.id} failed ({'timed out' if status is None else f'status {status}'}):\n"
                         f"{block.code}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-6000:]}")


TEARDOWN_ABORT = "terminate called without an active exception"


def _run(argv: list[str], cwd: Path, env: dict) -> tuple[int | None, str, str, float]:
    """(exit status, or None after TIMEOUT_S; stdout; stderr; CPU seconds of it and its children).
    It runs in a process group of its own, killed whole at the end: a rank that torchrun did not
    reap, or a command that ran too long, leaves nothing behind."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        status = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing left of the group: the usual case
            pass
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return status, out, err, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
