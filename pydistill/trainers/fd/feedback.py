"""Feedback sources for Feedback Distillation: textual feedback on a student's attempt.

Every source is a callable ``source(prompt, attempt, answer) -> str | None`` (None: nothing to say).
``answer`` is the task's right final answer when the source may use it (verifiers); a critic must not leak it.
(``reference`` is the former name of that argument: a keyword call with it still works, warning once.)

- :class:`VerifierFeedback`: for arithmetic word problems and GSM8K, which step is wrong, what value it should
  have, and whether the final answer is right (``quote_attempt=False``: without repeating the attempt's wrong
  numbers).
- :class:`AttemptNumbersWithheld`: wraps any source and withholds the numbers only the attempt introduced.
- :class:`SolutionFeedback`: the task's worked solution as the feedback.
- :class:`ModelFeedback`: a critic model (a second model, or the student itself) prompted to critique the
  attempt without giving away the final answer; any leaked right answer is redacted.
- :class:`LeanFeedback`: writes the attempt to a .lean file, runs a local ``lean`` (or ``lake env lean``) with
  a timeout and turns the compiler's errors into feedback. Without a Lean binary it refuses at construction
  with a message that says so.

:func:`collect_feedback` runs a source over a batch and never lets a failure or a timeout crash a run: it
counts them in :class:`FeedbackStats` and returns None for those items.
"""
from __future__ import annotations

import math
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..._deprecated import renamed_keyword

FeedbackSource = Callable[[str, str, Optional[str]], Optional[str]]


class FeedbackUnavailable(RuntimeError):
    """A feedback source cannot run on this machine (e.g. no Lean binary)."""


@dataclass
class FeedbackStats:
    """Counts over the calls of one source: given feedback, nothing to say, failures and timeouts."""

    given: int = 0
    empty: int = 0
    failures: int = 0
    timeouts: int = 0
    errors: list = field(default_factory=list)  # the first few failure messages, for the logs

    def as_metrics(self, prefix: str = "feedback/") -> dict:
        return {f"{prefix}{k}": getattr(self, k) for k in ("given", "empty", "failures", "timeouts")}


def collect_feedback(source: FeedbackSource, items: Sequence[tuple], stats: Optional[FeedbackStats] = None):
    """Feedback for each ``(prompt, attempt, answer)`` in ``items``; a failing item gives None and is counted.

    A source with a ``batch(items)`` method (e.g. :class:`ModelFeedback`: one generate call) is called once
    for all items; if that call fails, each item is retried alone so one bad item costs only itself."""
    stats = stats if stats is not None else FeedbackStats()
    items = list(items)
    batched = None
    if hasattr(source, "batch") and items:
        try:
            batched = list(source.batch(items))
            if len(batched) != len(items):
                raise ValueError(f"batch() returned {len(batched)} replies for {len(items)} items")
        except Exception:  # retried item by item below, where each failure is counted
            batched = None
    out = []
    for i, (prompt, attempt, answer) in enumerate(items):
        try:
            text = batched[i] if batched is not None else source(prompt, attempt, answer)
        except subprocess.TimeoutExpired:
            stats.timeouts += 1
            text = None
        except Exception as exc:  # a feedback source is outside code: log it, keep training
            stats.failures += 1
            if len(stats.errors) < 5:
                stats.errors.append(f"{type(exc).__name__}: {exc}")
            text = None
        else:
            if text and text.strip():
                stats.given += 1
            else:
                stats.empty += 1
                text = None
        out.append(text)
    return out, stats


class VerifierFeedback:
    """Step-checking verifier for "a op b = c" reasoning (the embedded arithmetic task and GSM8K).

    ``quote_attempt`` (default True): the feedback quotes the attempt's wrong step and its wrong final answer
    ('The step "5 * 2 = 11" is wrong: 5 * 2 = 10, not 11. The final answer 11 is not correct.'). False: it
    states only what is right, never a number the attempt got wrong ('One step is wrong: it should read
    "5 * 2 = 10". The final answer is not correct.'), so a teacher reading it cannot copy the wrong values.
    ``state_answer``: an incorrect or missing final answer is followed by the right one ('The final answer
    should be 10.'), so the feedback names the right value of every error it reports.
    """

    def __init__(self, quote_attempt: bool = True, state_answer: bool = False):
        self.quote_attempt, self.state_answer = quote_attempt, state_answer

    @renamed_keyword("reference", "answer")
    def __call__(self, prompt: str, attempt: str, answer: Optional[str]) -> Optional[str]:
        from ...tasks import extract_answer, find_first_wrong_step

        parts = []
        error = find_first_wrong_step(attempt)
        if error is not None:
            if self.quote_attempt:
                parts.append(f'The step "{error.quote}" is wrong: {error.explanation}')
            else:
                left = error.quote.rsplit("=", 1)[0].strip()
                parts.append(f'One step is wrong: it should read "{left} = {error.expected}".')
        final = extract_answer(attempt)
        if answer is not None:
            if final is None:
                # in the student prompt's own answer format (prompts.STUDENT_INSTRUCTION), not another one
                parts.append('The attempt never states a final answer; end with "The answer is" and the number.')
            elif _same_number(final, answer):
                pass  # "The final answer is correct." is the same on every right attempt: it tells nothing
            elif self.quote_attempt:
                parts.append(f"The final answer {final} is not correct.")
            else:
                parts.append("The final answer is not correct.")
            if self.state_answer and (final is None or not _same_number(final, answer)):
                parts.append(f"The final answer should be {answer}.")
        return " ".join(parts) or None


_STANDALONE_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w]|\.\d)")


def without_attempt_numbers(feedback: Optional[str], attempt: str, question: str) -> Optional[str]:
    """``feedback`` with every standalone number that the attempt wrote and the question does not contain
    replaced by "[...]": the numbers only the attempt introduced (its results, right or wrong) are withheld,
    the question's own numbers stay."""
    if not feedback:
        return feedback
    from ...tasks import normalize_number

    def numbers(text):
        return {normalize_number(m.group(0)) for m in _STANDALONE_NUMBER.finditer(text)}

    withheld = numbers(attempt) - numbers(question)
    return _STANDALONE_NUMBER.sub(lambda m: "[...]" if normalize_number(m.group(0)) in withheld else m.group(0),
                                  feedback)


class AttemptNumbersWithheld:
    """Wraps any feedback source: its feedback passes through :func:`without_attempt_numbers`."""

    def __init__(self, source: FeedbackSource):
        self.source = source
        if hasattr(source, "batch"):
            self.batch = self._batch

    @renamed_keyword("reference", "answer")
    def __call__(self, prompt: str, attempt: str, answer: Optional[str]) -> Optional[str]:
        return without_attempt_numbers(self.source(prompt, attempt, answer), attempt, prompt)

    def _batch(self, items: Sequence[tuple]) -> list:
        replies = self.source.batch(items)
        return [without_attempt_numbers(r, a, p) for r, (p, a, _) in zip(replies, items)]


class SolutionFeedback:
    """The task's worked solution as the feedback (OPSD's privileged text inside Feedback Distillation's
    teacher context). ``solutions`` maps each question to its worked solution; the attempt is not read."""

    def __init__(self, solutions: dict):
        self.solutions = dict(solutions)

    @renamed_keyword("reference", "answer")
    def __call__(self, prompt: str, attempt: str, answer: Optional[str]) -> Optional[str]:
        if prompt not in self.solutions:
            raise KeyError(f"no worked solution for the question {prompt[:60]!r}")
        return f"A correct solution is:\n{self.solutions[prompt]}"


def _same_number(a: str, b: str) -> bool:
    from ...tasks import normalize_number, same_answer

    if normalize_number(a) is not None and normalize_number(b) is not None:
        return same_answer(normalize_number(a), normalize_number(b))
    return a.strip() == b.strip()


CRITIC_INSTRUCTION = (
    "You are a careful teacher. Read the problem and a student's attempt. Point out the first mistake in the "
    "attempt and what should be done instead, in two or three sentences. Do not state the final answer."
)


class ModelFeedback:
    """A critic model's feedback. ``generate`` maps rendered prompts to replies (e.g. the trainer's rollout engine
    at low temperature, over a second model or the student itself)."""

    def __init__(self, generate: Callable[[list[str]], list[str]], render: Callable[[str], str] = lambda s: s,
                 instruction: str = CRITIC_INSTRUCTION):
        self.generate = generate
        self.render = render
        self.instruction = instruction

    def prompt(self, prompt: str, attempt: str) -> str:
        return f"{self.instruction}\n\nProblem:\n{prompt}\n\nStudent's attempt:\n{attempt}"

    @renamed_keyword("reference", "answer")
    def __call__(self, prompt: str, attempt: str, answer: Optional[str]) -> Optional[str]:
        return self.batch([(prompt, attempt, answer)])[0]

    def batch(self, items: Sequence[tuple]) -> list[Optional[str]]:
        """One generate call for many items (what trainers use)."""
        replies = self.generate([self.render(self.prompt(p, a)) for p, a, _ in items])
        return [redact_answer(reply, answer).strip() or None for reply, (_, _, answer) in zip(replies, items)]


@renamed_keyword("reference", "answer")
def redact_answer(text: str, answer: Optional[str]) -> str:
    """Replace standalone occurrences of the right answer, so a critic cannot hand the teacher the result."""
    if not answer:
        return text
    return re.sub(rf"(?<![\d.]){re.escape(answer.strip())}(?![\d]|\.\d)", "[answer withheld]", text)


_LEAN_MESSAGE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+):\s*(?P<kind>error|warning)\s*:?\s*(?P<msg>.*)$")


def parse_lean_messages(output: str) -> list[dict]:
    """Lean 4 diagnostics (``file:line:col: error: message`` plus continuation lines) as dicts."""
    messages = []
    for raw in output.splitlines():
        match = _LEAN_MESSAGE.match(raw.strip())
        if match:
            messages.append(dict(line=int(match["line"]), col=int(match["col"]), kind=match["kind"],
                                 message=match["msg"].strip()))
        elif messages and raw.strip():
            messages[-1]["message"] += "\n" + raw.rstrip()
    return messages


class LeanFeedback:
    """Lean 4 compiler feedback. ``command`` defaults to ``lean`` on PATH, else ``lake env lean``.

    The attempt (with ``header``, e.g. ``import Mathlib``, prepended) is written to a fresh temporary folder and
    checked by :func:`run_contained`: its own process group (the whole group is killed on timeout), that
    folder as working directory, and CPU-time, address-space and file-size limits. Each error becomes a line
    of feedback with its position in the attempt.

    What this does NOT contain: the compiled text is the policy's raw output, and Lean's ``#eval`` and ``IO``
    can read and write any file the user running the trainer can, open network connections and start
    programs. The limits bound time and memory, not access. Run Lean feedback inside a container or VM
    without credentials or network when the policy is not trusted.
    """

    def __init__(self, command: Optional[Sequence[str]] = None, timeout: float = 60.0, header: str = "",
                 workdir: Optional[str] = None, max_errors: int = 3, memory_mb: int = 32768):
        if command is None:
            if shutil.which("lean"):
                command = ["lean"]
            elif shutil.which("lake"):
                command = ["lake", "env", "lean"]
            else:
                raise FeedbackUnavailable(
                    "LeanFeedback needs a Lean 4 toolchain: neither `lean` nor `lake` is on PATH. Install it "
                    "with elan (https://lean-lang.org) or pass command=[path/to/lean].")
        elif not shutil.which(command[0]) and not os.path.exists(command[0]):
            raise FeedbackUnavailable(f"LeanFeedback command {command[0]!r} was not found")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if not (isinstance(memory_mb, int) and memory_mb > 0):
            raise ValueError(f"memory_mb must be a positive integer, got {memory_mb!r}")
        self.command, self.timeout, self.header = list(command), timeout, header
        self.workdir, self.max_errors, self.memory_mb = workdir, max_errors, memory_mb

    @renamed_keyword("reference", "answer")
    def __call__(self, prompt: str, attempt: str, answer: Optional[str]) -> Optional[str]:
        header = self.header + ("\n" if self.header and not self.header.endswith("\n") else "")
        offset = header.count("\n")
        with tempfile.TemporaryDirectory(prefix="pydistill-lean-") as tmp:
            path = os.path.join(tmp, "Attempt.lean")
            with open(path, "w", encoding="utf-8") as f:
                f.write(header + attempt)
            # ``workdir`` (a Lake project, for `lake env lean`) is where Lean runs; the attempt stays in tmp.
            code, stdout, stderr = run_contained(self.command + [path], timeout=self.timeout,
                                                 cwd=self.workdir or tmp, memory_mb=self.memory_mb)
        errors = [m for m in parse_lean_messages(stdout + "\n" + stderr) if m["kind"] == "error"]
        if not errors:
            if code != 0:
                raise RuntimeError(f"lean exited with {code} and no diagnostics: {stderr[-300:]}")
            return "The proof compiles without errors."
        lines = [f"Line {m['line'] - offset}, column {m['col']}: {m['message']}" for m in errors[: self.max_errors]]
        more = len(errors) - len(lines)
        tail = f" ({more} more errors)" if more > 0 else ""
        return "The Lean compiler rejects the proof:\n" + "\n".join(lines) + tail


def _limits(cpu_seconds: int, memory_mb: int):
    def apply():  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        memory = memory_mb * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2 ** 20, 64 * 2 ** 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_contained(command: Sequence[str], *, timeout: float, cwd: str, memory_mb: int = 32768):
    """Run ``command`` in its own session and process group with CPU-time (``timeout``), address-space
    (``memory_mb``) and file-size (64 MB) limits; on timeout kill the whole group — children included — and
    raise :class:`subprocess.TimeoutExpired`. Returns (exit code, stdout, stderr)."""
    process = subprocess.Popen(list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                               preexec_fn=_limits(max(1, math.ceil(timeout)), memory_mb))
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise
    except BaseException:
        _kill_group(process)
        raise
    finally:
        # children that outlive a normal exit (e.g. a program started by #eval) go too
        _kill_group(process, wait=False)
    return process.returncode, stdout, stderr


def _kill_group(process, wait: bool = True):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if wait:
        try:
            process.communicate(timeout=5)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def __getattr__(name):
    from ..._deprecated import renamed

    return renamed(__name__, name, {"ReferenceSolutionFeedback": "SolutionFeedback"}, globals())
