"""The TRL drop-ins on Llama, Gemma-2 (softcap), Cohere (logit_scale) and Granite (logits_scaling): what their loss
paths score equals what the models' own ``model(...).logits`` give (see tests/test_model_families.py)."""
import copy
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from pydistill.integrations.trl import _head  # noqa: E402
from pydistill.integrations.trl.distillation import _distillation_compute_loss, _gkd_compute_loss  # noqa: E402
from pydistill.integrations.trl.grpo import fused_logps_and_entropies  # noqa: E402
from tests.helpers import count_head_reads  # noqa: E402
from tests.test_model_families import FAMILIES, _family  # noqa: E402

# left-padded prompts, right-padded completions, as TRL lays them out
PROMPT_IDS = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
COMPLETION_IDS = torch.tensor([[20, 21, 22, 23], [24, 25, 1, 1]])
COMPLETION_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


def _inputs(pad_id):
    """(TRL's prompt/completion inputs, the whole sequences' ids [B, L], their attention mask)."""
    prompt_ids = PROMPT_IDS.masked_fill(PROMPT_IDS == 0, pad_id)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=(PROMPT_IDS != 0).long(), completion_ids=COMPLETION_IDS,
                  completion_mask=COMPLETION_MASK)
    return inputs, torch.cat([prompt_ids, COMPLETION_IDS], 1), torch.cat([inputs["prompt_mask"], COMPLETION_MASK], 1)


def _models(family):
    """(student, teacher, tokenizer): the teacher is the student's weights moved well above float32 noise."""
    student, tok = _family(family)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    for model in (student, teacher):
        _head.install(model)
    return student, teacher, tok


def _completion_logprobs(model, ids, attention, keep, temperature=1.0):
    """log-softmax of ``model(...).logits / temperature`` at the positions predicting the last ``keep`` tokens."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double()
    return torch.log_softmax(logits[:, -keep - 1:-1] / temperature, -1)


def _kl(p, q):
    """KL(p || q) per token from log-probs."""
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_hook_scores_the_models_own_log_probs_and_entropies(family):
    model, _, tok = _models(family)
    inputs, ids, attention = _inputs(tok.pad_token_id)
    trainer = SimpleNamespace(temperature=0.7, accelerator=SimpleNamespace(autocast=nullcontext))
    logp, entropy, _ = fused_logps_and_entropies(trainer, model, ids, attention, 4, compute_entropy=True)
    want = _completion_logprobs(model, ids, attention, 4, 0.7)
    mask = COMPLETION_MASK.bool()
    torch.testing.assert_close(logp[mask].double(), want.gather(2, COMPLETION_IDS[..., None]).squeeze(-1)[mask],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entropy[mask].double(), -(want.exp() * want).sum(-1)[mask], rtol=1e-4, atol=1e-5)


def _distillation_trainer(teacher):
    """The attributes of TRL's DistillationTrainer that its loss reads: forward KL (beta 0) at temperature 0.8."""
    return SimpleNamespace(teacher_model=teacher, beta=0.0, temperature=0.8,
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                           _forward_redirection=lambda wrapper, original, method, *args: method(*args))


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_trainer_distils_the_models_own_distributions(family):
    """beta 0: TRL's generalized JSD is forward KL(teacher || student), at TRL's temperature, token mean."""
    student, teacher, tok = _models(family)
    trainer = _distillation_trainer(teacher)
    inputs, ids, attention = _inputs(tok.pad_token_id)
    loss, _, count = _distillation_compute_loss(trainer, student, inputs, None)
    kl = _kl(_completion_logprobs(teacher, ids, attention, 4, 0.8),
             _completion_logprobs(student, ids, attention, 4, 0.8))
    want = kl[COMPLETION_MASK.bool()].mean()
    assert int(count) == int(COMPLETION_MASK.sum()) and float(want) > 1e-3
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_gkd_trainer_distils_the_models_own_distributions(family):
    """beta 1: reverse KL(student || teacher), at temperature 1 (TRL's GKD loss), over the labelled tokens."""
    student, teacher, tok = _models(family)
    _, ids, attention = _inputs(tok.pad_token_id)
    labels = torch.cat([torch.full_like(PROMPT_IDS, -100), COMPLETION_IDS.masked_fill(COMPLETION_MASK == 0, -100)], 1)
    trainer = SimpleNamespace(teacher_model=teacher, beta=1.0)
    loss = _gkd_compute_loss(trainer, student, dict(input_ids=ids, attention_mask=attention, labels=labels))
    keep = ids.shape[1] - 1
    kl = _kl(_completion_logprobs(student, ids, attention, keep), _completion_logprobs(teacher, ids, attention, keep))
    valid = labels[:, 1:] != -100
    assert float(loss.detach()) == pytest.approx(float(kl[valid].mean()), rel=1e-4)


@pytest.mark.parametrize("student_family,teacher_cap", [("gemma2", None), ("gemma2", 5.0), ("llama", 3.0)],
                         ids=["cap-none", "cap-other-cap", "none-cap"])
def test_distillation_scores_the_teacher_with_its_own_softcap(student_family, teacher_cap):
    """A teacher whose final-logit softcap is not the student's (Gemma-2 student capped at 2 beside an uncapped or
    a 5-capped teacher; an uncapped Llama student beside a capped teacher): forward KL between the two models'
    own ``model(...).logits``."""
    student = _models(student_family)[0]
    _, teacher, tok = _models("gemma2")
    teacher.config.final_logit_softcapping = teacher_cap
    trainer = _distillation_trainer(teacher)
    inputs, ids, attention = _inputs(tok.pad_token_id)
    loss, _, _ = _distillation_compute_loss(trainer, student, inputs, None)
    kl = _kl(_completion_logprobs(teacher, ids, attention, 4, 0.8),
             _completion_logprobs(student, ids, attention, 4, 0.8))
    assert float(loss.detach()) == pytest.approx(float(kl[COMPLETION_MASK.bool()].mean()), rel=1e-4)


def test_a_distillation_step_reads_each_head_once(monkeypatch):
    """Under FSDP2 every read_head gathers the head's shards: DistillationTrainer's and GKD's losses read the
    student's and the teacher's once each."""
    student, teacher, tok = _models("gemma2")
    reads = count_head_reads(monkeypatch)
    trainer = SimpleNamespace(teacher_model=teacher, beta=0.5, temperature=0.8,
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                              _forward_redirection=lambda wrapper, original, method, *args: method(*args))
    inputs, ids, attention = _inputs(tok.pad_token_id)
    _distillation_compute_loss(trainer, student, inputs, None)[0].backward()
    assert sorted(reads) == sorted([id(student), id(teacher)])
    reads.clear()
    labels = torch.cat([torch.full_like(PROMPT_IDS, -100), COMPLETION_IDS.masked_fill(COMPLETION_MASK == 0, -100)], 1)
    _gkd_compute_loss(trainer, student, dict(input_ids=ids, attention_mask=attention, labels=labels)).backward()
    assert sorted(reads) == sorted([id(student), id(teacher)])
