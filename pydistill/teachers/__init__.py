"""Where a top-k teacher (``teacher_topk_ids`` / ``teacher_topk_logprobs``) comes from: a vLLM-compatible server
(:mod:`.server`), a local model (:mod:`.local`), or an offline cache of either (:mod:`.cache`, read back with
:func:`load_teacher_cache` from :mod:`.store`). All give, per sequence, ``(ids [T, k] int64, logprobs [T, k]
float32)`` at the T response tokens, padded with id -1 / log-prob -inf; :func:`stack_topk` (:mod:`.batch`) pads
them into the [B, T, k] tensors of ``distillation_loss``."""
from .server import TeacherServerError, server_topk_logprobs

# The local model path and the cache import transformers (through the trainers); loaded on first use.
_LAZY = {"local_topk_logprobs": ".local", "build_teacher_cache": ".cache", "load_teacher_cache": ".store",
         "TeacherTopK": ".store", "stack_topk": ".batch"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TeacherServerError", "server_topk_logprobs", *_LAZY]
