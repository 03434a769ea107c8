"""A procedural Explanatory Inversion teacher for the embedded arithmetic task: probes written by rule, no model.

Every arithmetic question is a story — "<name> has <n> <items>.", one sentence per operation (buys b more,
gives away b, becomes k times as many, shares equally among k friends), then "How many ...?" — which
:func:`parse_story` reads back into a :class:`Story`. From that structure each of the ten Explanatory
Inversion rules (:data:`pydistill.trainers.exgrpo.explanatory_inversion.EI_RULES`) writes a probe where it
applies:

- counterfactual: the same story with another starting amount;
- decomposition: the story stopped before its last operation (stories of 2+ steps);
- explanation_challenge: which number one step of the solution gives, with the sentence it comes from;
- reverse_reasoning: the final amount given, the starting amount asked (inverse operations, last to first);
- causal_reinforcement: the story with one operation left out;
- analogy: the same numbers and operations with another person and item;
- generalization: the starting amount and every added or removed amount doubled (the answer doubles);
- error_diagnosis: a solution with one wrong result, the corrected final answer asked;
- constraint_variation: one more event at the end (buys m more; after sharing, each friend finds m more);
- step_ordering: only the first half of the operations (stories of 3+ steps).

Each probe comes with a solution in the student's own answer format ("a op b = c. The answer is z.") and its
answer, and is kept only if it verifies: the solution's every "a op b = c" step is right, its final answer is
the probe's answer, and a rule-specific check passes (story probes are parsed back and solved again, a reverse
probe's answer replayed forward gives the stated final amount, an error-diagnosis probe's quoted solution has
a wrong step). Probes are deterministic given (question, rule, seed).

:class:`ProceduralTeacher` plugs into ExGRPO's stage 0 (``ei_teacher="procedural"``): its :meth:`ei_data`
replaces the model-written probes, and, called as a text generator, it answers a question by rule — so the
EI-consistency filter, which asks the teacher to answer the original question after a probe, keeps exactly
the verified probes. The difficulty filter still asks the base student.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from .explanatory_inversion import EI_RULES, EIData, Rule
from ...tasks.answers import extract_answer, find_first_wrong_step, same_answer

NAMES = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ivy", "Ben", "Zoe", "Max", "Eva", "Leo", "Ada"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells", "cards", "beads"]
_INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}


def _apply(a: int, op: str, b: int) -> Optional[int]:
    """a op b on whole amounts; None when the result is not a whole, non-negative amount."""
    if op == "/":
        return a // b if b > 0 and a % b == 0 else None
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return value if value >= 0 else None


@dataclass(frozen=True)
class Story:
    """A starting amount of ``item`` held by ``name`` and a chain of (op, operand) applied to it."""

    name: str
    item: str
    start: int
    steps: tuple  # ((op, operand), ...) with op in + - * /

    def values(self) -> Optional[list]:
        """Running amounts, the start first; None if some step leaves whole, non-negative amounts."""
        out = [self.start]
        for op, b in self.steps:
            value = _apply(out[-1], op, b)
            if value is None:
                return None
            out.append(value)
        return out

    @property
    def shared(self) -> bool:
        return any(op == "/" for op, _ in self.steps)

    def answer(self) -> Optional[int]:
        values = self.values()
        return None if values is None else values[-1]

    def solution(self) -> str:
        """The worked solution in the student's answer format."""
        values = self.values()
        if not self.steps:
            return f"{self.name} keeps the {self.start} {self.item}. The answer is {self.start}."
        steps = " ".join(f"{a} {op} {b} = {c}." for a, (op, b), c in zip(values, self.steps, values[1:]))
        return f"{steps} The answer is {values[-1]}."

    def sentence(self, index: int) -> str:
        op, b = self.steps[index]
        after_sharing = any(o == "/" for o, _ in self.steps[:index])
        if op == "+":
            return f"Each friend then finds {b} more {self.item}." if after_sharing else \
                f"Then {self.name} buys {b} more {self.item}."
        if op == "-":
            return f"Then {self.name} gives away {b} {self.item}."
        if op == "*":
            return f"Then the number of {self.item} becomes {b} times as many."
        return f"{self.name} shares the {self.item} equally among {b} friends, who each keep their share."

    def text(self) -> str:
        ask = f"How many {self.item} does each friend get?" if self.shared else \
            f"How many {self.item} does {self.name} have now?"
        return " ".join([f"{self.name} has {self.start} {self.item}."]
                        + [self.sentence(i) for i in range(len(self.steps))] + [ask])


_FIRST = re.compile(r"^(\w+) has (\d+) (\w+)\.$")


def parse_story(question: str) -> Story:
    """The :class:`Story` of an arithmetic question (its last line, so a probe's lead-in line is skipped).
    Raises ValueError naming the sentence that does not parse."""
    line = question.strip().split("\n")[-1]
    sentences = re.findall(r"[^.?]+[.?]", line)
    if len(sentences) < 2:
        raise ValueError(f"not an arithmetic story: {line[:80]!r}")
    first = _FIRST.match(sentences[0].strip())
    if not first:
        raise ValueError(f"cannot read the starting amount from {sentences[0].strip()!r}")
    name, start, item = first.group(1), int(first.group(2)), first.group(3)
    steps = []
    for raw in sentences[1:-1]:
        s = raw.strip()
        numbers = re.findall(r"\d+", s)
        if len(numbers) != 1:
            raise ValueError(f"expected one number in the sentence {s!r}")
        b = int(numbers[0])
        if "times as many" in s:
            steps.append(("*", b))
        elif "equally among" in s:
            steps.append(("/", b))
        elif " more " in f" {s} ":
            steps.append(("+", b))
        elif any(verb in s for verb in ("gives away", "loses", "uses")):
            steps.append(("-", b))
        else:
            raise ValueError(f"cannot read the operation of the sentence {s!r}")
    if not sentences[-1].strip().startswith("How many"):
        raise ValueError(f"the story does not end with a question: {sentences[-1].strip()!r}")
    return Story(name, item, start, tuple(steps))


@dataclass(frozen=True)
class Probe:
    rule: str
    text: str  # the probe as the student reads it
    solution: str  # the teacher's solution, in the student's answer format
    answer: str
    check: str  # how the answer is verified beyond the solution's own steps: story | reverse | diagnosis | explain

    def as_dict(self) -> dict:
        return dict(rule=self.rule, probe=self.text, probe_solution=self.solution, probe_answer=self.answer)


def _story_probe(rule: str, lead: str, story: Story) -> Optional[Probe]:
    answer = story.answer()
    if answer is None:
        return None
    return Probe(rule, f"{lead}\n{story.text()}", story.solution(), str(answer), "story")


def counterfactual(story: Story, rng: random.Random) -> Optional[Probe]:
    shifts = [d for d in range(-5, 8) if d and story.start + d >= 2]
    rng.shuffle(shifts)
    for d in shifts:
        changed = replace(story, start=story.start + d)
        if changed.answer() is not None:
            return _story_probe("counterfactual", f"What if {story.name} had started with "
                                                  f"{story.start + d} {story.item} instead of {story.start}?", changed)
    return None


def decomposition(story: Story, rng: random.Random) -> Optional[Probe]:
    if len(story.steps) < 2:
        return None
    return _story_probe("decomposition", "Stop the story before its last event.", replace(story,
                                                                                        steps=story.steps[:-1]))


def explanation_challenge(story: Story, rng: random.Random) -> Optional[Probe]:
    values = story.values()
    if not story.steps or values is None:
        return None
    j = rng.randrange(len(story.steps))
    (op, b), a, c = story.steps[j], values[j], values[j + 1]
    text = (f"{story.text()}\nThe sentence \"{story.sentence(j)}\" turns {a} {story.item} into a new amount with "
            f"the operation {op} {b}. Why that operation, and what is the new amount?")
    return Probe("explanation_challenge", text, f"{a} {op} {b} = {c}. The answer is {c}.", str(c), "explain")


def reverse_reasoning(story: Story, rng: random.Random) -> Optional[Probe]:
    values = story.values()
    if not story.steps or values is None:
        return None
    end = values[-1]
    holder = "each friend" if story.shared else story.name
    sentences = " ".join(story.sentence(i) for i in range(len(story.steps)))
    text = (f"{story.name} has some {story.item}. {sentences} In the end {holder} has {end} {story.item}. "
            f"How many {story.item} did {story.name} have at the start?")
    steps = [f"{c} {_INVERSE[op]} {b} = {a}." for a, (op, b), c in
             reversed(list(zip(values, story.steps, values[1:])))]
    return Probe("reverse_reasoning", text, " ".join(steps) + f" The answer is {story.start}.", str(story.start),
                 "reverse")


def causal_reinforcement(story: Story, rng: random.Random) -> Optional[Probe]:
    order = list(range(len(story.steps)))
    rng.shuffle(order)
    for j in order:
        skipped = replace(story, steps=story.steps[:j] + story.steps[j + 1:])
        if skipped.answer() is not None:
            return _story_probe("causal_reinforcement", f"What if this had not happened: \"{story.sentence(j)}\"?",
                                skipped)
    return None


def analogy(story: Story, rng: random.Random) -> Optional[Probe]:
    name = rng.choice([n for n in NAMES if n != story.name])
    item = rng.choice([i for i in ITEMS if i != story.item])
    return _story_probe("analogy", "The same kind of problem in another setting.", replace(story, name=name,
                                                                                           item=item))


def generalization(story: Story, rng: random.Random) -> Optional[Probe]:
    doubled = replace(story, start=2 * story.start,
                      steps=tuple((op, 2 * b if op in "+-" else b) for op, b in story.steps))
    original = story.answer()
    probe = _story_probe("generalization", "The same problem with the starting amount and every amount added or "
                                           "taken away doubled.", doubled)
    # Scaling the start and every added/removed amount scales the whole chain: a second, independent check.
    return probe if probe is not None and original is not None and int(probe.answer) == 2 * original else None


def error_diagnosis(story: Story, rng: random.Random) -> Optional[Probe]:
    values = story.values()
    if not story.steps or values is None:
        return None
    slips = [(j, d) for j in range(len(story.steps)) for d in (-2, -1, 1, 2)]
    rng.shuffle(slips)
    for j, d in slips + [(len(story.steps) - 1, 1)]:  # a slip in the last step always makes a solution
        shown = _slipped_solution(story, values, j, d)
        if shown is not None:
            text = (f"{story.text()}\nA student wrote: \"{shown}\" One step of this solution is wrong. "
                    f"What is the correct final answer?")
            return Probe("error_diagnosis", text, story.solution(), str(values[-1]), "diagnosis")
    return None


def _slipped_solution(story: Story, values: list, j: int, d: int) -> Optional[str]:
    """The solution with step j's result off by d and correct arithmetic from there on (None: not whole)."""
    parts, current = [], values[0]
    for i, (op, b) in enumerate(story.steps):
        result = values[j + 1] + d if i == j else _apply(current, op, b)
        if result is None or result < 0:
            return None
        parts.append(f"{current} {op} {b} = {result}.")
        current = result
    return " ".join(parts) + f" The answer is {current}."


def constraint_variation(story: Story, rng: random.Random) -> Optional[Probe]:
    extra = rng.randint(2, 9)
    return _story_probe("constraint_variation", "The same problem with one more event at the end.",
                        replace(story, steps=story.steps + (("+", extra),)))


def step_ordering(story: Story, rng: random.Random) -> Optional[Probe]:
    if len(story.steps) < 3:
        return None
    return _story_probe("step_ordering", "Only the first half of the story's events happen.",
                        replace(story, steps=story.steps[:len(story.steps) // 2]))


WRITERS = {f.__name__: f for f in (counterfactual, decomposition, explanation_challenge, reverse_reasoning,
                                   causal_reinforcement, analogy, generalization, error_diagnosis,
                                   constraint_variation, step_ordering)}
assert set(WRITERS) == {r.name for r in EI_RULES}  # one writer per rule


def verify(probe: Probe, story: Story) -> bool:
    """Whether ``probe``'s answer is right: its solution's steps are all right and end at the answer, and the
    rule-specific check (see the module docstring) passes."""
    if find_first_wrong_step(probe.solution) is not None or not same_answer(extract_answer(probe.solution),
                                                                            probe.answer):
        return False
    results = re.findall(r"= (\d+)\.", probe.solution)
    if results and results[-1] != probe.answer:  # the stated answer is where the calculation ends
        return False
    if probe.check == "story":
        try:
            return str(parse_story(probe.text).answer()) == probe.answer
        except ValueError:
            return False
    if probe.check == "reverse":
        replayed = replace(story, start=int(probe.answer)).values()
        end = int(re.search(r"In the end .* has (\d+) ", probe.text).group(1))
        return replayed is not None and replayed[-1] == end
    if probe.check == "diagnosis":
        quoted = re.search(r'A student wrote: "(.*)" One step', probe.text).group(1)
        return find_first_wrong_step(quoted) is not None and not same_answer(extract_answer(quoted), probe.answer)
    if probe.check == "explain":
        a, op, b = re.search(r"turns (\d+) \w+ into a new amount with the operation ([-+*/]) (\d+)\.",
                             probe.text).groups()
        return str(_apply(int(a), op, int(b))) == probe.answer and int(probe.answer) in story.values()
    return True


def write_probes(question: str, rules: Sequence[Rule] = EI_RULES, seed: int = 0) -> list:
    """The verified probes of ``question`` for the rules that apply to it, in rule order."""
    return _write(question, rules, seed)[0]


def _write(question: str, rules: Sequence[Rule], seed: int) -> tuple:
    """(verified probes, number of written probes that failed verification)."""
    story = parse_story(question)
    out, failed = [], 0
    for rule in rules:
        rng = random.Random(f"{seed}:{rule.name}:{question}")
        probe = WRITERS[rule.name](story, rng)
        if probe is None:
            continue  # the rule does not apply to this story
        if verify(probe, story):
            out.append(probe)
        else:
            failed += 1
    return out, failed


_ASKED = re.compile(r"Question: (.*)\n")  # explanatory_inversion's prompts put one per line


class ProceduralTeacher:
    """ExGRPO's stage-0 teacher for the arithmetic task, with no model (see the module docstring)."""

    name = "procedural"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def ei_data(self, problems: Sequence, rules: Sequence[Rule] = EI_RULES) -> tuple:
        """(EIData, number of written probes that failed verification) for ``problems`` (question ids are
        positions). The rationale of each question is its worked solution in the student's answer format."""
        data, dropped = EIData(), 0
        for i, problem in enumerate(problems):
            try:
                story = parse_story(problem.question)
            except ValueError as err:
                raise ValueError(f"ei_teacher 'procedural' writes probes for the embedded arithmetic task only; "
                                 f"question {i} does not parse ({err})") from None
            if str(story.answer()) != str(problem.answer):
                raise ValueError(f"question {i}: the story solves to {story.answer()}, the task says "
                                 f"{problem.answer}")
            probes, failed = _write(problem.question, rules, self.seed)
            dropped += failed
            data.questions[i] = dict(question=problem.question, answer=str(problem.answer),
                                     rationale=story.solution())
            data.probes[i] = [p.as_dict() for p in probes]
        return data, dropped

    def __call__(self, prompts: list) -> list:
        """Answers each prompt's (last) question by rule: its worked solution, or "" when it is not a story."""
        out = []
        for prompt in prompts:
            asked = _ASKED.findall(prompt)
            try:
                out.append(parse_story(asked[-1]).solution() if asked else "")
            except ValueError:
                out.append("")
        return out
