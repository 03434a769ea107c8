"""TRL versions and the drop-ins' log line: which TRL the integration accepts, how it refuses another (with
commands that install a tested one), the explicit opt-in for an untested TRL (warned once), and the one INFO line
each drop-in logs at construction to say the fused path is active."""
from __future__ import annotations

import functools
import logging
import re
import warnings

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

import transformers  # noqa: E402
import trl  # noqa: E402

import pydistill.integrations.trl as pydistill_trl
from pydistill.token_stats.loop import DEFAULT_MEMORY_BUDGET_MB  # noqa: E402
from pydistill.integrations.trl import _compat  # noqa: E402

from .trl_helpers import run_distillation, run_gkd, run_grpo, run_self_distillation  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = "PYDISTILL_ALLOW_UNTESTED_TRL"


@pytest.fixture
def fresh(monkeypatch):
    """No opt-in from the environment, and no untested version warned about yet in this process."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(_compat, "_warned", set())
    return monkeypatch


@pytest.mark.parametrize("version", ["1.16.0", "1.16.3", "1.16.1.dev0", "1.16.0.post1"])
def test_tested_versions_pass(fresh, version):
    fresh.setattr(trl, "__version__", version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        _compat.check_trl_version()


# 1.17's dev builds and release candidates sort below 1.17 and 1.16.0rc1 below 1.16: all untested.
@pytest.mark.parametrize("version", ["1.17.0", "1.17.0.dev0", "1.17.0rc1", "1.16.0rc1", "1.15.2", "2.0.0"])
def test_untested_versions_are_refused_with_working_commands(fresh, version):
    fresh.setattr(trl, "__version__", version)
    with pytest.raises(RuntimeError) as error:
        _compat.check_trl_version()
    message = str(error.value)
    assert f"the installed TRL is {version}" in message and ">=1.16,<1.17" in message
    assert "pip install 'trl>=1.16,<1.17'" in message  # quoted: a shell would redirect on > and <
    assert f"{ENV}=1" in message and "allow_untested_trl=True" in message


def test_the_install_command_installs_a_tested_version():
    """The refusal's command and TESTED_TRL name the same range, and it admits exactly the tested versions."""
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(re.search(r"'trl(.*)'", _compat.INSTALL_TESTED_TRL).group(1))
    assert spec == SpecifierSet(",".join(_compat.TESTED_TRL))
    for version in ("1.16.0", "1.16.5", "1.17.0", "1.17.0rc1", "1.15.9"):
        assert spec.contains(version) == _compat.is_tested(version)


@pytest.mark.parametrize("how", ["env", "argument"])
def test_opt_in_lets_an_untested_trl_through_warned_once(fresh, how):
    fresh.setattr(trl, "__version__", "1.17.0rc1")
    if how == "env":
        fresh.setenv(ENV, "1")
    allow = True if how == "argument" else None
    with pytest.warns(UserWarning, match="untested TRL 1.17.0rc1") as record:
        _compat.check_trl_version(allow)
        _compat.check_trl_version(allow)
    assert len([w for w in record if "untested TRL" in str(w.message)]) == 1


def test_opt_in_needs_an_explicit_yes(fresh):
    fresh.setattr(trl, "__version__", "1.17.0")
    fresh.setenv(ENV, "0")
    with pytest.raises(RuntimeError, match="installed TRL is 1.17.0"):
        _compat.check_trl_version()
    fresh.setenv(ENV, "1")
    with pytest.raises(RuntimeError, match="installed TRL is 1.17.0"):  # an explicit False beats the environment
        _compat.check_trl_version(False)


def test_trainer_and_patch_take_the_opt_in(fresh, tmp_path):
    fresh.setattr(trl, "__version__", "1.17.0.dev0")
    with pytest.raises(RuntimeError, match="installed TRL is 1.17.0.dev0"):
        run_grpo(pydistill_trl.GRPOTrainer, tmp_path / "refused", max_steps=1)
    fresh.setattr(transformers.Trainer, "train", lambda self, *a, **k: None)  # construction is what is tested
    with pytest.warns(UserWarning, match="untested TRL 1.17.0.dev0"):
        trainer = run_grpo(functools.partial(pydistill_trl.GRPOTrainer, allow_untested_trl=True), tmp_path / "ours")[2]
    assert isinstance(trainer, trl.GRPOTrainer)
    built = run_grpo(trl.GRPOTrainer, tmp_path / "trl")[2]
    with pytest.raises(RuntimeError, match="installed TRL is 1.17.0.dev0"):
        pydistill_trl.patch(built)
    pydistill_trl.patch(built, allow_untested_trl=True)


def _fused_lines(caplog):
    return [r for r in caplog.records if r.name.startswith("pydistill") and "runs the fused op" in r.getMessage()]


@pytest.mark.parametrize("kind, op", [
    ("grpo", "log-prob and entropy of the sampled tokens"),
    ("distillation", "generalized JSD beta=0.5 teacher-student divergence"),
    ("gkd", "reverse KL teacher-student divergence"),
    ("sdft", "generalized JSD beta=0.5 teacher-student divergence"),
    ("sdpo", "sampled-token log-probs of both contexts"),
    ("patch", "log-prob and entropy of the sampled tokens"),
    ("patch-512", "log-prob and entropy of the sampled tokens"),
])
def test_each_drop_in_logs_one_line_at_construction(fresh, tmp_path, caplog, kind, op):
    fresh.setattr(transformers.Trainer, "train", lambda self, *a, **k: None)  # construction is what is tested
    with caplog.at_level(logging.INFO, logger="pydistill"):
        if kind == "grpo":
            trainer = run_grpo(pydistill_trl.GRPOTrainer, tmp_path)[2]
        elif kind == "patch":
            trainer = run_grpo(trl.GRPOTrainer, tmp_path, patch=pydistill_trl.patch)[2]
        elif kind == "patch-512":
            trainer = run_grpo(trl.GRPOTrainer, tmp_path,
                               patch=lambda t: pydistill_trl.patch(t, memory_budget_mb=512))[2]
        elif kind == "distillation":
            trainer = run_distillation(pydistill_trl.DistillationTrainer, tmp_path)[2]
        elif kind == "gkd":
            trainer = run_gkd(pydistill_trl.GKDTrainer, tmp_path, beta=1.0)[2]
        else:
            cls = pydistill_trl.SDFTTrainer if kind == "sdft" else pydistill_trl.SDPOTrainer
            options = dict(distillation_mode="sampled_token", distillation_alpha=1.0) if kind == "sdpo" else {}
            trainer = run_self_distillation(kind, cls, tmp_path, **options)[2]
    lines = [r.getMessage() for r in _fused_lines(caplog)]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"pydistill: {type(trainer).__name__} runs the fused op ({op})")
    budget = 512 if kind == "patch-512" else DEFAULT_MEMORY_BUDGET_MB
    assert "impl=auto -> torch on cpu" in lines[0] and f"memory budget {budget:g} MB per call" in lines[0]
