"""Several machines: the README's torchrun --nnodes command, run as two "nodes" on localhost
(two torchrun launchers meeting through c10d rendezvous on 127.0.0.1), trains exactly as one
node running the same mesh does."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tinymeg.context import _free_port

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--steps", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--micro-batch", "2",
         "--eval-every", "2", "--eval-iters", "1", "--sample-tokens", "0", "--no-progress"]


def _losses(path):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, path.read_text().splitlines())]


def test_two_nodes_on_localhost_train_as_one_node(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    recipe = str(ROOT / "recipes" / "train.py")
    one = subprocess.run([*torchrun, "--standalone", "--nproc_per_node=2", recipe, *FLAGS,
                          "--log-jsonl", str(tmp_path / "one.jsonl")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    # As on two machines: each launcher starts its node's processes; rendezvous assigns ranks.
    node = [*torchrun, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=tinymeg-two-nodes", recipe, *FLAGS,
            "--log-jsonl", str(tmp_path / "two.jsonl")]
    launchers = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in launchers]
    for p, (_, err) in zip(launchers, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "dp=2 on 2 processes" in "".join(out for out, _ in outputs)
    two = _losses(tmp_path / "two.jsonl")
    assert [s for s, _, _ in two] == [1, 2, 3, 4]
    assert two == _losses(tmp_path / "one.jsonl")   # the same mesh: the same numbers, bit for bit
