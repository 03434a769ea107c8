"""Issue 16 regressions without a trainer: total parsers of model output, contained Lean runs, one-line config
errors in the CLI, and the losses' input checks."""
import os
import stat
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pydistill.cli import main
from pydistill.trainers.fd.feedback import LeanFeedback, VerifierFeedback, parse_lean_messages, redact_answer
from pydistill.losses import distillation_loss, group_advantages, grpo_loss
from pydistill.trainers.rosd.reflection import find_quote, parse_reflection
from pydistill.tasks import extract_answer, find_first_wrong_step, normalize_number, same_answer
from pydistill.trainers import GRPOLoopConfig, OPSDConfig

DEGENERATE = "1" * 400


# ----- 6. parsers of model output are total -----------------------------------------------------------------
def test_the_step_checker_survives_huge_numbers():
    error = find_first_wrong_step(f"{DEGENERATE} + 1 = 2. The answer is 2.")
    assert error is not None and error.expected == "1" * 399 + "2"
    assert find_first_wrong_step(f"2 + 2 = {DEGENERATE}").expected == "4"
    assert find_first_wrong_step(f"{DEGENERATE} * 0 = 0") is None
    assert extract_answer(f"The answer is {DEGENERATE}") == DEGENERATE and same_answer(DEGENERATE, DEGENERATE)
    assert find_first_wrong_step("1/3 = 0.3").expected == "0.333333"
    assert VerifierFeedback()("q", f"{DEGENERATE} - 1 = 5", "5")


ARITHMETIC_TEXT = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(
    [" + ", " - ", " * ", " / ", " x ", " = ", "=", "$", ",", ".", "-", "0", "7", "1,000", DEGENERATE, "\\boxed{",
     "}", "The answer is ", "####", "<first_error>", "</first_error>", "<explanation>", "</explanation>",
     "f.lean:3:4: error: ", "\n"])), max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(ARITHMETIC_TEXT, st.text(max_size=20))
def test_every_parser_of_model_output_is_total(text, other):
    find_first_wrong_step(text)
    answer = extract_answer(text)
    assert answer is None or normalize_number(answer) == answer
    same_answer(answer, other)
    normalize_number(text)
    parse_reflection(text)
    find_quote(text, other)
    parse_lean_messages(text)
    redact_answer(text, other)
    VerifierFeedback()(other, text, other)


# ----- 5. Lean runs are contained ------------------------------------------------------------------------
def _fake_lean(tmp_path, body):
    path = tmp_path / "lean"
    path.write_text("#!/usr/bin/env python3\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_lean_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    body = ("import os, subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '60'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(60)\n")
    source = LeanFeedback(command=[_fake_lean(tmp_path, body)], timeout=1.0)
    with pytest.raises(Exception) as info:
        source("p", "theorem x : True := trivial", None)
    assert type(info.value).__name__ == "TimeoutExpired"
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert _dead(child)  # the grandchild died with its group


def _dead(pid):
    """Gone, or a zombie waiting for a reaper (its parent was killed too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_lean_runs_in_a_temporary_folder_with_limits(tmp_path):
    body = ("import os, resource, sys\n"
            "print(os.getcwd(), resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_CPU)[0],"
            " os.getpgid(0) == os.getpid(), file=sys.stderr)\n"
            "print(sys.argv[1] + ':1:1: error: stop', file=sys.stderr)\n"
            "sys.exit(1)\n")
    seen = {}

    class Recording(LeanFeedback):
        pass

    source = Recording(command=[_fake_lean(tmp_path, body)], timeout=5, memory_mb=2048)
    import pydistill.trainers.fd.feedback as feedback

    real = feedback.run_contained

    def spy(*args, **kwargs):
        seen["result"] = real(*args, **kwargs)
        return seen["result"]

    feedback.run_contained, original = spy, feedback.run_contained
    try:
        assert "Line 1, column 1: stop" in source("p", "x", None)
    finally:
        feedback.run_contained = original
    cwd, memory, cpu, leader = seen["result"][2].splitlines()[0].split()
    assert "pydistill-lean-" in cwd and int(memory) == 2048 * 2 ** 20 and int(cpu) == 5 and leader == "True"


# ----- 8. config errors: one line, no traceback ----------------------------------------------------------
def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rate: [1e-4\nmax_steps: 3\n")
    assert "is not valid YAML at line" in _one_line_error(capsys, ["train", "opsd", "--config", str(bad_yaml)])
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text("resume: 'maybe'\n")
    assert "resume must be true or false, got 'maybe'" in _one_line_error(capsys, ["train", "opsd", "--config",
                                                                                   str(quoted)])
    assert "--time-budget-s: time_budget_s must be a finite number, got 'nan'" in _one_line_error(
        capsys, ["train", "opsd", "--time-budget-s", "nan"])
    assert "--temperature: temperature must be a finite number, got 'inf'" in _one_line_error(
        capsys, ["train", "opsd", "--temperature", "inf"])
    nan_yaml = tmp_path / "nan.yaml"
    nan_yaml.write_text("time_budget_s: .nan\n")
    assert "time_budget_s must be a finite number, got nan" in _one_line_error(
        capsys, ["train", "opsd", "--config", str(nan_yaml)])
    assert "model './no/such/model' is not a folder" in _one_line_error(
        capsys, ["train", "opsd", "--model", "./no/such/model"])
    a_file = tmp_path / "weights.bin"
    a_file.write_text("x")
    assert "is a file, not a folder" in _one_line_error(capsys, ["train", "grpo", "--init-from", str(a_file)])
    os.makedirs(tmp_path / "empty")
    assert "holds no checkpoint" in _one_line_error(capsys, ["train", "grpo", "--init-from",
                                                             str(tmp_path / "empty")])
    os.makedirs(tmp_path / "data")
    import socket

    attempts = []  # a path, not a hub name: no network lookup (and so no retries) may be tried for it
    real_connect = socket.socket.connect
    socket.socket.connect = lambda self, address: attempts.append(address) or real_connect(self, address)
    try:
        err = _one_line_error(capsys, ["train", "grpo", "--task", "gsm8k", "--data-path", os.path.relpath(
            tmp_path / "data" / "gsm8kk")])
    finally:
        socket.socket.connect = real_connect
    assert "does not exist" in err and not attempts


def test_yaml_values_are_parsed_by_field_type(tmp_path):
    from pydistill.cli import load_config

    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-4\nresume: 'false'\nmax_steps: '1e3'\nepsilon_high: null\n"
                      "teacher: ema\n")
    cfg = load_config(GRPOLoopConfig, str(config), {})
    assert cfg.learning_rate == 1e-4 and cfg.resume is False and cfg.max_steps == 1000 and cfg.epsilon_high is None
    with pytest.raises(ValueError, match="teacher must be one of 'fixed', 'ema', 'live', got 'frozen'"):
        load_config(OPSDConfig, None, {"teacher": "frozen"})
    with pytest.raises(ValueError, match="resume must be true or false, got 'false'"):
        OPSDConfig(resume="false").validate()  # a config built in Python gets no text parsing


def test_trl_field_names_are_accepted(tmp_path):
    from pydistill.cli import load_config

    config = tmp_path / "c.yaml"
    config.write_text("lr_scheduler_type: linear\nsave_steps: 5\n")
    cfg = load_config(GRPOLoopConfig, str(config), {"save_every": 7})  # a flag wins over the file
    assert cfg.lr_scheduler == "linear" and cfg.save_every == 7
    with pytest.raises(ValueError, match="save_steps .* and save_every are both set"):
        GRPOLoopConfig.from_dict(dict(save_steps=5, save_every=6))


def test_data_path_is_a_path_unless_written_as_a_hub_name(tmp_path, monkeypatch):
    from pydistill.tasks.gsm8k import resolve_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="does not exist .*for the datasets hub write hf://openai/gsm8k"):
        resolve_source("openai/gsm8k")
    assert resolve_source("hf://openai/gsm8k") == ("hub", "openai/gsm8k")
    os.makedirs("openai/gsm8k")
    assert resolve_source("openai/gsm8k") == ("local", "openai/gsm8k")


def test_gsm8k_record_without_question_is_one_line(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text('{"answer": "#### 3"}\n')
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 3"}\n')
    from pydistill.tasks import GSM8KTask

    with pytest.raises(ValueError, match=r"train.jsonl line 1: .*missing or not text: question"):
        GSM8KTask(str(tmp_path)).problems("train")


def test_help_lists_choices_and_field_help(capsys):
    assert main(["train", "opsd", "--help"]) == 0
    out = capsys.readouterr().out
    assert "{fixed,ema,live}" in out and "continue the run in output_dir" in out and "--overwrite" in out


# ----- 9. the losses' inputs -----------------------------------------------------------------------------
def _inputs(b=2, t=3, h=8, v=11):
    torch.manual_seed(0)
    hidden = torch.randn(b, t, h, requires_grad=True)
    return hidden, torch.randn(v, h), torch.randint(0, v, (b, t))


def test_losses_refuse_bad_coefficients_and_nonfinite_inputs():
    hidden, weight, targets = _inputs()
    adv = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got True"):
        grpo_loss(hidden, weight, targets, adv, beta=True, ref_logp=torch.zeros(2, 3))
    for coef in (float("nan"), -0.1):
        with pytest.raises(ValueError, match="entropy_coef must be a finite number >= 0"):
            grpo_loss(hidden, weight, targets, adv, entropy_coef=coef)
        with pytest.raises(ValueError, match="entropy_coef must be a finite number >= 0"):
            distillation_loss(hidden, weight, hidden.detach(), entropy_coef=coef)
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\], got True"):
        distillation_loss(hidden, weight, hidden.detach(), divergence="jsd", beta=True)
    with pytest.raises(ValueError, match="advantages holds 1 non-finite value"):
        grpo_loss(hidden, weight, targets, torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="old_logp holds 1 non-finite value"):
        old = torch.zeros(2, 3)
        old[0, 1] = float("nan")
        grpo_loss(hidden, weight, targets, adv, old_logp=old)
    with pytest.raises(ValueError, match="hidden is on the meta device"):
        grpo_loss(torch.empty(2, 3, 8, device="meta"), weight, targets, adv)


def test_group_advantages_of_nonfinite_and_empty_rewards():
    out = group_advantages(torch.tensor([1.0, float("inf"), 0.0, float("nan")]), 4)
    assert torch.isfinite(out.advantages).all()
    assert out.advantages[1] == 0 and out.advantages[3] == 0 and out.advantages[0] > 0 > out.advantages[2]
    empty = group_advantages(torch.zeros(0), 4)
    assert empty.advantages.shape == (0,) and empty.zero_spread_fraction == 0.0
