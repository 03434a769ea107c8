"""The local top-k teacher and `pydistill teacher-cache` end to end on the CPU: a tiny model saved to a folder, a
tiny dataset written by the test, the cache read back with load_teacher_cache."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pydistill.cli import main
from pydistill.teachers import load_teacher_cache, local_topk_logprobs, server_topk_logprobs
from pydistill.teachers.cache import build_teacher_cache
from tests.teacher_server import TeacherServer, assert_topk_teacher_contract

K = 4
PROMPTS = ["Tom has 12 apples.", "Ana buys 5 more.", "8 / 2 = 4.", "How many stickers?", "9 + 6 = 15."]
RESPONSES = ["12 + 5 = 17. The answer is 17.", "5", "", "3 * 4 = 12.", "The answer is \\boxed{15}."]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from pydistill.models import tiny_model

    model, tokenizer = tiny_model(seed=5)
    with torch.no_grad():  # sharper than a random init: distinct top-k values
        model.lm_head.weight.mul_(20.0)
    folder = tmp_path_factory.mktemp("teacher") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer, str(folder)


def _reference(model, context, response, k, temperature=1.0):
    """Top-k of the model's own full log_softmax at the positions that predict the response tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([context + response])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(context) - 1:len(context) - 1 + len(response)]
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return ids, values


def _text_tokens(tokenizer, prompt, response):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    context = tokenizer(text, add_special_tokens=False)["input_ids"]
    return context, tokenizer(response.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _pairs(tokenizer):
    return [list(x) for x in zip(*(_text_tokens(tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)))]


@pytest.mark.parametrize("temperature, chunk_size", [(1.0, 8192), (0.7, 50)])
def test_local_top_k_equals_the_models_own_log_softmax(teacher, temperature, chunk_size):
    model, tokenizer, _ = teacher
    contexts, responses = _pairs(tokenizer)
    model.train()  # the caller's mode is kept; the scores are taken in eval mode
    try:
        got = local_topk_logprobs(model, contexts, responses, top_k=K, temperature=temperature, batch_size=2,
                                  chunk_size=chunk_size)
        assert model.training
    finally:
        model.eval()
    assert len(got) == len(PROMPTS)
    for (ids, logprobs), context, response in zip(got, contexts, responses):
        assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32 and ids.shape == (len(response), K)
        assert_topk_teacher_contract(ids, logprobs)
        ref_ids, ref_values = _reference(model, context, response, K, temperature)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(logprobs, ref_values, rtol=1e-5, atol=1e-5)


def test_local_pads_k_above_the_vocabulary_and_matches_the_server(teacher):
    model, tokenizer, _ = teacher
    vocab = model.config.vocab_size
    [(ids, logprobs)] = local_topk_logprobs(model, [[5, 6]], [[7]], top_k=vocab + 2, chunk_size=100)
    assert (ids[:, vocab:] == -1).all() and (logprobs[:, vocab:] == -math.inf).all()
    assert sorted(ids[0, :vocab].tolist()) == list(range(vocab))
    assert_topk_teacher_contract(ids, logprobs)
    contexts, responses = _pairs(tokenizer)
    with TeacherServer(model) as server:
        served = server_topk_logprobs(server.url, contexts, responses, top_k=K, model="m", timeout_s=30, retries=0)
    for (a_ids, a_lp), (b_ids, b_lp) in zip(local_topk_logprobs(model, contexts, responses, top_k=K), served):
        assert torch.equal(a_ids, b_ids)
        torch.testing.assert_close(a_lp, b_lp, rtol=1e-5, atol=1e-5)


def test_stack_topk_lines_up_with_the_context_batch(teacher):
    from pydistill.teachers import stack_topk
    from pydistill.trainers.contexts import build_context_batch

    model, tokenizer, _ = teacher
    contexts, responses = _pairs(tokenizer)
    pairs = local_topk_logprobs(model, contexts, responses, top_k=K)
    ids, logprobs = stack_topk(pairs)
    batch = build_context_batch(contexts, responses, pad_id=0)
    assert ids.shape == logprobs.shape == batch.targets.shape + (K,)
    assert torch.equal((ids != -1).any(-1), batch.completion_mask)
    for b, (row_ids, row_lp) in enumerate(pairs):
        assert torch.equal(ids[b, :len(responses[b])], row_ids) and torch.equal(logprobs[b, :len(responses[b])], row_lp)
    assert (logprobs[~batch.completion_mask] == -math.inf).all()
    assert stack_topk(pairs, length=40)[0].shape == (len(pairs), 40, K)
    with pytest.raises(ValueError, match="length 2 is shorter than the longest sequence"):
        stack_topk(pairs, length=2)
    with pytest.raises(ValueError, match="one k"):
        stack_topk([pairs[0], (pairs[1][0][:, :2], pairs[1][1][:, :2])])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_writes_a_cache_aligned_with_the_examples(teacher, tmp_path, capsys):
    model, tokenizer, folder = teacher
    data = _write_jsonl(tmp_path / "data.jsonl", [dict(prompt=p, response=r) for p, r in zip(PROMPTS, RESPONSES)])
    out = tmp_path / "cache"
    assert main(["teacher-cache", "--model", folder, "--dataset", data, "--top-k", str(K), "--output", str(out),
                 "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[teacher-cache] scored 5/5 examples" in printed
    meta = json.loads(printed[printed.index("\n{\n") + 1:])
    assert meta["examples"] == len(PROMPTS) and meta["top_k"] == K and meta["model"] == folder
    cache = load_teacher_cache(str(out))
    assert len(cache) == len(PROMPTS) and cache.top_k == K and cache.meta["tokens"] == "text"
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        context, response_ids = _text_tokens(tokenizer, prompt, response)
        entry = cache[i]
        assert entry.response_ids.tolist() == response_ids
        ref_ids, ref_values = _reference(model, context, response_ids, K)
        assert torch.equal(entry.ids, ref_ids)
        torch.testing.assert_close(entry.logprobs, ref_values, rtol=1e-5, atol=1e-5)
    assert cache[-1].response_ids.tolist() == cache[len(PROMPTS) - 1].response_ids.tolist()
    with pytest.raises(IndexError):
        cache[len(PROMPTS)]


def test_shards_and_token_id_columns_through_the_server(teacher, tmp_path):
    model, tokenizer, folder = teacher
    contexts, responses = _pairs(tokenizer)
    data = _write_jsonl(tmp_path / "ids.jsonl", [dict(context_ids=c, response_ids=r)
                                                  for c, r in zip(contexts, responses)])
    local = build_teacher_cache(data, str(tmp_path / "local"), top_k=K, model=folder, shard_tokens=7,
                                log=lambda *_: None)
    assert len(local["shards"]) >= 3 and local["tokens"] == "ids"
    with TeacherServer(model) as server:  # no --model: token ids need no tokenizer
        served = build_teacher_cache(data, str(tmp_path / "served"), top_k=K, teacher_url=server.url,
                                     server_options=dict(timeout_s=30, retries=0), log=lambda *_: None)
    assert served["teacher"] == server.url and len(served["shards"]) == 1
    a, b = load_teacher_cache(str(tmp_path / "local")), load_teacher_cache(str(tmp_path / "served"))
    for i, (context, response) in enumerate(zip(contexts, responses)):
        ref_ids, ref_values = _reference(model, context, response, K)
        for cache in (a, b):
            assert torch.equal(cache[i].ids, ref_ids) and cache[i].response_ids.tolist() == response
            torch.testing.assert_close(cache[i].logprobs, ref_values, rtol=1e-5, atol=1e-5)


def test_cli_through_a_server_by_its_model_name(teacher, tmp_path):
    model, tokenizer, folder = teacher
    data = _write_jsonl(tmp_path / "data.jsonl", [dict(prompt=p, response=r) for p, r in zip(PROMPTS, RESPONSES)])
    out = tmp_path / "cache"
    with TeacherServer(model) as server:
        assert main(["teacher-cache", "--model", folder, "--dataset", data, "--top-k", "3", "--output", str(out),
                     "--teacher-url", server.url, "--served-model", "teacher-7b", "--batch-size", "2"]) == 0
    assert [path for path, _ in server.requests] == ["/v1/completions"] * 3  # 5 rows, 2 a request, no /v1/models
    assert {body["model"] for _, body in server.requests} == {"teacher-7b"}
    cache = load_teacher_cache(str(out))
    assert cache.meta["teacher"] == server.url and len(cache) == len(PROMPTS)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        context, response_ids = _text_tokens(tokenizer, prompt, response)
        ref_ids, _ = _reference(model, context, response_ids, 3)
        assert torch.equal(cache[i].ids, ref_ids)


def _error(capsys) -> str:
    """The one error line (progress bars of datasets / transformers may precede it on stderr)."""
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and not line.startswith(("Loading", "Generating"))]
    assert len(lines) == 1, lines
    return lines[0]


def test_an_existing_output_is_replaced_only_with_overwrite(teacher, tmp_path, capsys):
    _, _, folder = teacher
    data = _write_jsonl(tmp_path / "data.jsonl", [dict(prompt="1 + 1", response="2")])
    out = str(tmp_path / "cache")
    args = ["teacher-cache", "--model", folder, "--dataset", data, "--top-k", "2", "--output", out]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = _error(capsys)
    assert "--output" in err and "already exists: pass --overwrite" in err
    assert main(args + ["--top-k", "3", "--overwrite"]) == 0
    assert load_teacher_cache(out).top_k == 3
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["teacher-cache", "--model", folder, "--dataset", data, "--top-k", "2", "--output", str(other),
                 "--overwrite"]) == 2
    assert "not a teacher cache" in _error(capsys) and (other / "keep.txt").read_text() == "mine"


def test_bad_input_is_one_line_naming_the_argument(teacher, tmp_path, capsys):
    _, _, folder = teacher
    data = _write_jsonl(tmp_path / "data.jsonl", [dict(prompt="1 + 1", answer="2")])
    out = str(tmp_path / "cache")
    base = ["teacher-cache", "--output", out]
    cases = [
        (["--model", folder, "--dataset", str(tmp_path / "missing.jsonl"), "--top-k", "2"], "--dataset"),
        (["--model", folder, "--dataset", data, "--top-k", "0"], "--top-k must be an integer >= 1"),
        (["--model", str(tmp_path / "no-model"), "--dataset", data, "--top-k", "2"], "--model .* does not exist"),
        (["--model", folder, "--dataset", data, "--top-k", "2"], "--response-column 'response' is not a column"),
        (["--dataset", data, "--top-k", "2", "--response-column", "answer"], "--model is required"),
        (["--model", folder, "--dataset", data, "--top-k", "2", "--response-column", "answer", "--teacher-url",
          "http://127.0.0.1:9", "--retries", "0", "--timeout", "2"], r"--teacher-url: teacher server http://127"),
    ]
    import re

    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = _error(capsys)
        assert err.startswith("pydistill: error: ") and re.search(message, err), err
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("cache.partial*"))


@pytest.mark.slow
def test_a_gguf_file_as_the_teacher(tmp_path):
    """--model <file.gguf>: the embedded SmolLM2 file by its path scores like the model it loads to."""
    from pydistill.models import embedded_gguf_path, load_model

    data = _write_jsonl(tmp_path / "data.jsonl", [dict(prompt="What is 3 + 4?", response="3 + 4 = 7.")])
    out = tmp_path / "cache"
    assert main(["teacher-cache", "--model", embedded_gguf_path(), "--dataset", data, "--top-k", "3", "--output",
                 str(out)]) == 0
    model, tokenizer = load_model(embedded_gguf_path(), device="cpu")
    context, response = _text_tokens(tokenizer, "What is 3 + 4?", "3 + 4 = 7.")
    entry = load_teacher_cache(str(out))[0]
    assert entry.response_ids.tolist() == response
    ref_ids, ref_values = _reference(model, context, response, 3)
    assert torch.equal(entry.ids, ref_ids)
    torch.testing.assert_close(entry.logprobs, ref_values, rtol=1e-4, atol=1e-4)


def test_a_cached_teacher_drives_distillation_loss(teacher, tmp_path):
    """The cache, stacked, is accepted by the op: the same model as student gives KL 0 over the top-k and the
    tail, another student a positive KL with a gradient."""
    from pydistill.losses import distillation_loss
    from pydistill.models import tiny_model
    from pydistill.teachers import stack_topk
    from pydistill.boundary import read_head
    from pydistill.trainers.contexts import build_context_batch, response_hidden_states

    model, tokenizer, folder = teacher
    contexts, responses = _pairs(tokenizer)
    data = _write_jsonl(tmp_path / "ids.jsonl", [dict(context_ids=c, response_ids=r)
                                                  for c, r in zip(contexts, responses)])
    build_teacher_cache(data, str(tmp_path / "cache"), top_k=K, model=folder, log=lambda *_: None)
    cache = load_teacher_cache(str(tmp_path / "cache"))
    ids, logprobs = stack_topk([cache[i] for i in range(len(cache))])
    batch = build_context_batch(contexts, responses, pad_id=0)
    losses = []
    for student in (model, tiny_model(seed=9)[0]):
        with torch.no_grad():
            hidden = response_hidden_states(student, batch)
        hidden.requires_grad_()
        out = distillation_loss(hidden, read_head(student).weight.detach(), None, batch.completion_mask,
                                teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, impl="torch")
        out.loss.backward()
        assert torch.isfinite(hidden.grad).all()
        losses.append(out.loss.item())
    assert abs(losses[0]) < 1e-5 and losses[1] > 1e-2, losses
