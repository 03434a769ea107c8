"""A teacher served by vLLM (or any server speaking its OpenAI-style completions API): top-k log-probs of given
response tokens under a teacher context, from ``prompt_logprobs``.

The request, per batch of sequences: ``POST {url}/v1/completions`` with ``{"model", "prompt": [[context +
response ids], ...], "max_tokens": 1, "temperature", "prompt_logprobs": k}``. ``max_tokens`` is 1 because vLLM
rejects 0 (its sampling parameters need at least one token); the one generated token is ignored. The answer's
``choices[i]["prompt_logprobs"]`` holds, per prompt position p, ``None`` at p = 0 and otherwise a dict
``{"<token id>": {"logprob": x, "rank": r, "decoded_token": s}, ...}`` describing the distribution of token p
given tokens < p. vLLM returns the k most likely tokens plus the prompt's own token when that one is outside
them (k + 1 entries); here each position keeps exactly the k entries with the largest log-probs (rank breaks
ties), so the extra entry is dropped and every row means the same thing: the teacher's top-k.

Temperature: the value is sent as TRL does, but whether vLLM scales prompt log-probs by it depends on its
version and ``--logprobs-mode`` (raw log-probs, the default, ignore it); score at temperature 1.0 unless the
server is known to apply it.
"""
from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

PADDING_ID = -1  # the padding the op expects in teacher_topk_ids (logprob -inf)


class TeacherServerError(RuntimeError):
    """The teacher server could not be reached, failed, or answered something that is not prompt log-probs."""


def server_topk_logprobs(url: str, contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                         top_k: int, model: Optional[str] = None, temperature: float = 1.0, batch_size: int = 8,
                         max_concurrency: int = 4, timeout_s: float = 60.0, retries: int = 3,
                         backoff_s: float = 0.5) -> list:
    """For each (context, response) pair, the server teacher's ``(ids [T, k] int64, logprobs [T, k] float32)``
    at the T response tokens.

    Row t is the teacher's distribution of response token t given the context and response tokens before it,
    as its k most likely tokens in descending log-prob order, padded with id -1 / log-prob -inf where the
    server returned fewer (or a token has probability 0). ``model`` defaults to the server's first model
    (``GET /v1/models``). Sequences go ``batch_size`` to a request, at most ``max_concurrency`` requests at
    once. Each request waits at most ``timeout_s`` and is retried ``retries`` times, after ``backoff_s``,
    ``2 * backoff_s``, ..., on a connection error, a timeout or a 5xx answer; so a call lasts at most about
    ``(retries + 1) * timeout_s + backoff_s * 2 ** retries`` per round of concurrent requests. A server that
    stays down, answers 4xx or answers malformed JSON raises :class:`TeacherServerError` naming the URL.
    """
    if len(contexts) != len(responses):
        raise ValueError(f"contexts and responses must have one entry per sequence, got {len(contexts)} and "
                         f"{len(responses)}")
    for name, value, low in (("top_k", top_k, 1), ("batch_size", batch_size, 1), ("max_concurrency",
                             max_concurrency, 1), ("retries", retries, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not timeout_s > 0 or backoff_s < 0 or not temperature > 0:
        raise ValueError(f"timeout_s and temperature must be > 0 and backoff_s >= 0, got timeout_s={timeout_s}, "
                         f"temperature={temperature}, backoff_s={backoff_s}")
    for i, context in enumerate(contexts):
        if len(context) == 0:  # position 0 has no distribution: a response needs at least one context token
            raise ValueError(f"contexts[{i}] is empty: the teacher context needs at least one token")
    base = url.rstrip("/")
    post = _Poster(base, timeout_s, retries, backoff_s)
    if model is None:
        model = _first_model(post)
    starts = [len(c) for c in contexts]
    prompts = [[int(x) for x in c] + [int(x) for x in r] for c, r in zip(contexts, responses)]
    batches = [range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)]

    def score(rows):
        payload = {"model": model, "prompt": [prompts[i] for i in rows], "max_tokens": 1,
                   "temperature": temperature, "prompt_logprobs": top_k}
        choices = _choices(post("/v1/completions", payload), len(rows), post.where("/v1/completions"))
        return [_response_topk(choice, prompts[i], starts[i], top_k, post.where("/v1/completions"))
                for choice, i in zip(choices, rows)]

    if not batches:
        return []
    with ThreadPoolExecutor(max_workers=min(max_concurrency, len(batches))) as pool:
        return [pair for done in pool.map(score, batches) for pair in done]


class _Poster:
    """JSON requests to one server, with the timeout and the bounded retries."""

    def __init__(self, base: str, timeout_s: float, retries: int, backoff_s: float):
        self.base, self.timeout_s, self.retries, self.backoff_s = base, timeout_s, retries, backoff_s

    def where(self, path: str) -> str:
        return f"teacher server {self.base}{path}"

    def __call__(self, path: str, payload: Optional[dict] = None):
        data = None if payload is None else json.dumps(payload).encode()
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.base + path, data=data, method="GET" if data is None else "POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    body = answer.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode(errors="replace").strip()
                if exc.code < 500:  # the request itself is wrong (e.g. k above --max-logprobs): retrying won't help
                    raise TeacherServerError(f"{self.where(path)} answered HTTP {exc.code}: {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
                continue
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, DNS, cut short
                last = str(getattr(exc, "reason", exc)) or type(exc).__name__
                continue
            try:
                return json.loads(body)
            except ValueError:
                raise TeacherServerError(f"{self.where(path)} answered malformed JSON: {body[:120]!r}") from None
        raise TeacherServerError(f"{self.where(path)} failed after {self.retries + 1} attempts (timeout "
                                 f"{self.timeout_s:g}s each): {last}")


def _first_model(post: _Poster) -> str:
    answer = post("/v1/models")
    try:
        return str(answer["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise TeacherServerError(f"{post.where('/v1/models')} lists no model: {str(answer)[:120]}") from None


def _choices(answer, n: int, where: str) -> list:
    """The answer's ``n`` choices in prompt order (by their ``index`` when given)."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != n or not all(isinstance(c, dict) for c in choices):
        raise TeacherServerError(f"{where} answered without {n} choices: {str(answer)[:160]}")
    if all(isinstance(c.get("index"), int) for c in choices):
        choices = sorted(choices, key=lambda c: c["index"])
    return choices


def _response_topk(choice: dict, prompt: list, start: int, k: int, where: str):
    """(ids [T, k], logprobs [T, k]) of a choice's prompt positions start .. len(prompt) - 1."""
    positions = choice.get("prompt_logprobs")
    if not isinstance(positions, list) or len(positions) != len(prompt):
        got = len(positions) if isinstance(positions, list) else type(positions).__name__
        raise TeacherServerError(f"{where} answered prompt_logprobs for {got} positions, expected {len(prompt)} "
                                 "(a server without vLLM's prompt_logprobs extension?)")
    t = len(prompt) - start
    ids = torch.full((t, k), PADDING_ID, dtype=torch.int64)
    logprobs = torch.full((t, k), -math.inf, dtype=torch.float32)
    for row, entry in enumerate(positions[start:]):
        kept = sorted(_entries(entry, where), key=lambda e: (-e[1], e[2]))[:k]
        for j, (token, value, _) in enumerate(kept):
            if value > -math.inf:  # a token of probability 0 is no information: left as padding
                ids[row, j], logprobs[row, j] = token, min(value, 0.0)  # JSON rounding can give +1e-8
    return ids, logprobs


def _entries(entry, where: str) -> list:
    """(token id, logprob, rank) of one position's dict; values may be vLLM's objects or bare numbers."""
    if not isinstance(entry, dict):
        raise TeacherServerError(f"{where} answered a prompt_logprobs position that is not a dict: {entry!r:.80}")
    out = []
    for key, value in entry.items():
        raw = value.get("logprob") if isinstance(value, dict) else value
        rank = value.get("rank", math.inf) if isinstance(value, dict) else math.inf
        try:
            # null, NaN and vLLM's -9999.0 stand-in for -inf all mean probability 0 (NaN, null: padding)
            token, logprob = int(key), -math.inf if raw is None else float(raw)
        except (TypeError, ValueError):
            raise TeacherServerError(f"{where} answered a prompt_logprobs entry that is not a token id and a "
                                     f"logprob: {key!r}: {value!r:.80}") from None
        out.append((token, -math.inf if math.isnan(logprob) else logprob,
                    rank if isinstance(rank, (int, float)) else math.inf))
    return out
