"""GSM8K from a local jsonl folder/file (the default: ../shared/data/gsm8k beside the repo) or the hub."""
from __future__ import annotations

import json
import os
import random
import re
from typing import Optional

from .answers import reference_answer
from .base import Problem, Task

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PATH = os.path.join(_REPO_ROOT, "..", "shared", "data", "gsm8k")


def _solution_text(answer: str) -> str:
    """GSM8K's worked solution with the calculator annotations <<...>> removed and the answer stated."""
    body = answer.rpartition("####")[0]
    body = re.sub(r"<<[^<>]*>>", "", body).strip()
    return f"{body}\nThe answer is {reference_answer(answer)}."


class GSM8KTask(Task):
    """GSM8K. ``path``: a folder with train.jsonl/test.jsonl, or one jsonl file (used for every split), or a
    ``datasets`` hub name such as ``"openai/gsm8k"`` (config "main"), which needs network access."""

    name = "gsm8k"
    splits = ("train", "test")

    def __init__(self, path: Optional[str] = None):
        self.path = path or DEFAULT_PATH

    def _records(self, split: str) -> list:
        if os.path.isdir(self.path):
            file = os.path.join(self.path, f"{split}.jsonl")
        elif os.path.isfile(self.path):
            file = self.path
        elif "/" in self.path and not self.path.startswith((".", "/")) and not self.path.endswith(".jsonl"):
            from datasets import load_dataset

            return list(load_dataset(self.path, "main", split=split))
        else:
            raise ValueError(f"GSM8K path {self.path!r} does not exist (expected a folder with {split}.jsonl, a "
                             "jsonl file, or a datasets hub name)")
        if not os.path.isfile(file):
            raise ValueError(f"GSM8K file {file!r} does not exist")
        with open(file, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def problems(self, split: str, n: Optional[int] = None, seed: int = 0) -> list:
        """The split's problems; with ``n``, a seeded random subset of that size (all of them when n is None)."""
        self.check_split(split)
        records = self._records(split)
        if n is not None:
            if n < 0:
                raise ValueError(f"n must be >= 0, got {n}")
            records = random.Random(seed).sample(records, min(n, len(records)))
        return [Problem(question=r["question"], solution=_solution_text(r["answer"]),
                        answer=reference_answer(r["answer"]), meta={"source": "gsm8k"}) for r in records]
