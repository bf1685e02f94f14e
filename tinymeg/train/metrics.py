"""Where a run's per-step metrics go, on rank 0: a JSONL file (``--log-jsonl``, one JSON object
per step, appended) and TensorBoard (``--tensorboard DIR``, one scalar per metric; needs the
``tensorboard`` package: ``pip install -e ".[tensorboard]"``). ``recipes/plot.py`` draws a
JSONL log's loss curves."""
from __future__ import annotations

import json


class MetricLog:
    """``write(record)`` after each step sends it to every output that is on (none on ranks
    other than 0); ``close()`` at the end."""

    def __init__(self, jsonl: str | None, tensorboard: str | None, main: bool):
        self.jsonl = open(jsonl, "a") if jsonl and main else None
        self.tensorboard = None
        if tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(tensorboard)

    def write(self, record: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
