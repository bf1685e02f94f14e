"""Check that every composition of parallel dims trains as one process does, on this machine:
`torchrun --nproc_per_node=8 recipes/verify.py` (any world size; 1 checks nothing but itself).

For each mesh that fits the world (every dim alone, every pair, the larger sets that fit: dp takes
the ranks the others leave) and for a dense GPT-2 and a MoE Llama, it trains a few steps with
gradient accumulation, clipping and AdamW, and compares with the same model trained in one
process on the same global batch (tinymeg/train/verify.py). It prints one row per mesh: the
largest relative difference of the loss, of the gradient norm and of the parameters, and `ok`
when all are within --tolerance, or the message of a composition tinymeg refuses. Run it on a new
cluster before trusting it, as one runs nccl-tests. The exit status is 1 if any cell failed.
"""
import argparse
import sys
import time

from tinymeg.train.checks import rank_from_env, world_size_from_env
from tinymeg.train.cli import exit_process
from tinymeg.train.verify import cases, run_case, table, largest_difference


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per composition")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative difference that passes")
    p.add_argument("--only", default=None, metavar="TEXT", help="run only the meshes whose name contains TEXT, e.g. pp2")
    args = p.parse_args(argv)
    start = time.perf_counter()
    world, main_rank = world_size_from_env(), rank_from_env() == 0
    results = []
    for case in cases(world):
        if args.only and args.only not in case.mesh(world):
            continue
        outcome = run_case(case, steps=args.steps)
        results.append((case, outcome))
        if main_rank:
            status = "refused" if outcome.refused else f"{outcome.worst():.1e}"
            print(f"{case.mesh(world):<32} {'MoE Llama' if case.moe else 'dense GPT-2':<12} {status}", flush=True)
    failed = any(o.refused is None and o.worst() > args.tolerance for _, o in results)
    if main_rank:
        print(f"\n{table(world, results, args.tolerance)}\n")
        print(f"{len(results)} runs on {world} ranks in {time.perf_counter() - start:.0f} s; largest difference "
              f"{largest_difference(results):.1e}; {'FAILED' if failed else 'all within'} {args.tolerance:g}")
    sys.stdout.flush()
    exit_process(1 if failed else 0, barrier=True)


if __name__ == "__main__":
    main()
