"""How often does a ROSD reflector locate a known first error? Corrupt one step of correct solutions, ask.

    python -m benchmarks.reflector_hit_rate --n 200 --splits train ood

Each reference solution of the embedded arithmetic task ("a op b = c. ... The answer is z.") is corrupted at one
step, and every later step is recomputed from the corrupted value, as a student who slipped once and then
calculated correctly would write it. Three kinds of corruption:

- ``result``: the step's result is off by 1-3 (an arithmetic slip: the step itself is false);
- ``operand``: the step uses another number than the problem gives, and computes with it correctly;
- ``operator``: the step uses another operation (+ for -, * for +, ...), and computes with it correctly.

A hit is a reflection whose quote is found in the attempt at the corrupted step's start. Prints and returns the
hit rate per kind (and writes JSON with ``--out``). The default reflector is the step checker; any object with
``reflect_batch(items)`` (e.g. :class:`pydistill.trainers.rosd.reflection.ModelReflector`) can be passed to
:func:`measure`.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from typing import Optional

from pydistill.trainers.rosd.reflection import StepCheckReflector, find_quote
from pydistill.tasks import ArithmeticTask

KINDS = ("result", "operand", "operator")
_STEP = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")
_SWAP = {"+": "-", "-": "+", "*": "+", "/": "*"}


def _apply(a: int, op: str, b: int) -> Optional[int]:
    if op == "/":
        return a // b if b and a % b == 0 else None
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def corrupt(solution: str, step: int, kind: str, rng: random.Random):
    """(attempt text, character offset of the corrupted step) or None when this corruption does not apply
    (e.g. a division that would not come out even, or a negative amount)."""
    steps = [tuple(m.groups()) for m in _STEP.finditer(solution)]
    if step >= len(steps):
        return None
    out, value = [], None
    for j, (a, op, b, c) in enumerate(steps):
        a, b, c = int(a) if value is None else value, int(b), int(c)
        if j == step:
            if kind == "result":
                c = _apply(a, op, b) + rng.choice([-3, -2, -1, 1, 2, 3])
            elif kind == "operand":
                choices = [x for x in range(max(1, b - 4), b + 5) if x != b and _apply(a, op, x) is not None]
                if not choices:
                    return None
                b = rng.choice(choices)
                c = _apply(a, op, b)
            else:
                op = _SWAP[op]
                c = _apply(a, op, b)
            if c is None or c < 0:
                return None
        else:
            c = _apply(a, op, b)
            if c is None or c < 0:
                return None
        out.append((a, op, b, c))
        value = c
    texts = [f"{a} {op} {b} = {c}." for a, op, b, c in out]
    attempt = " ".join(texts) + f" The answer is {value}."
    start = len(" ".join(texts[:step])) + (1 if step else 0)
    return attempt, start


def measure(n: int = 200, seed: int = 0, splits=("train", "ood"), reflector=None) -> dict:
    """Hit rate per corruption kind over ``n`` problems of each split (one corrupted step per problem and kind)."""
    task = ArithmeticTask()
    reflector = reflector or StepCheckReflector(task)
    rng = random.Random(seed)
    cases = {k: [] for k in KINDS}
    for split in splits:
        for problem in task.problems(split, n=n, seed=seed):
            steps = len(_STEP.findall(problem.solution))
            for kind in KINDS:
                made = corrupt(problem.solution, rng.randrange(steps), kind, rng)
                if made is not None and not task.is_correct(problem, made[0]):
                    cases[kind].append((problem, *made))
    out = {}
    for kind, items in cases.items():
        reflections = reflector.reflect_batch([dict(problem=p, question=p.question, correct_solution=p.solution,
                                                    attempt=a, answer=p.answer, attempt_is_correct=False)
                                               for p, a, _ in items]) if items else []
        hits = sum(r.quote is not None and find_quote(a, r.quote) == start
                   for r, (_, a, start) in zip(reflections, items))
        located = sum(r.quote is not None for r in reflections)
        out[kind] = dict(cases=len(items), hits=hits, hit_rate=hits / len(items) if items else 0.0,
                         any_quote=located)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reflector_hit_rate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="problems per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", nargs="+", default=["train", "ood"])
    p.add_argument("--out", default=None, help="write the rates as JSON here")
    args = p.parse_args(argv)
    rates = measure(args.n, args.seed, tuple(args.splits))
    for kind, r in rates.items():
        print(f"{kind:9s} {r['hits']}/{r['cases']} located ({100 * r['hit_rate']:.1f}%), "
              f"any quote {r['any_quote']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rates, command="python -m benchmarks.reflector_hit_rate " + " ".join(
                argv if argv is not None else sys.argv[1:])), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
