"""Feedback sources: Lean adapter (against a fake executable), model critic, failure accounting."""
import os
import stat
import sys
import textwrap

import pytest

from pydistill.trainers.fd.feedback import (FeedbackStats, FeedbackUnavailable, LeanFeedback, ModelFeedback,
                                            VerifierFeedback, collect_feedback, parse_lean_messages, redact_answer)

LEAN_OUTPUT = """{path}:3:2: error: unknown identifier 'foo'
{path}:5:10: error: type mismatch
  h
has type
  a = b : Prop
{path}:7:0: warning: declaration uses 'sorry'
"""


def _fake_lean(tmp_path, body):
    script = tmp_path / "fake_lean"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_lean_feedback_turns_errors_into_text(tmp_path):
    fake = _fake_lean(tmp_path, f"""
        import sys
        src = open(sys.argv[1]).read()
        assert src.startswith("import Mathlib\\n"), src
        print({LEAN_OUTPUT!r}.format(path=sys.argv[1]), end="")
        sys.exit(1)
    """)
    source = LeanFeedback(command=[fake], timeout=10, header="import Mathlib")
    text = source("prove it", "theorem t : 1 = 1 := by\n  foo", None)
    assert text.startswith("The Lean compiler rejects the proof:")
    assert "Line 2, column 2: unknown identifier 'foo'" in text  # header line removed from the count
    assert "Line 4, column 10: type mismatch\n  h\nhas type" in text
    assert "sorry" not in text  # warnings are not errors


def test_lean_feedback_success_and_silent_crash(tmp_path):
    ok = LeanFeedback(command=[_fake_lean(tmp_path, "import sys; sys.exit(0)\n")], timeout=10)
    assert ok("p", "theorem t : True := trivial", None) == "The proof compiles without errors."
    crash_dir = tmp_path / "c"
    crash_dir.mkdir()
    crash = LeanFeedback(command=[_fake_lean(crash_dir, "import sys; sys.exit(3)\n")], timeout=10)
    texts, stats = collect_feedback(crash, [("p", "a", None)])
    assert texts == [None] and stats.failures == 1 and "exited with 3" in stats.errors[0]


def test_lean_timeout_is_counted_not_raised(tmp_path):
    slow = LeanFeedback(command=[_fake_lean(tmp_path, "import time; time.sleep(30)\n")], timeout=0.5)
    texts, stats = collect_feedback(slow, [("p", "a", None), ("p", "b", None)])
    assert texts == [None, None] and stats.timeouts == 2 and stats.failures == 0


def test_missing_lean_binary_says_so(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FeedbackUnavailable, match="neither `lean` nor `lake` is on PATH"):
        LeanFeedback()
    with pytest.raises(FeedbackUnavailable, match="was not found"):
        LeanFeedback(command=["/no/such/lean"])


def test_parse_lean_messages():
    msgs = parse_lean_messages(LEAN_OUTPUT.format(path="/tmp/A.lean"))
    assert [(m["line"], m["col"], m["kind"]) for m in msgs] == [(3, 2, "error"), (5, 10, "error"), (7, 0, "warning")]
    assert msgs[1]["message"].startswith("type mismatch\n  h")


def test_model_feedback_batches_and_redacts():
    calls = []

    def generate(prompts):
        calls.append(prompts)
        return ["Step 2 is wrong; the total is 42, not 40.", "   ", "You forgot 4.2 and 142."]

    critic = ModelFeedback(generate, render=lambda s: "<c>" + s)
    out = critic.batch([("Q1", "A1", "42"), ("Q2", "A2", "7"), ("Q3", "A3", "42")])
    assert len(calls) == 1 and calls[0][0].startswith("<c>") and "Do not state the final answer" in calls[0][0]
    assert out[0] == "Step 2 is wrong; the total is [answer withheld], not 40."
    assert out[1] is None
    assert out[2] == "You forgot 4.2 and 142."  # 42 inside other numbers is left alone


def test_redact_answer_keeps_other_numbers():
    assert redact_answer("42. Then 42.5 and 1420", "42") == "[answer withheld]. Then 42.5 and 1420"
    assert redact_answer("no answer", None) == "no answer"


def test_collect_feedback_counts():
    def source(prompt, attempt, answer):
        if attempt == "boom":
            raise ValueError("bad")
        return "" if attempt == "quiet" else f"fix {attempt}"

    texts, stats = collect_feedback(source, [("p", "x", None), ("p", "boom", None), ("p", "quiet", None)])
    assert texts == ["fix x", None, None]
    assert stats.as_metrics() == {"feedback/given": 1, "feedback/empty": 1, "feedback/failures": 1,
                                  "feedback/timeouts": 0}
    assert isinstance(stats, FeedbackStats) and stats.errors == ["ValueError: bad"]


def test_verifier_feedback_names_the_wrong_step_and_the_answer():
    verify = VerifierFeedback()
    text = verify("q", "Tom has 3 + 4 = 8 apples, 8 * 2 = 16. The answer is 16.", "14")
    assert text == 'The step "3 + 4 = 8" is wrong: 3 + 4 = 7, not 8. The final answer 16 is not correct.'
    assert verify("q", "3 + 4 = 7. The answer is 7.", "7") is None  # nothing the teacher could use
    assert verify("q", "I am not sure.", "7") == ('The attempt never states a final answer; end with "The answer '
                                                  'is" and the number.')
    assert verify("q", "2 * 3 = 6 so the answer is 6", None) is None  # nothing wrong, no answer to compare
    # GSM8K-style calculator annotations are steps too
    assert "48/2 = 24, not 25" in verify("q", "She sold 48/2 = <<48/2=25>>25 clips.", "72")


def test_collect_feedback_batches_and_falls_back_per_item():
    calls = []

    class Source:
        def __call__(self, prompt, attempt, answer):
            calls.append(attempt)
            if attempt == "bad":
                raise ValueError("cannot read")
            return f"about {attempt}"

        def batch(self, items):
            calls.append("batch")
            if any(a == "bad" for _, a, _ in items):
                raise RuntimeError("batch failed")
            return [f"batched {a}" for _, a, _ in items]

    texts, stats = collect_feedback(Source(), [("p", "x", None), ("p", "y", None)])
    assert texts == ["batched x", "batched y"] and calls == ["batch"] and stats.given == 2
    calls.clear()
    texts, stats = collect_feedback(Source(), [("p", "x", None), ("p", "bad", None)])
    assert texts == ["about x", None] and calls == ["batch", "x", "bad"]
    assert (stats.given, stats.failures) == (1, 1) and stats.errors == ["ValueError: cannot read"]
