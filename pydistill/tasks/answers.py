"""Final-answer extraction and the arithmetic step checker, shared by the tasks."""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # thousands commas only in groups of three
_NUMBER = r"-?\$?" + _DIGITS
_BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)
_TOLERANCE = Fraction(1, 10 ** 6)


# a bounded exponent: Fraction("1e999999999") would build a billion-digit integer
_DECIMAL = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d{1,3})?$")


def _fraction(text: str) -> Optional[Fraction]:
    """A plain decimal numeral (any length) as an exact fraction; None for anything else (inf, nan, 1e5)."""
    if not _DECIMAL.match(text):
        return None
    return Fraction(text)


def _format(value: Fraction) -> str:
    """An exact value rounded to 6 decimals, without trailing zeros: 3.5, -2, 0.333333."""
    rounded = round(value, 6)
    if rounded.denominator == 1:
        return str(rounded.numerator)
    sign = "-" if rounded < 0 else ""
    micro = abs(rounded.numerator * 10 ** 6 // rounded.denominator)
    return f"{sign}{micro // 10 ** 6}.{micro % 10 ** 6:06d}".rstrip("0").rstrip(".")


def normalize_number(text: str) -> Optional[str]:
    """'1,000' -> '1000', '$3.50' -> '3.5', '7.0' -> '7', '-2' -> '-2'; None if not a number. Exact for
    numerals of any length (a degenerate 400-digit sample is a number too, not a float overflow)."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    value = _fraction(cleaned)
    return None if value is None else _format(value)


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a model output: the last \\boxed{...}, else "answer is X", else "#### X", normalized
    with :func:`normalize_number`; None without one of these answer formats. Never "the last number in the
    text": that counted truncated rambles as correct, and ROSD then showed them to its teacher as the correct
    sibling (issue 29)."""
    for pattern in (_BOXED, _ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            number = _ANY_NUMBER.search(found[-1])
            if number:
                return normalize_number(number.group(0))
    return None


def solution_answer(gsm8k_solution: str) -> str:
    """The number after '####' in a GSM8K worked solution (``reference_answer`` is its former name)."""
    found = _HASHES.search(gsm8k_solution)
    value = normalize_number(found.group(1)) if found else None
    if value is None:
        raise ValueError(f"no '#### <number>' final answer in: {gsm8k_solution[-80:]!r}")
    return value


def same_answer(a: Optional[str], b: Optional[str]) -> bool:
    """Equal up to a relative 1e-6, compared exactly (no float overflow); False for anything not a number."""
    x = _fraction(a.strip()) if isinstance(a, str) else None
    y = _fraction(b.strip()) if isinstance(b, str) else None
    if x is None or y is None:
        return False
    return abs(x - y) <= _TOLERANCE * max(1, abs(y))


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


def _evaluate(expression: str) -> Optional[Fraction]:
    """Left side of a step with the usual precedence, exactly; None if it cannot be evaluated (division by
    zero, an operand that is not a number)."""
    parts = _TOKENS.findall(expression)
    values = [_fraction(p.replace(",", "").replace("$", "")) for p in parts[0::2]]
    if not values or any(v is None for v in values) or len(parts) % 2 == 0:
        return None
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
    Total: any string gives a verdict (arithmetic is exact, so numbers of any length are fine).
    """
    if not isinstance(text, str):
        return None
    for match in _STEP.finditer(text):
        value = _evaluate(match.group(1))
        stated = _fraction(match.group(2).replace(",", "").replace("$", ""))
        if value is None or stated is None:
            continue
        if abs(value - stated) > _TOLERANCE * max(1, abs(value)):
            expected = _format(value)
            quote = match.group(0)
            return StepError(match.start(), match.end(), quote, expected,
                             f"{match.group(1).strip()} = {expected}, not {normalize_number(match.group(2))}.")
    return None


def derives_answer(text: str, answer: str) -> bool:
    """Whether ``text`` shows its work: an arithmetic step "a op b = c" computes ``answer`` and no step is wrong.

    A text whose last number merely equals the answer ("The answer is 12.") is correct for the verifier but
    derives nothing; ROSD shows only derivations to its teacher (see ``pydistill.trainers.rosd``)."""
    if not isinstance(text, str) or find_first_wrong_step(text) is not None:
        return False
    for match in _STEP.finditer(text):
        value = _evaluate(match.group(1))
        if value is not None and same_answer(_format(value), answer):
            return True
    return False


def __getattr__(name):
    from .._deprecated import renamed

    return renamed(__name__, name, {"reference_answer": "solution_answer"}, globals())
