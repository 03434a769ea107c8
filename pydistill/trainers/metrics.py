"""Run logging: one JSONL line per logged step, TensorBoard when installed."""
from __future__ import annotations

import json
import os
import time


class MetricsLog:
    def __init__(self, output_dir: str, filename: str = "metrics.jsonl", tensorboard: bool = True):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, filename)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def log(self, step: int, values: dict):
        record = dict(step=step, time=time.time(), **{k: _plain(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.writer.add_scalar(k, v, step)
        return record

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
