"""The server teacher client against a local vLLM-like server (tests/teacher_server.py) on 127.0.0.1."""
from __future__ import annotations

import json
import math
import socket
import time

import pytest
import torch

from pydistill.teachers.server import TeacherServerError, server_topk_logprobs
from tests.teacher_server import TeacherServer, assert_topk_teacher_contract, model_prompt_logprobs

K = 5
FAST = dict(timeout_s=5.0, retries=2, backoff_s=0.05)


@pytest.fixture(scope="module")
def tiny():
    from pydistill.models import tiny_model

    model, tokenizer = tiny_model(seed=3)
    with torch.no_grad():  # sharper distributions than a random init: distinct top-k values
        model.lm_head.weight.mul_(20.0)
    return model.eval(), tokenizer


def _pairs(n=5):
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(3, 300, (2 + i % 3,), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(3, 300, (1 + (2 * i) % 5,), generator=g).tolist() for i in range(n)]
    return contexts, responses


def _reference(model, context, response, k, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([context + response])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(context) - 1:-1]
    values, ids = logp.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_k_equals_the_models_own_log_softmax_at_the_response_positions(tiny, temperature):
    model, tokenizer = tiny
    contexts, responses = _pairs()
    with TeacherServer(model, tokenizer) as server:
        got = server_topk_logprobs(server.url, contexts, responses, top_k=K, temperature=temperature, **FAST)
    assert len(got) == len(contexts)
    for (ids, logprobs), context, response in zip(got, contexts, responses):
        assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
        assert ids.shape == logprobs.shape == (len(response), K)
        ref_ids, ref_values = _reference(model, context, response, K, temperature)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(logprobs, ref_values, rtol=1e-6, atol=1e-6)
        assert_topk_teacher_contract(ids, logprobs)
    # vLLM's extra entry (the prompt's own token beyond the top-k) was served somewhere, and dropped
    sizes = [len(e) for c, r in zip(contexts, responses) for e in model_prompt_logprobs(model, c + r, K)[len(c):]]
    assert K + 1 in sizes


def test_model_name_comes_from_the_server_and_requests_mirror_vllm(tiny):
    contexts, responses = _pairs(3)
    with TeacherServer(tiny[0], name="my-teacher") as server:
        server_topk_logprobs(server.url, contexts, responses, top_k=K, **FAST)
    (first, _), (path, body) = server.requests
    assert first == "/v1/models" and path == "/v1/completions"
    assert body["model"] == "my-teacher" and body["prompt_logprobs"] == K and body["max_tokens"] == 1
    assert body["prompt"] == [c + r for c, r in zip(contexts, responses)]


def test_batches_are_bounded_and_results_stay_in_order(tiny):
    model, _ = tiny
    contexts, responses = _pairs(7)
    with TeacherServer(model) as server:
        batched = server_topk_logprobs(server.url, contexts, responses, top_k=K, model="m", batch_size=3,
                                       max_concurrency=2, **FAST)
    sizes = [len(body["prompt"]) for path, body in server.requests]
    assert sorted(sizes) == [1, 3, 3]
    with TeacherServer(model) as server:
        one_by_one = server_topk_logprobs(server.url, contexts, responses, top_k=K, model="m", batch_size=1, **FAST)
    assert len(server.requests) == 7
    for (a_ids, a_lp), (b_ids, b_lp) in zip(batched, one_by_one):
        assert torch.equal(a_ids, b_ids) and torch.equal(a_lp, b_lp)


@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_concurrent_requests_are_bounded(tiny, max_concurrency):
    contexts, responses = _pairs(4)
    with TeacherServer(tiny[0]) as server:
        server.script = [("sleep", 0.3)] * 4
        got = server_topk_logprobs(server.url, contexts, responses, top_k=2, model="m", batch_size=1,
                                   max_concurrency=max_concurrency, **FAST)
    assert len(got) == 4 and len(server.requests) == 4
    assert server.peak_in_flight == max_concurrency


def test_fewer_entries_than_k_are_padded(tiny):
    model, _ = tiny
    vocab = model.config.vocab_size
    with TeacherServer(model) as server:
        [(ids, logprobs)] = server_topk_logprobs(server.url, [[5, 6]], [[7, 8]], top_k=vocab + 3, model="m", **FAST)
    assert ids.shape == (2, vocab + 3)
    assert (ids[:, vocab:] == -1).all() and torch.isinf(logprobs[:, vocab:]).all()
    assert (ids[:, :vocab] >= 0).all()
    assert_topk_teacher_contract(ids, logprobs)
    torch.testing.assert_close(logprobs[:, :vocab].exp().sum(-1), torch.ones(2), rtol=1e-4, atol=1e-4)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_down_server_is_one_clear_error_after_the_retries_within_bounded_time():
    url = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(TeacherServerError, match=r"127\.0\.0\.1.*/v1/completions failed after 3 attempts"):
        server_topk_logprobs(url, [[1, 2]], [[3]], top_k=2, model="m", **FAST)
    assert time.monotonic() - started < 2.0  # backoffs 0.05 + 0.1, refused at once


def test_a_5xx_answer_is_retried(tiny):
    with TeacherServer(tiny[0]) as server:
        server.script = [("status", 500), ("status", 503)]
        [(ids, _)] = server_topk_logprobs(server.url, [[1, 2]], [[3, 4]], top_k=2, model="m", **FAST)
        assert len(server.requests) == 3 and ids.shape == (2, 2)
        server.script = [("status", 500)] * 3
        with pytest.raises(TeacherServerError, match=r"failed after 3 attempts.*HTTP 500"):
            server_topk_logprobs(server.url, [[1, 2]], [[3, 4]], top_k=2, model="m", **FAST)


def test_an_answer_cut_short_is_retried(tiny):
    with TeacherServer(tiny[0]) as server:
        server.script = [("truncate",)]
        [(ids, _)] = server_topk_logprobs(server.url, [[1, 2]], [[3, 4]], top_k=2, model="m", **FAST)
        assert len(server.requests) == 2 and ids.shape == (2, 2)


def test_a_4xx_answer_is_not_retried(tiny):
    with TeacherServer(tiny[0]) as server:
        server.script = [("status", 400)]
        with pytest.raises(TeacherServerError, match=r"/v1/completions answered HTTP 400: .*scripted 400"):
            server_topk_logprobs(server.url, [[1, 2]], [[3, 4]], top_k=2, model="m", **FAST)
        assert len(server.requests) == 1


@pytest.mark.parametrize("body, message", [
    (b"<html>oops</html>", "malformed JSON"),
    (b'{"choices": []}', "without 1 choices"),
    (b'{"choices": [{"index": 0, "prompt_logprobs": [null, {"3": {"logprob": -1.0}}]}]}', "for 2 positions"),
    (b'{"choices": [{"index": 0, "prompt_logprobs": [null, {"3": -1.0}, {"3": -1.0}, {"x": {"logprob": -1}}]}]}',
     "not a token id and a logprob"),
])
def test_a_malformed_answer_is_one_clear_error(tiny, body, message):
    with TeacherServer(tiny[0]) as server:
        server.script = [("raw", body)]
        with pytest.raises(TeacherServerError, match=rf"teacher server http://127\.0\.0\.1:\d+/v1/completions .*"
                                                     rf"{message}"):
            server_topk_logprobs(server.url, [[1, 2]], [[3, 4]], top_k=2, model="m", **FAST)
        assert len(server.requests) == 1


def test_the_extra_entry_beyond_the_top_k_is_dropped_wherever_it_comes():
    # vLLM adds the prompt's own token (here 7, rank 40) when it is outside the top-k: k + 1 entries
    entry = {"7": {"logprob": -9.0, "rank": 40}, "4": {"logprob": -1.5, "rank": 2}, "3": {"logprob": -0.5, "rank": 1}}
    body = {"choices": [{"prompt_logprobs": [None, entry]}]}
    with TeacherServer(torch.nn.Identity()) as server:
        server.script = [("raw", json.dumps(body).encode())]
        [(ids, logprobs)] = server_topk_logprobs(server.url, [[1]], [[7]], top_k=2, model="m", **FAST)
    assert ids.tolist() == [[3, 4]] and logprobs.tolist() == [[-0.5, -1.5]]


def test_bare_number_entries_and_nan_are_accepted():
    # a bare number per token (no rank); NaN, null (and -inf) are padding; a rounded +1e-7 is clamped to 0
    body = {"choices": [{"prompt_logprobs": [None, {"3": -0.5, "9": float("nan"), "4": -1.5, "5": 1e-7,
                                                    "8": {"logprob": None, "rank": 2}}]}]}
    with TeacherServer(torch.nn.Identity()) as server:
        server.script = [("raw", json.dumps(body).encode())]
        [(ids, logprobs)] = server_topk_logprobs(server.url, [[1]], [[3]], top_k=4, model="m", **FAST)
    assert ids.tolist() == [[5, 3, 4, -1]]
    assert logprobs[0, :3].tolist() == [0.0, -0.5, -1.5] and logprobs[0, 3] == -math.inf


def test_timeouts_are_bounded(tiny):
    with TeacherServer(tiny[0]) as server:
        server.script = [("sleep", 1.0)] * 3
        started = time.monotonic()
        with pytest.raises(TeacherServerError, match=r"failed after 2 attempts \(timeout 0.2s each\): .*timed out"):
            server_topk_logprobs(server.url, [[1, 2]], [[3]], top_k=2, model="m", timeout_s=0.2, retries=1,
                                 backoff_s=0.05)
        assert time.monotonic() - started < 1.5
        server.script = [("sleep", 0.5)]  # one slow answer, then a normal one: retried and answered
        [(ids, _)] = server_topk_logprobs(server.url, [[1, 2]], [[3]], top_k=2, model="m", timeout_s=0.2,
                                          retries=1, backoff_s=0.05)
        assert ids.shape == (1, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_k=2, batch_size=0), "batch_size must be an integer >= 1"),
    (dict(top_k=2, timeout_s=0), "timeout_s and temperature must be > 0"),
])
def test_bad_arguments_are_one_line_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        server_topk_logprobs("http://127.0.0.1:1", [[1]], [[2]], model="m", **kwargs)
    with pytest.raises(ValueError, match=r"contexts\[0\] is empty"):
        server_topk_logprobs("http://127.0.0.1:1", [[]], [[2]], top_k=2, model="m")
