"""Former names: each still works for a release and warns once, naming its replacement; removed ones say what
replaced them."""
import warnings

import pytest
import torch

from pydistill import _deprecated, token_stats
from pydistill.trainers import GRPOLoopConfig, GRPOLoopTrainer


@pytest.mark.parametrize("module_name", ["pydistill.trainers", "pydistill.trainers.grpo"])
def test_the_former_grpo_names_warn_once_and_are_the_loop_trainers(module_name, monkeypatch):
    import importlib

    module = importlib.import_module(module_name)
    monkeypatch.setattr(_deprecated, "_warned", set())
    with pytest.warns(FutureWarning, match="GRPOTrainer is renamed GRPOLoopTrainer"):
        assert module.GRPOTrainer is GRPOLoopTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert module.GRPOTrainer is GRPOLoopTrainer  # once only
    with pytest.warns(FutureWarning, match="GRPOConfig is renamed GRPOLoopConfig"):
        assert module.GRPOConfig is GRPOLoopConfig
    with pytest.raises(AttributeError, match="NoSuchTrainer"):
        module.NoSuchTrainer


def test_the_bundled_grpo_trainer_does_not_share_the_trl_drop_ins_name():
    pytest.importorskip("trl")
    from pydistill.integrations.trl import GRPOTrainer

    assert GRPOLoopTrainer.__name__ != GRPOTrainer.__name__ and GRPOTrainer.__name__ == "GRPOTrainer"


def test_the_removed_chunked_impl_names_its_replacement():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="'chunked' is now called 'torch'"):
        token_stats(hidden, weight, impl="chunked")


def test_the_boundarys_former_homes_still_import():
    from pydistill import boundary
    from pydistill.losses import stats
    from pydistill.model_head import logit_scale, softcap, unwrap

    assert (unwrap, logit_scale, softcap) == (boundary.unwrap, boundary.logit_scale, boundary.softcap)
    assert stats.sequence_token_stats is boundary.sequence_token_stats and stats.op_options is boundary.op_options


@pytest.mark.parametrize("config_name, field, old, new", [
    ("ROSDConfig", "privileged", "reference", "solution"),
    ("FDConfig", "feedback_content", "reference_solution", "solution"),
])
def test_the_former_worked_solution_values_warn_and_become_the_new_ones(config_name, field, old, new, monkeypatch):
    """"reference" means the KL's reference model only: the worked solution's option values say "solution"."""
    import pydistill.trainers as trainers

    monkeypatch.setattr(_deprecated, "_warned", set())
    with pytest.warns(FutureWarning, match=f"{field}='{old}' is renamed {field}='{new}'"):
        config = getattr(trainers, config_name)(**{field: old}).validate()
    assert getattr(config, field) == new


def test_the_eager_spelling_of_the_op_answers_to_its_former_names(monkeypatch):
    from pydistill.token_stats import eager
    from pydistill.trainers.fd import feedback

    monkeypatch.setattr(_deprecated, "_warned", set())
    hidden, weight, targets = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 4, 2])
    with pytest.warns(FutureWarning, match="impl='reference' is renamed impl='eager'"):
        old = token_stats(hidden, weight, targets=targets, impl="reference")
    assert torch.equal(old.logp, token_stats(hidden, weight, targets=targets, impl="eager").logp)
    with pytest.warns(FutureWarning, match="eager_token_stats"):
        from pydistill.token_stats.reference import reference_token_stats
    assert reference_token_stats is eager.eager_token_stats
    with pytest.warns(FutureWarning, match="SolutionFeedback"):
        assert feedback.ReferenceSolutionFeedback is feedback.SolutionFeedback


@pytest.mark.parametrize("module_name", ["pydistill.tasks", "pydistill.tasks.answers"])
def test_the_former_reference_answer_warns_once_and_is_solution_answer(module_name, monkeypatch):
    import importlib

    module = importlib.import_module(module_name)
    monkeypatch.setattr(_deprecated, "_warned", set())
    with pytest.warns(FutureWarning, match="reference_answer is renamed solution_answer"):
        assert module.reference_answer is module.solution_answer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert module.reference_answer("3 + 4 = 7\n#### 7") == "7"  # once only


def test_the_former_reference_keywords_warn_once_and_mean_the_new_ones(monkeypatch):
    """"reference" means the KL's reference model only: the worked solution and the right answer say so."""
    from pydistill.prompts import rosd_teacher_messages
    from pydistill.trainers.fd import feedback

    monkeypatch.setattr(_deprecated, "_warned", set())
    with pytest.warns(FutureWarning, match=r"rosd_teacher_messages\(reference=...\) is renamed task_solution="):
        old = rosd_teacher_messages("q", "3 + 4 = 7", None, reference=True)
    assert old == rosd_teacher_messages("q", "3 + 4 = 7", None, task_solution=True)
    assert old != rosd_teacher_messages("q", "3 + 4 = 7", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rosd_teacher_messages("q", "3 + 4 = 7", None, reference=True) == old  # once only
    verifier = feedback.VerifierFeedback(state_answer=True)
    with pytest.warns(FutureWarning, match=r"VerifierFeedback.__call__\(reference=...\) is renamed answer="):
        said = verifier("q", "3 + 4 = 8. The answer is 8.", reference="7")
    assert said == verifier("q", "3 + 4 = 8. The answer is 8.", answer="7") and "should be 7" in said
    with pytest.warns(FutureWarning, match=r"redact_answer\(reference=...\) is renamed answer="):
        assert feedback.redact_answer("it is 7", reference="7") == "it is [answer withheld]"
    with pytest.raises(TypeError, match="both answer= and its former name reference="):
        feedback.redact_answer("it is 7", answer="7", reference="7")
