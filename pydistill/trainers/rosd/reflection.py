"""ROSD's reflection step: where does a rollout first go wrong, and why.

A reflector reads a problem, a correct sibling solution and a rollout and returns a :class:`Reflection`: the
exact quote where the rollout's reasoning first goes wrong and an explanation of the mistake and its fix (for
a correct rollout, an explanation of why it is right and no quote). Two reflectors:

- :class:`ModelReflector`: the student model itself (or any text generator), prompted to answer in a tagged
  format that :func:`parse_reflection` reads back.
- :class:`StepCheckReflector`: the programmatic step checker of a verifiable task (the first "a op b = c" whose
  result is wrong), which needs no model call.

:func:`first_error_token_index` turns the quote into t*, the number of rollout tokens before the quote, through
the tokenizer's character offsets. ROSD distills tokens t >= t*; an unparsable reply or a quote that cannot be
found falls back to t* = 0 (the whole rollout is distilled), and callers count those fallbacks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

REFLECTION_TAGS = ("first_error", "explanation")
NO_ERROR = "NONE"


@dataclass(frozen=True)
class Reflection:
    """A reflector's verdict on one rollout. ``quote`` is None for a correct rollout or a failed parse."""

    quote: Optional[str]
    explanation: str
    parsed: bool = True


def reflection_prompt(question: str, correct_solution: Optional[str], attempt: str, answer: str,
                      attempt_is_correct: bool) -> str:
    """The instruction the model reflector answers, in the project's own words. ``correct_solution`` None (a
    correct attempt that is its group's only success) leaves that section out: the attempt is not shown as its
    own reference."""
    if attempt_is_correct:
        task = (
            "The attempt below reaches the correct final answer. Explain briefly why its reasoning is right.\n"
            f"Reply exactly in this format:\n<first_error>{NO_ERROR}</first_error>\n<explanation>...</explanation>"
        )
    else:
        task = (
            "The attempt below reaches a wrong final answer. Find the first place where its reasoning goes wrong.\n"
            "Copy that place word for word from the attempt (a short quote, one step), then explain the mistake "
            "and how to fix it without simply stating the final answer.\n"
            "Reply exactly in this format:\n<first_error>exact quote from the attempt</first_error>\n"
            "<explanation>...</explanation>"
        )
    solution = f"A correct solution:\n{correct_solution}\n\n" if correct_solution else ""
    return (f"Problem:\n{question}\n\n{solution}The correct final answer is {answer}.\n\n"
            f"Attempt to review:\n{attempt}\n\n{task}")


def _tag(text: str, name: str) -> Optional[str]:
    # Last complete occurrence: models often restate the format before answering.
    found = re.findall(rf"<{name}>\s*(.*?)\s*</{name}>", text, flags=re.DOTALL | re.IGNORECASE)
    return found[-1] if found else None


def parse_reflection(reply: str) -> Reflection:
    """Read a tagged reply. A reply without both tags, or with an empty explanation, is a failed parse."""
    quote, explanation = _tag(reply, "first_error"), _tag(reply, "explanation")
    if quote is None or explanation is None or not explanation.strip():
        return Reflection(quote=None, explanation="", parsed=False)
    quote = quote.strip().strip("\"'`“”‘’").strip()
    if not quote or quote.upper() == NO_ERROR:
        quote = None
    return Reflection(quote=quote, explanation=explanation.strip(), parsed=True)


def _collapse_whitespace(text: str):
    """Text with each whitespace run turned into one space, and each kept character's original index."""
    chars, index = [], []
    previous_space = False
    for i, ch in enumerate(text):
        if ch.isspace():
            if previous_space:
                continue
            chars.append(" ")
            previous_space = True
        else:
            chars.append(ch)
            previous_space = False
        index.append(i)
    return "".join(chars), index


def find_quote(text: str, quote: str) -> Optional[int]:
    """Character offset of ``quote`` in ``text``: exact match first, then with whitespace runs collapsed and the
    quote stripped. The first occurrence wins (the first place the reasoning goes wrong). None if absent."""
    if not quote:
        return None
    at = text.find(quote)
    if at >= 0:
        return at
    flat_text, index = _collapse_whitespace(text)
    flat_quote, _ = _collapse_whitespace(quote.strip())
    at = flat_text.find(flat_quote) if flat_quote else -1
    if at < 0:
        return None
    return index[at]


def _decode(tokenizer, token_ids) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _prefix_length(tokenizer, token_ids: Sequence[int], k: int) -> int:
    """Characters of the decoded text reached by the first ``k`` tokens.

    A trailing incomplete multi-byte character decodes as U+FFFD and counts as reached, so the token holding
    the first bytes of the quote's first character belongs to the suffix.
    """
    return len(_decode(tokenizer, token_ids[:k]))


def first_error_token_index(tokenizer, token_ids: Sequence[int], quote: Optional[str]) -> Optional[int]:
    """t*: the number of tokens that end before the quote starts in the decoded rollout, or None if not found.

    The token that contains the quote's first character belongs to the distilled suffix. Covered lengths of
    token prefixes only grow, so a binary search needs O(log T) prefix decodes rather than one per token.
    """
    if quote is None:
        return None
    token_ids = list(token_ids)
    start = find_quote(_decode(tokenizer, token_ids), quote)
    if start is None:
        return None
    low, high = 0, len(token_ids)  # invariant: prefix of `low` tokens ends at or before `start`
    while low < high:
        mid = (low + high + 1) // 2
        if _prefix_length(tokenizer, token_ids, mid) <= start:
            low = mid
        else:
            high = mid - 1
    return low


class ModelReflector:
    """The student (or any model) as reflector. ``generate`` maps prompts to replies, e.g. a closure over the
    trainer's rollout engine at low temperature; prompts are chat-rendered by the caller's ``render``."""

    def __init__(self, generate: Callable[[list[str]], list[str]], render: Callable[[str], str] = lambda s: s):
        self.generate = generate
        self.render = render

    def reflect_batch(self, items: Sequence[dict]) -> list[Reflection]:
        """``items``: dicts with question, correct_solution, attempt, answer and attempt_is_correct."""
        prompts = [self.render(reflection_prompt(item["question"], item["correct_solution"], item["attempt"],
                                                 item["answer"], item["attempt_is_correct"])) for item in items]
        return [parse_reflection(reply) for reply in self.generate(prompts)]


class StepCheckReflector:
    """Programmatic reflector: the task's step checker marks the first wrong "a op b = c".

    Its explanations explain the mistake without stating the final answer, as the model reflector is told to.
    (Stating it was tested as a cause of ROSD's collapse on SmolLM2-135M and refuted: RESULTS.md, "ROSD/FD
    collapse: diagnosis".) Where it has nothing to say (a correct attempt, or a wrong one whose steps all check
    out) the explanation is empty and the teacher context has no reflection section: a canned sentence would
    be the same for every such rollout and tell the teacher nothing about it (issue 29)."""

    def __init__(self, task):
        self.task = task

    def reflect_batch(self, items: Sequence[dict]) -> list[Reflection]:
        out = []
        for item in items:
            if item["attempt_is_correct"]:
                out.append(Reflection(None, ""))
                continue
            error = self.task.first_error(item["problem"], item["attempt"])
            if error is None:  # counted as a fallback (t* = 0) by the trainer
                out.append(Reflection(None, "", parsed=False))
            else:
                out.append(Reflection(error.quote, error.explanation))
        return out
