"""The on-disk teacher cache: per-response-token top-k ids and log-probs in safetensors shards plus an index.

A cache folder holds ``teacher_cache.json`` (the index: format version, k, temperature, the teacher and the
data it scored, the number of examples, and per shard its file and first example) and ``shard-00000.safetensors``
... Each shard holds, for a run of consecutive examples, the flat tensors ``topk_ids`` [tokens, k] int64,
``topk_logprobs`` [tokens, k] float32 and ``response_ids`` [tokens] int64 (the scored tokens, to check alignment
with the training data), and ``offsets`` [examples + 1] int64: example j of the shard owns tokens
``offsets[j]:offsets[j + 1]``. safetensors was chosen over `datasets` Arrow tables because shards are written
as the scoring goes (no second copy, no hashing of the generator, no cache folder elsewhere) and read back by
slices without loading a whole shard.
"""
from __future__ import annotations

import bisect
import json
import os
from typing import NamedTuple, Optional

import torch

INDEX_FILE = "teacher_cache.json"
FORMAT_VERSION = 1


class TeacherTopK(NamedTuple):
    """One example's teacher: ``ids`` [T, k] int64 (-1: padding), ``logprobs`` [T, k] float32 (-inf: padding),
    ``response_ids`` [T] int64 (the response tokens those rows score)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    response_ids: torch.Tensor


def load_teacher_cache(path: str) -> "TeacherCache":
    """The teacher cache in folder ``path`` as a sequence aligned with the scored dataset's rows:
    ``cache[i]`` is row i's :class:`TeacherTopK`; ``cache.meta`` is the index (k, temperature, teacher, data)."""
    index = os.path.join(os.fspath(path), INDEX_FILE)
    if not os.path.isfile(index):
        raise ValueError(f"teacher cache {os.fspath(path)!r} has no {INDEX_FILE} (not a folder written by "
                         "`pydistill teacher-cache`)")
    with open(index, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"teacher cache {os.fspath(path)!r} has format version {meta.get('format_version')!r}, "
                         f"this pydistill reads {FORMAT_VERSION}")
    return TeacherCache(os.fspath(path), meta)


class TeacherCache:
    """Read side of a cache folder (see the module docstring); examples are read by slices, on demand."""

    def __init__(self, path: str, meta: dict):
        self.path, self.meta = path, meta
        self.top_k = int(meta["top_k"])
        self._starts = [int(s["first_example"]) for s in meta["shards"]]

    def __len__(self) -> int:
        return int(self.meta["examples"])

    def __getitem__(self, i: int) -> TeacherTopK:
        from safetensors import safe_open

        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} is outside the teacher cache's {len(self)} examples")
        i %= len(self)
        shard = bisect.bisect_right(self._starts, i) - 1
        local = i - self._starts[shard]
        with safe_open(os.path.join(self.path, self.meta["shards"][shard]["file"]), framework="pt") as f:
            lo, hi = f.get_slice("offsets")[local:local + 2].tolist()
            return TeacherTopK(f.get_slice("topk_ids")[lo:hi], f.get_slice("topk_logprobs")[lo:hi],
                               f.get_slice("response_ids")[lo:hi])


class ShardWriter:
    """Write side: ``add`` examples in order, ``close`` writes the last shard and the index. A shard is written
    when it holds ``shard_tokens`` tokens, so memory stays at one shard whatever the dataset's size."""

    def __init__(self, folder: str, meta: dict, shard_tokens: int = 1 << 20):
        self.folder, self.meta, self.shard_tokens = folder, dict(meta), shard_tokens
        self.shards, self.examples = [], 0
        self._reset()

    def _reset(self):
        self.ids, self.logprobs, self.responses, self.offsets = [], [], [], [0]

    def add(self, ids: torch.Tensor, logprobs: torch.Tensor, response_ids):
        self.ids.append(ids.to(torch.int64).cpu())
        self.logprobs.append(logprobs.to(torch.float32).cpu())
        self.responses.append(torch.as_tensor(list(response_ids), dtype=torch.int64))
        self.offsets.append(self.offsets[-1] + ids.shape[0])
        self.examples += 1
        if self.offsets[-1] >= self.shard_tokens:
            self._flush()

    def _flush(self):
        from safetensors.torch import save_file

        count = len(self.offsets) - 1
        if count == 0:
            return
        k = int(self.meta["top_k"])
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({"topk_ids": torch.cat(self.ids).reshape(-1, k).contiguous(),
                   "topk_logprobs": torch.cat(self.logprobs).reshape(-1, k).contiguous(),
                   "response_ids": torch.cat(self.responses).contiguous(),
                   "offsets": torch.tensor(self.offsets, dtype=torch.int64)}, os.path.join(self.folder, name))
        self.shards.append({"file": name, "first_example": self.examples - count, "examples": count})
        self._reset()

    def close(self, extra: Optional[dict] = None):
        self._flush()
        meta = dict(self.meta, format_version=FORMAT_VERSION, examples=self.examples, shards=self.shards,
                    **(extra or {}))
        with open(os.path.join(self.folder, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
