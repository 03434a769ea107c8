"""Feedback Distillation as the author's TRL fork runs it (issue 29): only rollouts whose teacher context carries
information (feedback or a correct sibling) are distilled, and a correct attempt gets no constant "correct" note."""
import pytest
import torch

from pydistill.trainers.fd.feedback import VerifierFeedback
from tests.test_trainer_fd import RIGHT, WRONG, decoded_rows, make_trainer
from tests.trainer_helpers import count_op_rows

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


@pytest.mark.parametrize("options", [dict(), dict(quote_attempt=False), dict(quote_attempt=False, state_answer=True)])
def test_the_verifier_has_nothing_to_say_about_a_right_attempt(options):
    assert VerifierFeedback(**options)("q", RIGHT, "7") is None
    assert "correct" not in (VerifierFeedback(**options)("q", "3 + 4 = 8. The answer is 7.", "7") or "")
    assert VerifierFeedback(**options)("q", WRONG, "7")


def test_only_informative_rollouts_are_distilled(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)  # no sibling: the right attempt has no feedback, its teacher is the prompt
    prepared = trainer.prepare(trainer.train_pool[:1])
    trainer.finalize_batch([prepared])
    assert prepared["feedback"][0] is None and prepared["feedback"][1]
    right, wrong = decoded_rows(trainer, prepared["teacher"])
    assert "Notes on this problem" not in right and "Notes on this problem" in wrong
    mask = trainer.trained_mask(prepared)
    completion = prepared["groups"].student.completion_mask
    assert not mask[0].any() and torch.equal(mask[1], completion[1])
    assert prepared["tokens"] == int(completion[1].sum())
    rows = count_op_rows(monkeypatch)
    trainer.loss(prepared, float(prepared["tokens"])).loss.backward()
    assert rows == [int(completion[1].sum())]
    assert prepared["metrics"]["distilled_rollouts_share"] == 0.5


def test_a_correct_sibling_makes_a_rollout_informative(tmp_path):
    trainer = make_trainer(tmp_path, include_sibling=True, engine=None)
    prepared = trainer.prepare(trainer.train_pool[:1])
    # the right attempt has no other correct attempt in its group and no feedback; the wrong one has both
    mask = trainer.trained_mask(prepared)
    assert not mask[0].any() and mask[1].any()


def test_nothing_informative_is_an_exact_zero_step(tmp_path):
    trainer = make_trainer(tmp_path, feedback_source=lambda prompt, attempt, answer: None)
    prepared = trainer.prepare(trainer.train_pool[:1])
    assert prepared["tokens"] == 0 and not trainer.trained_mask(prepared).any()
    out = trainer.loss(prepared, 1.0)
    assert float(out.loss) == 0.0


def test_the_blend_reports_every_rollout_as_trained(tmp_path):
    trainer = make_trainer(tmp_path, distillation_weight=0.5)
    prepared = trainer.prepare(trainer.train_pool[:1])
    trainer.finalize_batch([prepared])
    assert prepared["metrics"]["distilled_rollouts_share"] == 1.0 and prepared["informative"].tolist() == [False, True]
