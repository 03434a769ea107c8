"""A teacher held locally: top-k log-probs of given response tokens, the same output as the server client."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..boundary import read_head
from ..trainers.contexts import build_context_batch, response_hidden_states
from .server import PADDING_ID


@torch.no_grad()
def local_topk_logprobs(model, contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                        top_k: int, temperature: float = 1.0, batch_size: int = 8, chunk_size: int = 8192) -> list:
    """For each (context, response) pair, the local teacher's ``(ids [T, k] int64, logprobs [T, k] float32)`` at
    the T response tokens, in the format of :func:`pydistill.teachers.server.server_topk_logprobs`.

    Row t: the k most likely next tokens after the context and response tokens < t, in descending log-prob
    order, from ``log_softmax(logits / temperature)`` in float32; k above the vocabulary
    is padded with id -1 / log-prob -inf. The logits are formed ``chunk_size`` vocabulary columns at a time
    (a running top-k and log-sum-exp), so no [tokens, vocab] tensor exists; sequences go ``batch_size`` at once.
    """
    if len(contexts) != len(responses):
        raise ValueError(f"contexts and responses must have one entry per sequence, got {len(contexts)} and "
                         f"{len(responses)}")
    for name, value in (("top_k", top_k), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # the head as the op reads it: the logit scale is in the bias (and the hidden states), the softcap beside it
    head = read_head(model)
    weight, bias, softcap = head.weight, head.bias, head.softcap
    out, was_training = [], model.training
    model.eval()  # no dropout in the scores; the caller's mode is restored below
    try:
        for start in range(0, len(contexts), batch_size):
            ctx, resp = contexts[start:start + batch_size], responses[start:start + batch_size]
            for i, c in enumerate(ctx):
                if len(c) == 0:
                    raise ValueError(f"contexts[{start + i}] is empty: the teacher context needs at least one token")
            batch = build_context_batch(ctx, resp, pad_id=0, device=weight.device)
            rows = response_hidden_states(model, batch, head)[batch.completion_mask]  # [sum T, H], response order
            ids, logprobs = _chunked_topk(rows, weight, bias, top_k, temperature, softcap, chunk_size)
            lengths = [len(r) for r in resp]
            out.extend(zip(ids.split(lengths), logprobs.split(lengths)))
    finally:
        model.train(was_training)
    return out


def _chunked_topk(hidden, weight, bias, k, temperature, softcap, chunk_size):
    """Top-k ids and log-probs of ``softmax(cap(hidden W^T + b) / temperature)``: the op's running top-k over
    ``chunk_size``-column vocabulary chunks, then its exact log-probs at those ids (no [n, V] tensor)."""
    from ..token_stats import token_stats
    from ..token_stats.topk import logprobs_at, topk_support

    n, vocab = hidden.shape[0], weight.shape[0]
    budget_mb = 3 * 4 * max(n, 1) * chunk_size / 2 ** 20  # topk_support's chunk width is this budget's
    ids = topk_support(hidden, weight, min(k, vocab), bias=bias, memory_budget_mb=budget_mb)
    logprobs = logprobs_at(hidden, weight, ids, bias=bias, temperature=temperature, softcap=softcap,
                           lean_op=token_stats).clamp(max=0.0)
    if ids.shape[1] < k:  # fewer tokens than k in the whole vocabulary
        pad = k - ids.shape[1]
        logprobs = torch.cat([logprobs, logprobs.new_full((n, pad), -math.inf)], dim=1)
        ids = torch.cat([ids, ids.new_full((n, pad), PADDING_ID)], dim=1)
    return ids.cpu(), logprobs.float().cpu()
