"""Draw a run's loss curves from its JSONL log: `python recipes/plot.py run.jsonl -o loss.png` (no torchrun).

The train loss of every step and the validation loss where it was measured, against the step.
A step logged twice (a run resumed after a crash redoes the steps after its checkpoint) is
drawn once, from its later line, which is the one that counts. Needs matplotlib
(`pip install -e ".[plot]"`).
"""
import argparse
import json
import sys


def read_log(path: str) -> dict[int, dict]:
    """step -> its record; a step logged twice keeps the later line."""
    records = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    records[int(record["step"])] = record
                except (ValueError, KeyError, TypeError):
                    raise SystemExit(f"error: {path} line {number} is not a JSON record with a \"step\": "
                                     f"pass a --log-jsonl file of a training run") from None
    return dict(sorted(records.items()))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description="Plot the train and validation loss of a --log-jsonl file.")
    p.add_argument("log", help="the JSONL file a training run wrote (--log-jsonl)")
    p.add_argument("-o", "--out", default="loss.png", help="the image to write (.png, .svg, .pdf)")
    p.add_argument("--title", default=None, help="the plot's title (default: the log's file name)")
    args = p.parse_args(argv)
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SystemExit('error: recipes/plot.py needs matplotlib, which is not installed: '
                         'pip install -e ".[plot]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    try:
        records = read_log(args.log)
    except OSError as e:
        raise SystemExit(f"error: cannot read {args.log}: {e.strerror or e}") from None
    if not records:
        raise SystemExit(f"error: {args.log} holds no step: pass a --log-jsonl file of a training run")
    val = {s: r["val_loss"] for s, r in records.items() if "val_loss" in r}
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(list(records), [r["loss"] for r in records.values()], lw=1, label="train loss")
    if val:
        ax.plot(list(val), list(val.values()), "o-", lw=1.5, ms=4, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(args.title or args.log)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}: {len(records)} steps" + (f", val loss {list(val.values())[-1]:.4f} at step "
                                                       f"{list(val)[-1]}" if val else ""))
    sys.stdout.flush()
    return args.out


if __name__ == "__main__":
    main()
