"""Run logging: one JSONL line per logged step (TensorBoard and wandb go through accelerate's trackers: see
:mod:`pydistill.trainers.accel`)."""
from __future__ import annotations

import json
import os
import time


class MetricsLog:
    def __init__(self, output_dir: str, filename: str = "metrics.jsonl"):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, filename)

    def log(self, step: int, values: dict):
        record = dict(step=step, time=time.time(), **{k: _plain(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
