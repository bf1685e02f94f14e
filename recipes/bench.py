"""tinymeg benchmarks. Each prints tables of times and ratios measured side by side in one run
(a ratio from one run on one machine is meaningful; an absolute time from another is not).

    python recipes/bench.py ops                 # the fused ops, the autotuner, memory, compile
    python recipes/bench.py ops --batch 8 --seq 1024 --dtype bfloat16   (on a GPU)
    torchrun --nproc_per_node=4 recipes/bench.py comm   # collectives per step vs the theory
    torchrun --nproc_per_node=2 recipes/bench.py tp     # tinymeg TP vs torch's parallelize_module
    torchrun --nproc_per_node=4 recipes/bench.py cp     # context parallel: memory and time vs seq length
    torchrun --nproc_per_node=4 recipes/bench.py moe    # MoE: all-to-all bytes, dense vs MoE, grouped vs looped
    python recipes/bench.py memory              # ZeRO 0-3 at dp=2 and dp=4: memory per rank (launches torchrun)
    torchrun --nproc_per_node=2 recipes/bench.py sample # generation with and without the KV cache
    python recipes/bench.py e2e                 # a training step vs plain PyTorch and parallelize_module
    torchrun --nproc_per_node=4 recipes/bench.py pp     # pipeline schedules: bubble, step time, memory
    python recipes/bench.py gpu                 # GPT-2 small on one GPU vs plain PyTorch: bf16, MFU (--size tiny: CPU)

Each benchmark lives in recipes/benchmarks/<name>.py.
"""
from __future__ import annotations

import argparse

from benchmarks import comm, cp, e2e, gpu, memory, moe, ops, pp, sample, tp

# Subcommands in --help's order. (A comment, not the docstring: --help prints that.)
BENCHMARKS = {"ops": ops, "comm": comm, "tp": tp, "cp": cp, "moe": moe, "memory": memory, "sample": sample,
              "e2e": e2e, "pp": pp, "gpu": gpu}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(name, help=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
