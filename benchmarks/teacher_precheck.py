"""Pre-check before training: does each method's teacher context make the model better at the problem, and is
that more than copying the answer it is shown?

    python -m benchmarks.teacher_precheck --problems 32

The initial model (every method's teacher at step 0) answers each problem greedily from:

- ``student``: the student prompt (the baseline);
- ``opsd``: OPSD's teacher context, the reference solution;
- ``rosd``: ROSD's teacher context for an incorrect rollout of a group with a success: a correct sibling rollout and
  the step checker's explanation (problems without such a group are left out of this row);
- ``fd``: Feedback Distillation's teacher context with the default verifier feedback ("corrections") on an incorrect
  rollout, no sibling (problems without an incorrect rollout are left out);
- each with ``_withheld``: the same context with every result ("= c", ">>c") and the final answer replaced by "?" —
  the control: a lift that disappears here is the teacher copying the number, not a better reasoner;
- ``french``: the student prompt plus the fixed instruction "Answer in French." (the FD author's sanity test): the
  share of answers in French is reported against the student's; a teacher context that cannot move this one will
  not move anything.

Rollouts for ROSD and FD are sampled from the student prompt as those trainers do (``--generations`` per problem,
``--temperature``, ``--max-new-tokens``). Per context: ``accuracy``, ``student_accuracy`` on the same problems,
``lift`` = their difference (points), ``n``. Forward passes and generation only, no training; JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from pydistill.models import EMBEDDED_DEFAULT

FRENCH_INSTRUCTION = "Answer in French."
# Words that are common in French answers and rare in English ones; two of them, or an accented letter, mark French.
_FRENCH_WORDS = {"la", "le", "les", "est", "des", "une", "réponse", "donc", "avec", "pour", "sont", "il", "elle",
                 "nous", "dans", "que", "qui", "pommes", "boîtes", "chaque", "total"}
_RESULT = re.compile(r"(=\s*|>>\s*)-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"(answer\s*(?:is|:)\s*\**\s*|####\s*)-?\$?\d[\d,]*(?:\.\d+)?", re.IGNORECASE)


def withhold(text: str, answer: str) -> str:
    """``text`` with every result ("= c", ">>c"), every stated final answer and every standalone occurrence of the
    answer replaced by "?": what the context says about the method, without the numbers to copy."""
    text = _FINAL.sub(lambda m: m.group(1) + "?", _RESULT.sub(lambda m: m.group(1) + "?", text))
    return re.sub(rf"(?<![\d.]){re.escape(answer)}(?![\d]|\.\d)", "?", text) if answer else text


def is_french(text: str) -> bool:
    words = set(re.findall(r"[a-zà-ÿ]+", text.lower()))
    return len(words & _FRENCH_WORDS) >= 2 or bool(re.search(r"[éèêàçùû]", text))


def french_messages(question: str) -> list:
    from pydistill.prompts import STUDENT_INSTRUCTION

    return [{"role": "user", "content": f"{question}\n{STUDENT_INSTRUCTION}\n{FRENCH_INSTRUCTION}"}]


def contexts_for(task, problems, texts, generations: int) -> dict:
    """Per context name, a list of (problem index, messages). ``texts``: ``generations`` rollouts per problem."""
    from pydistill.prompts import feedback_teacher_messages, opsd_teacher_messages, rosd_teacher_messages
    from pydistill.prompts import student_messages
    from pydistill.trainers.fd.feedback import VerifierFeedback
    from pydistill.trainers.rosd.reflection import StepCheckReflector

    out = {name: [] for name in ("student", "opsd", "opsd_withheld", "rosd", "rosd_withheld", "fd", "fd_withheld",
                                 "french")}
    reflector, verifier = StepCheckReflector(task), VerifierFeedback(quote_attempt=False, state_answer=True)
    for k, p in enumerate(problems):
        q = p.question
        out["student"].append((k, student_messages(q)))
        out["french"].append((k, french_messages(q)))
        if p.solution:
            out["opsd"].append((k, opsd_teacher_messages(q, p.solution)))
            out["opsd_withheld"].append((k, opsd_teacher_messages(q, withhold(p.solution, p.answer))))
        group = texts[k * generations:(k + 1) * generations]
        correct = [task.is_correct(p, t) for t in group]
        wrong = [t for t, c in zip(group, correct) if not c]
        if not wrong:
            continue
        attempt = wrong[0]
        feedback = verifier(q, attempt, p.answer)
        if feedback:
            out["fd"].append((k, feedback_teacher_messages(q, feedback)))
            out["fd_withheld"].append((k, feedback_teacher_messages(q, withhold(feedback, p.answer))))
        if any(correct):
            sibling = group[correct.index(True)]
            explanation = reflector.reflect_batch([dict(problem=p, attempt=attempt, answer=p.answer,
                                                        attempt_is_correct=False)])[0].explanation or None
            out["rosd"].append((k, rosd_teacher_messages(q, sibling, explanation)))
            out["rosd_withheld"].append((k, rosd_teacher_messages(
                q, withhold(sibling, p.answer), withhold(explanation, p.answer) if explanation else None)))
    return out


def measure(model, tokenizer, task, problems, generations: int = 4, max_new_tokens: int = 48,
            answer_tokens: int = 64, temperature: float = 0.7, seed: int = 0, batch_size: int = 32) -> dict:
    import torch

    from pydistill.evaluation import generate_completions
    from pydistill.prompts import render, student_messages

    model.eval()
    torch.manual_seed(seed)
    prompts = [render(tokenizer, student_messages(p.question)) for p in problems for _ in range(generations)]
    texts, _ = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=False,
                                    temperature=temperature, batch_size=batch_size)
    rows = contexts_for(task, problems, texts, generations)
    answers = {}
    print(f"[precheck] {len(texts)} rollouts sampled; answering from {len(rows)} contexts", file=sys.stderr,
          flush=True)
    for name, items in rows.items():
        print(f"[precheck] {name}: {len(items)} problems", file=sys.stderr, flush=True)
        rendered = [render(tokenizer, m) for _, m in items]
        answers[name] = generate_completions(model, tokenizer, rendered, max_new_tokens=answer_tokens,
                                             batch_size=batch_size)[0] if rendered else []
    student = {k: task.is_correct(problems[k], a) for (k, _), a in zip(rows["student"], answers["student"])}
    student_french = {k: is_french(a) for (k, _), a in zip(rows["student"], answers["student"])}
    summary = dict(problems=len(problems), rollouts=len(texts),
                   rollout_accuracy=sum(task.is_correct(p, t) for p, t in
                                        zip([p for p in problems for _ in range(generations)], texts)) / len(texts),
                   contexts={})
    for name, items in rows.items():
        if not items:
            continue
        keys = [k for k, _ in items]
        accuracy = sum(task.is_correct(problems[k], a) for k, a in zip(keys, answers[name])) / len(keys)
        base = sum(student[k] for k in keys) / len(keys)
        entry = dict(n=len(keys), accuracy=accuracy, student_accuracy=base, lift=100 * (accuracy - base),
                     prompt_tokens=sum(len(tokenizer(render(tokenizer, m), add_special_tokens=False)["input_ids"])
                                       for _, m in items) / len(items),
                     example=answers[name][0][:200])
        if name == "french":
            entry.update(french_share=sum(map(is_french, answers[name])) / len(keys),
                         student_french_share=sum(student_french[k] for k in keys) / len(keys))
        summary["contexts"][name] = entry
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.teacher_precheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--task", default="arithmetic", help="a task name (arithmetic, gsm8k)")
    p.add_argument("--split", default="train")
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--generations", type=int, default=4, help="rollouts per problem for ROSD's and FD's contexts")
    p.add_argument("--max-new-tokens", type=int, default=48, help="rollout length")
    p.add_argument("--answer-tokens", type=int, default=64, help="length of each context's greedy answer")
    p.add_argument("--temperature", type=float, default=0.7, help="rollout sampling temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for name in ("problems", "generations", "max_new_tokens", "answer_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        raise SystemExit(f"--temperature must be > 0, got {args.temperature}")
    from benchmarks.measure import save_run
    from pydistill.models import load_model
    from pydistill.tasks import get_task

    started = time.time()
    task = get_task(args.task)
    problems = task.problems(args.split, n=args.problems, seed=args.seed)
    model, tokenizer = load_model(args.model)
    result = measure(model, tokenizer, task, problems, args.generations, args.max_new_tokens, args.answer_tokens,
                     args.temperature, args.seed)
    save_run(result, "benchmarks.teacher_precheck", argv, started, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "contexts"}))
    print(f"{'context':16s} {'n':>4s} {'accuracy':>9s} {'student':>8s} {'lift':>7s}")
    for name, c in result["contexts"].items():
        extra = f"  french {c['french_share']:.2f} vs student {c['student_french_share']:.2f}" if "french_share" in c \
            else ""
        print(f"{name:16s} {c['n']:4d} {c['accuracy']:9.3f} {c['student_accuracy']:8.3f} {c['lift']:+7.1f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
