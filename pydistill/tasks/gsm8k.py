"""GSM8K from a local jsonl folder/file (the default: ../shared/data/gsm8k beside the repo) or the hub."""
from __future__ import annotations

import json
import os
import random
import re
from typing import Optional

from .answers import solution_answer
from .base import Problem, Task

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PATH = os.path.join(_REPO_ROOT, "..", "shared", "data", "gsm8k")


def _solution_text(answer: str) -> str:
    """GSM8K's worked solution with the calculator annotations <<...>> removed and the answer stated."""
    body = answer.rpartition("####")[0]
    body = re.sub(r"<<[^<>]*>>", "", body).strip()
    return f"{body}\nThe answer is {solution_answer(answer)}."


HUB_PREFIX = "hf://"


def resolve_source(path: str):
    """("local", path) or ("hub", name). Every path is a local path — a mistyped relative one fails at once
    instead of going to the network; a ``datasets`` hub name is written ``hf://owner/name``."""
    if path.startswith(HUB_PREFIX) and len(path) > len(HUB_PREFIX):
        return "hub", path[len(HUB_PREFIX):]
    if os.path.exists(path):
        return "local", path
    hint = f"; for the datasets hub write {HUB_PREFIX}{path}" if re.match(r"^[\w.-]+/[\w.-]+$", path) else ""
    raise ValueError(f"data_path {path!r} does not exist (expected a folder with train.jsonl/test.jsonl or a "
                     f"jsonl file{hint})")


class GSM8KTask(Task):
    """GSM8K. ``path``: a folder with train.jsonl/test.jsonl, or one jsonl file (used for every split), or a
    ``datasets`` hub name written ``"hf://openai/gsm8k"`` (config "main"), which needs network access."""

    name = "gsm8k"
    splits = ("train", "test")

    def __init__(self, path: Optional[str] = None):
        self.path = path or DEFAULT_PATH

    def _records(self, split: str) -> list:
        kind, source = resolve_source(self.path)
        if kind == "hub":
            from datasets import load_dataset

            return list(load_dataset(source, "main", split=split))
        file = os.path.join(source, f"{split}.jsonl") if os.path.isdir(source) else source
        if not os.path.isfile(file):
            raise ValueError(f"GSM8K file {file!r} does not exist")
        records = []
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{file} line {number}: not valid JSON ({exc})") from None
                missing = [k for k in ("question", "answer") if not isinstance(record, dict)
                           or not isinstance(record.get(k), str)]
                if missing:
                    raise ValueError(f"{file} line {number}: a GSM8K record needs text fields 'question' and "
                                     f"'answer'; missing or not text: {', '.join(missing)}")
                records.append(record)
        return records

    def problems(self, split: str, n: Optional[int] = None, seed: int = 0) -> list:
        """The split's problems; with ``n``, a seeded random subset of that size (all of them when n is None)."""
        self.check_split(split)
        records = self._records(split)
        if n is not None:
            if n < 0:
                raise ValueError(f"n must be >= 0, got {n}")
            records = random.Random(seed).sample(records, min(n, len(records)))
        return [Problem(question=r["question"], solution=_solution_text(r["answer"]),
                        answer=solution_answer(r["answer"]), meta={"source": "gsm8k"}) for r in records]
