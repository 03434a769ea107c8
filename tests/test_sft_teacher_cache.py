"""The SFT trainer with a teacher cache end to end on the CPU: `pydistill teacher-cache` scores a tiny local
teacher on a jsonl written here, SFT trains on the same file with the cached top-k distillation term, the loss
equals a float64 reference built from the teacher's own logits, and a mismatched cache is refused in one line."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pydistill.cli import build_parser, load_config, main
from pydistill.models import tiny_model
from pydistill.prompts import render, student_messages
from pydistill.trainers import SFTConfig, SFTTrainer
from pydistill.boundary import read_head
from tests.trainer_helpers import TASK

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]

K, TEMPERATURE, BETA, WEIGHT = 4, 0.8, 0.3, 0.75
ROWS = [dict(prompt=f"Tom has {a} apples and buys {b} more. How many now?", solution=f"{a} + {b} = {a + b}.",
             answer=str(a + b)) for a, b in [(3, 4), (2, 5), (10, 6), (4, 3), (7, 8), (6, 1)]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(teacher model, data file, cache folder): the cache written by the CLI from a teacher saved to a folder."""
    folder = tmp_path_factory.mktemp("sft-cache")
    teacher, tokenizer = tiny_model(seed=5)
    with torch.no_grad():  # sharper than a random init: a divergence well above float32 rounding
        teacher.lm_head.weight.mul_(20.0)
    teacher.save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    data = write_jsonl(folder / "data.jsonl", ROWS)
    assert main(["teacher-cache", "--model", str(folder / "teacher"), "--dataset", data, "--response-column",
                 "solution", "--top-k", str(K), "--temperature", str(TEMPERATURE), "--output",
                 str(folder / "cache")]) == 0
    return teacher.eval(), data, str(folder / "cache")


def make_trainer(tmp_path, data, cache, task=None, **overrides):
    values = dict(model="tiny", lora_r=0, max_steps=2, batch_size=4, micro_batch_size=2, eval_problems=0,
                  output_dir=str(tmp_path / "run"), learning_rate=1e-2, progress=False, train_problems=6,
                  max_grad_norm=1e9, dataset=data, teacher_cache=cache, distillation_weight=WEIGHT, beta=BETA,
                  divergence="jsd")
    values.update(overrides)
    model, tok = tiny_model()
    return SFTTrainer(SFTConfig(**values), model=model, tokenizer=tok, task=task)


def reference_loss(student, teacher, tok, problems):
    """(1 - w) NLL + w JSD_beta over the teacher's top-k and a tail bucket, token mean, in float64 from full
    logits: the teacher's top-k from its own forward on the cache's context (the prompt's chat template)."""
    nll, divergence, count = 0.0, 0.0, 0
    for p in problems:
        answer = tok(p.solution.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        prompt = tok(render(tok, student_messages(p.question)), add_special_tokens=False)["input_ids"]
        hidden = student.model(input_ids=torch.tensor([prompt + answer])).last_hidden_state[0, len(prompt) - 1:-1]
        logits = hidden.double() @ read_head(student).weight.double().t()
        nll = nll - torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None]).sum()
        context = tok(tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            t_logits = teacher(torch.tensor([context + answer])).logits[0, len(context) - 1:-1].double()
        t_logp = torch.log_softmax(t_logits / TEMPERATURE, -1)
        top = t_logp.topk(K, dim=-1)
        q_logp = torch.log_softmax(logits / TEMPERATURE, -1).gather(1, top.indices)
        p_dist = torch.cat([top.values.exp(), 1 - top.values.exp().sum(-1, keepdim=True)], -1)
        q_dist = torch.cat([q_logp.exp(), 1 - q_logp.exp().sum(-1, keepdim=True)], -1)
        mix = BETA * p_dist + (1 - BETA) * q_dist
        divergence = divergence + (BETA * (p_dist * (p_dist / mix).log()).sum()
                                   + (1 - BETA) * (q_dist * (q_dist / mix).log()).sum())
        count += len(answer)
    return ((1 - WEIGHT) * nll + WEIGHT * divergence) / count


def test_sft_trains_on_the_cli_cache_and_matches_float64(tmp_path, scored):
    teacher, data, cache = scored
    trainer = make_trainer(tmp_path, data, cache)
    trainer.train()  # a few real steps on the cached teacher
    steps = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"step"' in line]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(math.isfinite(s["loss"]) and s["divergence"] > 0 and s["nll"] > 0 for s in steps)
    problems = trainer.train_pool[:2]
    prepared = trainer.prepare(problems)
    got = trainer.loss(prepared, float(prepared["tokens"]))
    want = reference_loss(trainer.model, teacher, trainer.tokenizer, problems)
    assert float(want.detach()) > 0
    torch.testing.assert_close(got.loss.double(), want, rtol=1e-5, atol=1e-7)
    got.loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()
    want.backward()
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad.to(grads[name]), rtol=1e-4, atol=1e-6, msg=name)


def test_mismatched_caches_are_refused(tmp_path, scored):
    _, data, cache = scored
    other = [dict(r, solution=r["solution"].replace(" = ", " equals ")) for r in ROWS]
    with pytest.raises(ValueError, match=r"row \d+ scores \d+ response tokens that are not the \d+ trained on"):
        make_trainer(tmp_path / "a", write_jsonl(tmp_path / "other.jsonl", other), cache)
    longer = ROWS + [dict(prompt="Ana has 2 pens and finds 2 more. How many now?", solution="2 + 2 = 4.", answer="4")]
    with pytest.raises(ValueError, match=r"holds 6 examples but the dataset has row 6: it was built from other data"):
        make_trainer(tmp_path / "b", write_jsonl(tmp_path / "longer.jsonl", longer), cache, train_problems=7)
    with pytest.raises(ValueError, match="carry no dataset row"):
        make_trainer(tmp_path / "c", None, cache, task=TASK)
    with pytest.raises(ValueError, match="has no teacher_cache.json"):
        make_trainer(tmp_path / "d", data, str(tmp_path))
    with pytest.raises(ValueError, match=r"distillation_weight must be in \[0, 1\]"):
        make_trainer(tmp_path / "e", data, cache, distillation_weight=1.5)


def test_teacher_cache_flags():
    args = build_parser().parse_args(["train", "sft", "--teacher-cache", "cache/", "--distillation-weight", "0.5",
                                      "--divergence", "forward_kl", "--topk-tail", "false"])
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "method", "config")}
    cfg = load_config(SFTConfig, None, overrides)
    assert (cfg.teacher_cache, cfg.distillation_weight, cfg.divergence, cfg.topk_tail) == \
        ("cache/", 0.5, "forward_kl", False)
