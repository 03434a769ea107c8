"""`pydistill teacher-cache`: score a fixed dataset's responses with a teacher once and keep its top-k.

Each row of the dataset is one (teacher context, response) pair:

- token ids, when the row has ``context_ids`` and ``response_ids`` columns (lists of ints): used as they are;
- otherwise text: the ``prompt_column`` (a string, one user turn, or a list of chat messages) rendered with the
  tokenizer's chat template and a generation prompt, and the ``response_column`` stripped, tokenized without
  special tokens and closed with EOS (the tokens the SFT trainer trains on after that prompt).

The teacher is a local model (``model``: a hub name, a folder, a ``.gguf`` file or the embedded default) or a
vLLM-compatible server (``teacher_url``; ``model`` then only supplies the tokenizer for text columns). The
folder format is in :mod:`pydistill.teachers.store`; :func:`pydistill.teachers.load_teacher_cache` reads it.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Optional

from .store import INDEX_FILE, ShardWriter

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ID_COLUMNS = ("context_ids", "response_ids")


def build_teacher_cache(dataset: str, output: str, *, top_k: int, model: Optional[str] = None,
                        teacher_url: Optional[str] = None, prompt_column: str = "prompt",
                        response_column: str = "response", temperature: float = 1.0, batch_size: int = 8,
                        overwrite: bool = False, server_options: Optional[dict] = None,
                        shard_tokens: int = 1 << 20, log=print) -> dict:
    """Score every row of ``dataset`` (a .jsonl/.json/.csv/.parquet file or a ``save_to_disk`` folder) with the
    teacher and write the cache folder ``output``; returns its index (``teacher_cache.json``).

    Row i of the cache is row i of the dataset. An existing ``output`` is replaced only with ``overwrite``, and
    only when it is a teacher cache or empty; the cache is written beside it first and moved in when complete,
    so an interrupted run leaves no half cache under ``output``. Bad arguments raise one-line ValueErrors
    naming them (``--top-k``, ``--dataset``, ``--model``, ``--output``, ...)."""
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"--top-k must be an integer >= 1, got {top_k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    _check_output(output, overwrite)
    if model is not None:  # before reading the data: the cheap checks first
        _check_model(model)
    rows = _read_rows(dataset)
    use_ids = all(c in rows.column_names for c in ID_COLUMNS)
    if not use_ids:
        for flag, column in (("--prompt-column", prompt_column), ("--response-column", response_column)):
            if column not in rows.column_names:
                raise ValueError(f"{flag} {column!r} is not a column of --dataset {dataset!r} (columns: "
                                 f"{', '.join(rows.column_names)}; or give token ids as {' and '.join(ID_COLUMNS)})")
    if model is None and (teacher_url is None or not use_ids):
        raise ValueError("--model is required (the teacher to run locally, or with --teacher-url the tokenizer of "
                         "the dataset's text columns)")
    teacher, tokenizer = _teacher(model, teacher_url, use_ids)
    score = _scorer(teacher, teacher_url, top_k, temperature, batch_size, server_options or {})

    staging = f"{os.path.abspath(output).rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    meta = dict(top_k=top_k, temperature=temperature, teacher=teacher_url or model, teacher_url=teacher_url,
                model=model, dataset=os.path.abspath(dataset), tokens="ids" if use_ids else "text",
                prompt_column=None if use_ids else prompt_column,
                response_column=None if use_ids else response_column)
    writer = ShardWriter(staging, meta, shard_tokens=shard_tokens)
    started, block = time.time(), batch_size * 8
    try:
        for lo in range(0, len(rows), block):
            part = rows[lo:lo + block]
            contexts, responses = _token_ids(part, use_ids, tokenizer, prompt_column, response_column, lo)
            for (ids, logprobs), response in zip(score(contexts, responses), responses):
                writer.add(ids, logprobs, response)
            log(f"[teacher-cache] scored {min(lo + block, len(rows))}/{len(rows)} examples "
                f"({time.time() - started:.0f}s)")
        writer.close(extra=dict(seconds=round(time.time() - started, 1)))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(staging, output)
    from .store import load_teacher_cache

    return load_teacher_cache(output).meta


def _check_output(output: str, overwrite: bool):
    if not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a file, not a folder")
    if not overwrite:
        raise ValueError(f"--output {output!r} already exists: pass --overwrite to replace it")
    if os.listdir(output) and not os.path.isfile(os.path.join(output, INDEX_FILE)):
        # --overwrite deletes the folder: never one that is not a teacher cache (a typo could name a home folder)
        raise ValueError(f"--output {output!r} is a non-empty folder that is not a teacher cache: refusing to "
                         "replace it even with --overwrite")


def _read_rows(dataset: str):
    """The dataset's rows as one ``datasets.Dataset`` (a saved DatasetDict must hold a single split)."""
    import datasets

    if not os.path.exists(dataset):
        raise ValueError(f"--dataset {dataset!r} does not exist")
    if os.path.isdir(dataset):
        try:
            loaded = datasets.load_from_disk(dataset)
        except FileNotFoundError:
            raise ValueError(f"--dataset folder {dataset!r} was not written by save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise ValueError(f"--dataset folder {dataset!r} holds splits {list(loaded)}: save the one to "
                                 "score on its own")
            loaded = next(iter(loaded.values()))
        return loaded
    builder = _FILE_BUILDERS.get(os.path.splitext(dataset)[1].lower())
    if builder is None:
        raise ValueError(f"--dataset file {dataset!r} must end in one of {sorted(_FILE_BUILDERS)}")
    return datasets.load_dataset(builder, data_files={"train": dataset}, split="train")


def _check_model(model: str):
    from ..models import EMBEDDED_DEFAULT
    from ..tasks.dataset import looks_like_hub_name

    if model != EMBEDDED_DEFAULT and not os.path.exists(model) and not looks_like_hub_name(model):
        raise ValueError(f"--model {model!r} does not exist (a model folder, a .gguf file, a hub name or "
                         f"{EMBEDDED_DEFAULT})")


def _teacher(model, teacher_url, use_ids):
    """(the local teacher model or None, the tokenizer or None): only what the run needs is loaded."""
    from ..models import load_model, load_tokenizer

    try:
        if teacher_url is None:
            return load_model(model)
        return None, (None if use_ids else load_tokenizer(model))
    except OSError as exc:
        raise ValueError(f"--model {model!r} cannot be loaded: {str(exc).strip().splitlines()[0]}") from None


def _scorer(teacher, teacher_url, top_k, temperature, batch_size, server_options):
    if teacher_url is not None:
        from .server import TeacherServerError, server_topk_logprobs

        def score(contexts, responses):
            try:
                return server_topk_logprobs(teacher_url, contexts, responses, top_k=top_k, temperature=temperature,
                                            batch_size=batch_size, **server_options)
            except TeacherServerError as exc:  # the CLI reports ValueErrors in one line
                raise ValueError(f"--teacher-url: {exc}") from None
        return score
    from .local import local_topk_logprobs

    return lambda contexts, responses: local_topk_logprobs(teacher, contexts, responses, top_k=top_k,
                                                           temperature=temperature, batch_size=batch_size)


def _token_ids(part: dict, use_ids: bool, tokenizer, prompt_column, response_column, first_row: int):
    """(contexts, responses) token ids of a block of rows (a dict of columns)."""
    if use_ids:
        contexts, responses = part["context_ids"], part["response_ids"]
    else:
        contexts, responses = [], []
        for value, response in zip(part[prompt_column], part[response_column]):
            messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            contexts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            responses.append(tokenizer(str(response or "").strip(), add_special_tokens=False)["input_ids"]
                             + [tokenizer.eos_token_id])
    for i, (context, response) in enumerate(zip(contexts, responses)):
        if not context or not all(isinstance(x, int) for x in list(context) + list(response)):
            raise ValueError(f"--dataset row {first_row + i}: the teacher context must be a non-empty list of token "
                             f"ids and the response a list of token ids")
    return [list(c) for c in contexts], [list(r) for r in responses]
