"""A task over your own data: any `datasets` dataset, or a jsonl / json / csv / parquet file or folder.

Each row becomes a :class:`Problem`: the prompt column is the question, the solution column the worked
solution a teacher context reads (OPSD, SFT), the answer column the final answer the verifier compares with
(by final number, like the built-in tasks). Every column of the row is kept in ``Problem.meta["columns"]``
so that TRL-style reward functions receive them as keyword arguments (see :mod:`pydistill.rewards`).

Sources (``source``):

- a ``datasets.Dataset`` (its one split is ``"train"``) or ``datasets.DatasetDict`` object;
- a path that exists (relative paths are paths, resolved from the working directory): a ``.jsonl`` /
  ``.json`` / ``.csv`` / ``.parquet`` file (one split, ``"train"``), a folder written by
  ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a folder of data files whose names give the
  splits (``train.jsonl``, ``test.jsonl``, ...: the `datasets` folder convention);
- otherwise a `datasets` hub name such as ``"openai/gsm8k"`` (needs network access; ``config_name`` picks
  its configuration).
"""
from __future__ import annotations

import os
import random
from typing import Optional

from .answers import normalize_number, solution_answer
from .base import Problem, Task

# What each column is for, in the message that names a missing one.
_ROLES = dict(prompt_column="the question", solution_column="a worked solution; None if the data has none",
              answer_column="the final answer")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _load(source, config_name: Optional[str]):
    """A ``datasets.DatasetDict`` from any supported source."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return source
    if isinstance(source, datasets.Dataset):
        return datasets.DatasetDict(train=source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"dataset must be a path, a hub name or a datasets Dataset/DatasetDict, got "
                         f"{type(source).__name__}")
    path = os.fspath(source)
    if os.path.isfile(path):
        builder = _FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise ValueError(f"dataset file {path!r} must end in one of {sorted(_FILE_BUILDERS)}")
        _check_has_rows(path)
        return _load_local(path, f"dataset file {path!r} cannot be read as {builder}",
                           lambda: datasets.load_dataset(builder, data_files={"train": path}))
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(path)  # written by save_to_disk
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))
                 if os.path.splitext(f)[1].lower() in _FILE_BUILDERS]
        if not files:
            raise ValueError(f"dataset folder {path!r} holds no data files (expected files named by split, e.g. "
                             f"train.jsonl and test.jsonl, of types {sorted(_FILE_BUILDERS)}, or a save_to_disk folder)")
        for file in files:
            _check_has_rows(file)
        return _load_local(path, f"dataset folder {path!r} cannot be read",
                           lambda: datasets.load_dataset(path, config_name))
    if not looks_like_hub_name(path):
        raise ValueError(f"dataset {path!r} does not exist (expected a data file, a dataset folder, or a "
                         "datasets hub name such as 'openai/gsm8k')")
    return datasets.load_dataset(path, config_name)


def _check_has_rows(file: str):
    """An empty data file makes `datasets` raise a bare StopIteration (json) or a parser error (csv)."""
    with open(file, "rb") as f:
        empty = not f.read(4096).strip()
    if empty:
        raise ValueError(f"dataset file {file!r} holds no rows (expected a header or records with the prompt and "
                         "answer columns)")


def _load_local(path: str, what: str, load):
    """``load()``, its errors (DatasetGenerationError, ArrowInvalid, ...: none names the file) as one line."""
    try:
        return load()
    except Exception as exc:
        cause = exc.__cause__ or exc
        detail = " ".join(str(cause).split()) or type(cause).__name__
        raise ValueError(f"{what}: {detail:.200}") from None


def looks_like_hub_name(path: str) -> bool:
    """'owner/name' or 'name' with no file extension and no leading './', '../', '/' or '~'."""
    return (not path.startswith((".", "/", "~")) and path.count("/") <= 1
            and os.path.splitext(path)[1].lower() not in _FILE_BUILDERS and bool(path.strip("/")))


def _prompt_text(value, column: str) -> str:
    """A plain prompt string, or the last user message of a conversational prompt (TRL's two formats)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m["content"] for m in value if m.get("role", "user") == "user"]
        if users:
            return users[-1]
    raise ValueError(f"prompt_column {column!r} must hold strings or lists of chat messages with a user turn, got "
                     f"{value!r:.80}")


def _answer_text(value) -> str:
    """The canonical final answer: GSM8K-style '... #### 42' gives '42'; a number is normalized ('1,000')."""
    text = str(value).strip()
    if "####" in text:
        return solution_answer(text)
    return normalize_number(text) or text


class DatasetTask(Task):
    """A task whose problems are the rows of a dataset; see the module docstring for the sources.

    ``solution_column=None`` (or a row whose solution is empty) gives the solution "The answer is <answer>.",
    so that a teacher context still holds the privileged answer.
    """

    name = "dataset"

    def __init__(self, source, prompt_column: str = "prompt", solution_column: Optional[str] = "solution",
                 answer_column: str = "answer", config_name: Optional[str] = None):
        self.source = source
        self.columns = dict(prompt_column=prompt_column, solution_column=solution_column, answer_column=answer_column)
        self.data = _load(source, config_name)
        self.splits = tuple(self.data)
        for split, table in self.data.items():
            missing = [f"{field} {column!r}" for field, column in self.columns.items()
                       if column is not None and column not in table.column_names]
            if missing:  # one line that names every missing column, what each is for and what there is
                expected = ", ".join(f"{field} {column!r} ({_ROLES[field]})" for field, column in self.columns.items()
                                     if column is not None)
                verb = "is not a column" if len(missing) == 1 else "are not columns"
                named = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
                raise ValueError(f"{named} {verb} of split {split!r} of dataset {_describe(source)}: "
                                 f"expected {expected}; its columns: {', '.join(table.column_names)} (name them "
                                 "with --prompt-column / --answer-column / --solution-column or the config fields)")

    def check_split(self, split: str):
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not a split of dataset {_describe(self.source)} (splits: "
                             f"{', '.join(self.splits)}): set train_split / eval_split to one of them")

    def problems(self, split: str, n: Optional[int] = None, seed: int = 0) -> list:
        """The split's problems in dataset order; with ``n``, a seeded random subset of that size."""
        self.check_split(split)
        table = self.data[split]
        indices = list(range(len(table)))
        if n is not None:
            if n < 0:
                raise ValueError(f"n must be >= 0, got {n}")
            indices = random.Random(seed).sample(indices, min(n, len(indices)))
        prompt, solution, answer = (self.columns[k] for k in ("prompt_column", "solution_column", "answer_column"))
        out = []
        for i in indices:
            row = table[i]
            final = _answer_text(row[answer])
            worked = str(row[solution]).strip() if solution is not None and row[solution] is not None else ""
            out.append(Problem(question=_prompt_text(row[prompt], prompt), solution=worked or f"The answer is {final}.",
                               answer=final, meta={"source": "dataset", "index": i, "columns": dict(row),
                                                   "prompt_column": prompt}))
        return out


def _describe(source) -> str:
    return repr(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
