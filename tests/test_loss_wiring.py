"""Every trainer's wiring (issue 29, item 2): each config field that shapes the loss reaches the loss call, and
each teacher context holds its method's privileged information. The loss functions are wrapped, not replaced:
the recorded call still runs."""
import pytest
import torch

import pydistill.trainers.fd.trainer as fd_module
import pydistill.trainers.grpo.trainer as grpo_module
import pydistill.trainers.opsd.trainer as opsd_module
import pydistill.trainers.rosd.trainer as rosd_module
from pydistill.prompts import feedback_teacher_messages, opsd_teacher_messages, rosd_teacher_messages
from tests.test_trainer_fd import WRONG, decoded_rows
from tests.test_trainer_fd import make_trainer as fd_trainer
from tests.test_trainer_grpo import make_trainer as grpo_trainer
from tests.test_trainer_opsd import make_trainer as opsd_trainer
from tests.test_trainer_rosd import decode
from tests.test_trainer_rosd import make_trainer as rosd_trainer

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]


def record(monkeypatch, module, name):
    """Wrap ``module.name`` so that each call's positional and keyword arguments are kept."""
    calls, original = [], getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def run_loss(trainer, problems):
    prepared = [trainer.prepare(problems)]
    trainer.finalize_batch(prepared)
    out = trainer.loss(prepared[0], float(max(prepared[0]["tokens"], 1)))
    out.loss.backward()
    return prepared[0]


def teacher_context(tok, batch, row):
    """The decoded teacher context of ``row``, without the rollout tokens appended after it."""
    length = int(batch.attention_mask[row].sum()) - int(batch.completion_mask[row].sum())
    return decode(tok, batch.input_ids[row, :length])


# ----- the prompt builders put the privileged text in ------------------------------------------------------
def test_prompt_builders_hold_their_privileged_text():
    opsd = opsd_teacher_messages("Q?", "REFERENCE 3 + 4 = 7")[0]["content"]
    assert "Q?" in opsd and "REFERENCE 3 + 4 = 7" in opsd
    rosd = rosd_teacher_messages("Q?", "SIBLING", "EXPLANATION")[0]["content"]
    assert all(s in rosd for s in ("Q?", "SIBLING", "EXPLANATION"))
    fd = feedback_teacher_messages("Q?", "FEEDBACK", "SIBLING")[0]["content"]
    assert all(s in fd for s in ("Q?", "FEEDBACK", "SIBLING"))


# ----- OPSD --------------------------------------------------------------------------------------------------
def test_opsd_teacher_context_holds_the_reference_solution(tmp_path):
    trainer = opsd_trainer(tmp_path)
    problems = trainer.train_pool[:2]
    prepared = trainer.prepare(problems)
    for row, problem in enumerate(problems):
        teacher = teacher_context(trainer.tokenizer, prepared["teacher"], row)
        student = teacher_context(trainer.tokenizer, prepared["student"], row)
        assert problem.solution in teacher and problem.question in teacher
        assert problem.solution not in student


@pytest.mark.parametrize("fields", [
    dict(divergence="forward_kl", clip=0.07, temperature=0.9),
    dict(divergence="jsd", beta=0.3, clip=None, temperature=1.1, loss_temperature=1.0),
    dict(divergence="reverse_kl", clip=0.2, temperature=0.8)])
def test_opsd_config_reaches_the_loss(tmp_path, monkeypatch, fields):
    calls = record(monkeypatch, opsd_module, "distillation_loss")
    trainer = opsd_trainer(tmp_path, **fields)
    prepared = run_loss(trainer, trainer.train_pool[:2])
    (args, kwargs), = calls
    cfg = trainer.config
    want_temperature = cfg.temperature if cfg.loss_temperature is None else cfg.loss_temperature
    assert kwargs["divergence"] == cfg.divergence and kwargs["beta"] == cfg.beta and kwargs["clip"] == cfg.clip
    assert kwargs["temperature"] == want_temperature
    assert torch.equal(args[3], prepared["student"].completion_mask)


def test_opsd_loss_runs_at_the_sampling_temperature_by_default(tmp_path, monkeypatch):
    calls = record(monkeypatch, opsd_module, "sampled_token_distillation_loss")
    trainer = opsd_trainer(tmp_path, sampled_token=True)
    assert trainer.config.temperature == 1.1
    run_loss(trainer, trainer.train_pool[:2])
    assert calls[0][1]["temperature"] == 1.1


# ----- ROSD --------------------------------------------------------------------------------------------------
def test_rosd_teacher_context_holds_the_sibling_and_the_explanation(tmp_path):
    trainer = rosd_trainer(tmp_path, micro_batch_size=4)
    prepared = trainer.prepare(trainer.train_pool[:4])
    texts = trainer.engine.sample(trainer.engine.calls[0][0], trainer.sampling).texts
    for row, ((i, s), reflection) in enumerate(zip(prepared["pairs"], prepared["reflections"])):
        context = teacher_context(trainer.tokenizer, prepared["teacher"], row)
        assert trainer.train_pool[i // 4].question in context
        assert s is None or texts[s] in context
        assert reflection.explanation in context
        if reflection.quote:
            assert reflection.quote not in context.split(texts[s])[-1]  # the review names no quote


@pytest.mark.parametrize("fields", [
    dict(),
    dict(divergence="forward_kl", clip=0.1, importance_clip=1.5, temperature=0.7),
    dict(divergence="jsd", beta=0.2, importance_clip=None, temperature=0.9, loss_temperature=1.0)])
def test_rosd_config_reaches_the_loss(tmp_path, monkeypatch, fields):
    calls = record(monkeypatch, rosd_module, "distillation_loss")
    trainer = rosd_trainer(tmp_path, micro_batch_size=4, **fields)
    prepared = run_loss(trainer, trainer.train_pool[:4])
    (args, kwargs), = calls
    cfg = trainer.config
    assert (kwargs["divergence"], kwargs["beta"], kwargs["clip"]) == (cfg.divergence, cfg.beta, cfg.clip)
    assert kwargs["importance_clip"] == cfg.importance_clip
    assert kwargs["temperature"] == (cfg.temperature if cfg.loss_temperature is None else cfg.loss_temperature)
    assert torch.equal(args[3], prepared["mask"]) and not torch.equal(args[3], prepared["student"].completion_mask)


# ----- Feedback Distillation ---------------------------------------------------------------------------------
def test_fd_teacher_context_holds_the_feedback_and_the_sibling(tmp_path):
    trainer = fd_trainer(tmp_path, include_sibling=True)
    prepared = trainer.prepare(trainer.train_pool[:1])
    right, wrong = decoded_rows(trainer, prepared["teacher"])
    feedback = prepared["feedback"][1]
    assert feedback and feedback in wrong and trainer.train_pool[0].question in wrong
    assert wrong.count("The answer is 7.") == 1  # the sibling, before the rollout (which answers 11)
    assert WRONG.split(".")[0] not in wrong.split("<|im_start|>assistant")[0]  # the attempt itself is not quoted


@pytest.mark.parametrize("fields", [
    dict(),
    dict(divergence="forward_kl", clip=0.3, temperature=0.7, entropy_coef=0.01),
    dict(divergence="jsd", jsd_beta=0.2, temperature=0.9, loss_temperature=1.0, importance_clip=1.2),
])
def test_fd_config_reaches_the_loss(tmp_path, monkeypatch, fields):
    calls = record(monkeypatch, fd_module, "distillation_loss")
    trainer = fd_trainer(tmp_path, **fields)
    prepared = run_loss(trainer, trainer.train_pool[:1])
    (args, kwargs), = calls
    cfg = trainer.config
    assert (kwargs["divergence"], kwargs["beta"], kwargs["clip"]) == (cfg.divergence, cfg.jsd_beta, cfg.clip)
    assert kwargs["importance_clip"] == cfg.importance_clip and kwargs["entropy_coef"] == cfg.entropy_coef
    assert kwargs["temperature"] == (cfg.temperature if cfg.loss_temperature is None else cfg.loss_temperature)
    assert torch.equal(args[3], trainer.trained_mask(prepared)) and args[3].any()


def test_fd_blend_config_reaches_the_loss(tmp_path, monkeypatch):
    calls = record(monkeypatch, fd_module, "blended_loss")
    trainer = fd_trainer(tmp_path, distillation_weight=0.4, divergence="jsd", jsd_beta=0.3, clip=0.5,
                         temperature=0.8, epsilon=0.1, epsilon_high=0.3)
    run_loss(trainer, trainer.train_pool[:1])
    kwargs = calls[0][1]
    assert kwargs["distillation_weight"] == 0.4 and kwargs["beta"] == 0.3 and kwargs["clip"] == 0.5
    assert kwargs["divergence"] == "jsd" and kwargs["temperature"] == 0.8
    assert (kwargs["epsilon_low"], kwargs["epsilon_high"], kwargs["loss_type"]) == (0.1, 0.3, "dapo")


# ----- GRPO --------------------------------------------------------------------------------------------------
def test_grpo_config_reaches_the_loss(tmp_path, monkeypatch):
    calls = record(monkeypatch, grpo_module, "grpo_loss")
    trainer = grpo_trainer(tmp_path, epsilon=0.1, epsilon_high=0.25, loss_type="bnpo", beta=0.05,
                           entropy_coef=0.01, delta=2.0)
    run_loss(trainer, trainer.train_pool[:2])
    kwargs = calls[0][1]
    assert (kwargs["epsilon_low"], kwargs["epsilon_high"], kwargs["loss_type"]) == (0.1, 0.25, "bnpo")
    assert (kwargs["beta"], kwargs["entropy_coef"], kwargs["delta"]) == (0.05, 0.01, 2.0)
    assert kwargs["ref_logp"] is not None


@pytest.mark.parametrize("config", ["OPSDConfig", "ROSDConfig", "FDConfig"])
def test_a_bad_loss_temperature_is_one_clear_line(config):
    import pydistill.trainers as trainers

    with pytest.raises(ValueError, match=r"^loss_temperature must be > 0 or None \(the sampling temperature\), got 0$"):
        getattr(trainers, config)(loss_temperature=0).validate()


# ----- ExGRPO ------------------------------------------------------------------------------------------------
def test_exgrpo_config_reaches_the_loss(tmp_path, monkeypatch):
    import pydistill.trainers.exgrpo.trainer as exgrpo_module
    from pydistill.trainers.exgrpo import StageReference
    from tests.test_trainer_exgrpo import make_trainer as exgrpo_trainer

    policy = record(monkeypatch, exgrpo_module, "grpo_loss")
    sft = record(monkeypatch, exgrpo_module, "nll_loss")
    trainer = exgrpo_trainer(tmp_path, beta=0.2, sft_coef=0.5, epsilon=0.1, epsilon_high=0.3, delta=2.0,
                             entropy_coef=0.01, loss_type="bnpo")
    trainer.teacher = StageReference(trainer.model)  # what train() does when stage 2 starts
    prepared = trainer.prepare(trainer.train_pool)
    trainer.finalize_batch([prepared])
    out = trainer.loss(prepared, float(prepared["tokens"]))
    assert len(policy) == 1  # the public loss, once per micro-batch
    kwargs = policy[0][1]
    assert (kwargs["beta"], kwargs["epsilon_low"], kwargs["epsilon_high"]) == (0.2, 0.1, 0.3)
    assert (kwargs["delta"], kwargs["entropy_coef"], kwargs["loss_type"]) == (2.0, 0.01, "bnpo")
    assert kwargs["ref_logp"] is not None and kwargs["num_items_in_batch"] == float(prepared["tokens"])
    # the reference's log-probs and the auxiliary SFT term: nll_loss over the teacher dialogues' rows
    assert [call[1].get("num_items_in_batch") for call in sft] == [None, prepared["sft_items"]]
    assert float(out.loss) == pytest.approx(out.metrics["policy_loss"] + 0.5 * out.metrics["sft_loss"], rel=1e-5)
