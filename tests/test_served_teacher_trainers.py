"""ROSD and Feedback Distillation with ``--teacher-url``: the method's own teacher context (ROSD's correct solution,
FD's feedback) is what the loopback server scores, and its top-k reaches the loss. With k = V the served top-k
covers the vocabulary, so the loss equals the local fixed teacher's (the tail bucket floored at ~1e-7)."""
import copy
import json

import pytest
import torch

from pydistill.cli import build_parser, load_config
from pydistill.models import tiny_model
from pydistill.trainers import FDConfig, OPSDConfig, ROSDConfig
from pydistill.boundary import read_head
from tests.teacher_server import TeacherServer
from tests.test_trainer_fd import make_trainer as make_fd
from tests.test_trainer_rosd import make_trainer as make_rosd

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]


def served_contexts(server, tokenizer):
    """The decoded text of every sequence the server was asked to score."""
    bodies = [body for path, body in server.requests if path == "/v1/completions"]
    return [tokenizer.decode(seq) for body in bodies for seq in body["prompt"]], bodies


def context_rows(batch, tokenizer):
    """The unpadded context + completion of each row of a ContextBatch, as text."""
    return [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch.input_ids, batch.attention_mask)]


def test_rosd_served_teacher_scores_the_sibling_context(tmp_path):
    local = make_rosd(tmp_path / "local", temperature=0.8)
    vocab, tok = read_head(local.model).weight.shape[0], local.tokenizer
    prepared = local.prepare(local.train_pool[:2])
    want = local.loss(prepared, float(prepared["tokens"]))
    with TeacherServer(copy.deepcopy(local.model)) as server:
        served = make_rosd(tmp_path / "served", temperature=0.8, teacher_url=server.url, teacher_top_k=vocab)
        assert served.teacher is None  # no local teacher weights are kept
        got = served.loss(prepared, float(prepared["tokens"]))
        sent, bodies = served_contexts(server, tok)
    assert sent == context_rows(prepared["teacher"], tok)  # exactly the method's teacher contexts
    assert all(b["prompt_logprobs"] == vocab and b["temperature"] == pytest.approx(0.8) for b in bodies)
    # ROSD's privileged text: each context shows its correct sibling's rollout
    student = prepared["student"]
    texts = {i: tok.decode(student.targets[row][student.completion_mask[row]], skip_special_tokens=True)
             for row, (i, _) in enumerate(prepared["pairs"])}
    siblings = [(text, texts[sibling]) for (_, sibling), text in zip(prepared["pairs"], sent) if sibling is not None]
    assert siblings and all(f"correct solution by another student:\n{shown}\n" in text for text, shown in siblings)
    assert float(want.loss.detach()) > 0
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-4, abs=1e-6)
    got.loss.backward()


@pytest.mark.parametrize("weight", [1.0, 0.5], ids=["pure", "blend"])
def test_fd_served_teacher_scores_the_feedback_context(tmp_path, weight):
    options = dict(teacher="fixed", teacher_temperature=0.7, loss_temperature=0.9, distillation_weight=weight,
                   loss_type="dapo")
    local = make_fd(tmp_path / "local", **options)
    vocab, tok = read_head(local.model).weight.shape[0], local.tokenizer
    prepared = local.prepare(local.train_pool[:1])
    local.finalize_batch([prepared])
    want = local.loss(prepared, float(prepared["tokens"]))
    with TeacherServer(copy.deepcopy(local.model)) as server:
        served = make_fd(tmp_path / "served", teacher_url=server.url, teacher_top_k=vocab, **options)
        assert served.teacher is None
        got = served.loss(prepared, float(prepared["tokens"]))
        sent, bodies = served_contexts(server, tok)
        served.train()  # a whole step with no local teacher: no EMA update, no teacher state in the checkpoint
        assert [r["step"] for r in map(json.loads, open(tmp_path / "served" / "fd" / "metrics.jsonl"))
                if "step" in r] == [1]
    assert sent == context_rows(prepared["teacher"], tok)
    assert all(b["temperature"] == pytest.approx(0.9 * 0.7) for b in bodies)  # both temperatures, as locally
    feedback = [f for f in prepared["feedback"] if f]
    assert feedback and all(any(f in text for text in sent) for f in feedback)  # FD's privileged text
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-4, abs=1e-6)


def test_served_top_k_reaches_the_loss(tmp_path):
    """k < V: the loss is distillation_loss on the server's top-k of the teacher contexts (computed here from
    the served model's own logits), not a local teacher's."""
    from pydistill.losses import distillation_loss
    from pydistill.teachers import stack_topk
    from pydistill.trainers.contexts import response_hidden_states

    teacher_model, _ = tiny_model(seed=5)
    with TeacherServer(teacher_model) as server:
        served = make_rosd(tmp_path, teacher_url=server.url, teacher_top_k=3)
        prepared = served.prepare(served.train_pool[:2])
        got = served.loss(prepared, float(prepared["tokens"]))
    teacher = prepared["teacher"]
    pairs = []
    with torch.no_grad():
        for ids, attention, mask in zip(teacher.input_ids, teacher.attention_mask, teacher.completion_mask):
            n, total = int(mask.sum()), int(attention.sum())
            logp = torch.log_softmax(teacher_model(ids[None, :total]).logits[0].float(), -1)[total - n - 1:total - 1]
            top = logp.topk(3, dim=-1)
            pairs.append((top.indices, top.values))
    ids, lps = stack_topk(pairs, length=teacher.targets.shape[1])
    cfg = served.config
    want = distillation_loss(response_hidden_states(served.policy, prepared["student"]), read_head(served.model).weight,
                             None, prepared["mask"], teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                             divergence=cfg.divergence, beta=cfg.beta, targets=prepared["student"].targets,
                             importance_clip=cfg.importance_clip, num_items_in_batch=float(prepared["tokens"]))
    assert float(want.loss) > 0
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("config_cls, overrides, match", [
    (FDConfig, dict(teacher_url="http://127.0.0.1:1"), "teacher_url serves fixed weights, but teacher='ema'"),
    (ROSDConfig, dict(teacher_url="http://127.0.0.1:1", teacher="live"), "but teacher='live' changes"),
    (ROSDConfig, dict(teacher_url="http://127.0.0.1:1", support_topk=5), "use one or the other"),
    (ROSDConfig, dict(teacher_url="127.0.0.1:8000"), "teacher_url must be an http:// or https:// address"),
    (FDConfig, dict(teacher_top_k=0), "teacher_top_k must be an integer >= 1"),
    (OPSDConfig, dict(teacher_url="http://127.0.0.1:1", teacher="ema"), "but teacher='ema' changes"),
    (OPSDConfig, dict(teacher_url="http://127.0.0.1:1", sampled_token=True), "use one or the other"),
], ids=["fd-ema", "rosd-live", "rosd-support-topk", "rosd-no-scheme", "fd-top-k", "opsd-ema", "opsd-sampled"])
def test_served_teacher_settings_are_checked(config_cls, overrides, match):
    with pytest.raises(ValueError, match=match):
        config_cls(model="tiny", **overrides).validate()


@pytest.mark.parametrize("method, config_cls", [("rosd", ROSDConfig), ("fd", FDConfig)])
def test_teacher_url_flags(method, config_cls):
    args = build_parser().parse_args(["train", method, "--teacher-url", "http://127.0.0.1:8000", "--teacher-top-k",
                                      "7", "--teacher-served-model", "big", "--teacher", "fixed"])
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "method", "config")}
    cfg = load_config(config_cls, None, overrides)
    assert (cfg.teacher_url, cfg.teacher_top_k, cfg.teacher_served_model) == ("http://127.0.0.1:8000", 7, "big")
