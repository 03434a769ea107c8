"""Final-answer extraction and the arithmetic step checker, shared by the tasks."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # thousands commas only in groups of three
_NUMBER = r"-?\$?" + _DIGITS
_BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> Optional[str]:
    """'1,000' -> '1000', '$3.50' -> '3.5', '7.0' -> '7', '-2' -> '-2'; None if not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    if value == int(value):
        return str(int(value))
    return repr(round(value, 6)).rstrip("0").rstrip(".")


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a model output: the last \\boxed{...}, else "answer is X", else "#### X", else the
    last number in the text. Normalized with :func:`normalize_number`; None when there is no number."""
    for pattern in (_BOXED, _ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            number = _ANY_NUMBER.search(found[-1])
            if number:
                return normalize_number(number.group(0))
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def reference_answer(gsm8k_answer: str) -> str:
    """The number after '####' in a GSM8K reference solution."""
    found = _HASHES.search(gsm8k_answer)
    value = normalize_number(found.group(1)) if found else None
    if value is None:
        raise ValueError(f"no '#### <number>' final answer in: {gsm8k_answer[-80:]!r}")
    return value


def same_answer(a: Optional[str], b: Optional[str]) -> bool:
    if a is None or b is None:
        return False
    return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))


@dataclass(frozen=True)
class StepError:
    """The first arithmetic step of a text whose result is wrong."""

    char_start: int
    char_end: int
    quote: str
    expected: str
    explanation: str


_OPERAND = r"\$?" + _DIGITS
_OPERATOR = r"[-+*/x×÷]"
_STEP = re.compile(rf"(?<![\w.,$])({_OPERAND}(?:\s*{_OPERATOR}\s*{_OPERAND})+)\s*=\s*(-?{_OPERAND})")
_TOKENS = re.compile(rf"{_OPERAND}|{_OPERATOR}")


def _evaluate(expression: str) -> Optional[float]:
    """Left side of a step with the usual precedence; None if it cannot be evaluated (division by zero)."""
    parts = _TOKENS.findall(expression)
    values = [float(normalize_number(p)) for p in parts[0::2]]
    ops = [{"x": "*", "×": "*", "÷": "/"}.get(o, o) for o in parts[1::2]]
    terms, term_ops = [values[0]], []
    for op, value in zip(ops, values[1:]):
        if op in "*/":
            if op == "/" and value == 0:
                return None
            terms[-1] = terms[-1] * value if op == "*" else terms[-1] / value
        else:
            terms.append(value)
            term_ops.append(op)
    total = terms[0]
    for op, value in zip(term_ops, terms[1:]):
        total = total + value if op == "+" else total - value
    return total


def find_first_wrong_step(text: str) -> Optional[StepError]:
    """The first "a op b (op c ...) = d" in ``text`` whose arithmetic is wrong, with its character span.

    Operators + - * / x × ÷ with the usual precedence; numbers may carry '$' and thousands commas; GSM8K's
    calculator annotations <<a*b=c>> are steps too. None when every step checks out (or there is none).
    """
    for match in _STEP.finditer(text):
        value = _evaluate(match.group(1))
        stated = float(normalize_number(match.group(2)))
        if value is None:
            continue
        if abs(value - stated) > 1e-6 * max(1.0, abs(value)):
            expected = normalize_number(str(round(value, 6)))
            quote = match.group(0)
            return StepError(match.start(), match.end(), quote, expected,
                             f"{match.group(1).strip()} = {expected}, not {normalize_number(match.group(2))}.")
    return None
