"""What would each teacher context teach? Score the student's own rollouts under every context, before training.

    python -m benchmarks.teacher_signal --problems 12 --generations 4

Samples ``--generations`` rollouts per training problem from the student prompt (as ROSD and FD do: temperature
0.7, untruncated, 48 new tokens), then scores the same rollout tokens with the initial model (the fixed teacher;
the EMA teacher of FD equals it at the start) under each teacher context of OPSD, ROSD and Feedback Distillation
and their diagnosis variants. Only rollouts of groups with at least one correct rollout are used (those ROSD
keeps), so every context is scored on the same tokens. Per context:

- ``teacher_entropy`` vs ``student_entropy``: mean next-token entropy (nats) over the rollout tokens;
- ``forward_kl`` / ``jsd``: mean per-token divergence teacher vs student (what the loss would pull on);
- ``lift_correct`` / ``lift_incorrect``: mean per-token log-ratio log p_teacher(y_t) - log p_student(y_t) on the
  rollout's own tokens, over correct and over incorrect rollouts, and ``discrimination`` = their difference. A
  teacher that knows which rollouts are right raises the correct ones' tokens more than the incorrect ones'
  (discrimination > 0); at 0 or below, distilling toward it cannot favour right answers;
- ``answer_lift``: on incorrect rollouts that write "The answer is N", the change in probability of the correct
  answer's first token at N's position, teacher minus student (> 0: the teacher knows the answer there);
- ``wrong_answer_lift``: the same for the rollout's own wrong first token (< 0: the teacher moves away from it);
- ``answer_first`` (teacher) vs ``student_answer_first``: mean probability that the completion opens with "The
  answer is", i.e. states an answer before any calculation (what the collapsed ROSD and FD students learned to
  do): whether the initial teacher already prefers that opening.

Forward passes only (no training); writes JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from pydistill.models import EMBEDDED_DEFAULT

ANSWER_FIRST = "The answer is"
# the FD frame the recorded measurements used (FD's default is now "notes"; see RESULTS.md)
FRAME = "previous_attempt"
CONTEXTS = ("opsd_reference", "rosd_sibling_explanation", "rosd_sibling_only", "rosd_reference_explanation",
            "fd_verifier_full", "fd_verifier_no_attempt_numbers", "fd_verifier_corrections", "fd_reference_solution")


def teacher_prompt(context: str, problem, attempt: str, sibling: str, explanation: str) -> list:
    """The messages of ``context`` for one rollout (see CONTEXTS)."""
    from pydistill.trainers.fd.feedback import SolutionFeedback, VerifierFeedback
    from pydistill.prompts import feedback_teacher_messages, opsd_teacher_messages, rosd_teacher_messages

    q = problem.question
    if context == "opsd_reference":
        return opsd_teacher_messages(q, problem.solution)
    if context == "rosd_sibling_explanation":
        return rosd_teacher_messages(q, sibling, explanation)
    if context == "rosd_sibling_only":
        return rosd_teacher_messages(q, sibling, None)
    if context == "rosd_reference_explanation":
        return rosd_teacher_messages(q, problem.solution, explanation, task_solution=True)
    if context == "fd_verifier_full":
        return feedback_teacher_messages(q, VerifierFeedback()(q, attempt, problem.answer), frame=FRAME)
    if context == "fd_verifier_no_attempt_numbers":
        feedback = VerifierFeedback(quote_attempt=False)(q, attempt, problem.answer)
        return feedback_teacher_messages(q, feedback, frame=FRAME)
    if context == "fd_verifier_corrections":
        feedback = VerifierFeedback(quote_attempt=False, state_answer=True)(q, attempt, problem.answer)
        return feedback_teacher_messages(q, feedback, frame=FRAME)
    if context == "fd_reference_solution":
        feedback = SolutionFeedback({q: problem.solution})(q, attempt, None)
        return feedback_teacher_messages(q, feedback, frame=FRAME)
    raise ValueError(f"unknown context {context!r}; expected one of {CONTEXTS}")


def _answer_position(tokenizer, ids, text_start: int) -> int:
    """Index of the first rollout token whose decoded prefix reaches past character ``text_start``."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)) > text_start:
            return k - 1
    return len(ids) - 1


def head_log_probs(head, hidden, dtype=None):
    """log-softmax of the model's own logits ``cap(h W^T + b)`` [..., V] in ``dtype`` (float32 by default), from
    hidden states in the op's input space (:func:`hidden_rows`: the logit scale folded in) and the model's
    ``read_head`` (bias, softcap)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    logits = hidden.to(dtype) @ head.weight.detach().to(dtype).t()
    if head.bias is not None:
        logits = logits + head.bias.detach().to(dtype)
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return torch.log_softmax(logits, -1)


def hidden_rows(model, tokenizer, prompt_ids, completions, batch_size: int = 8, head=None):
    """The hidden states [T_i, H] that predict each rollout's tokens under its prompt (``head``: the model's, when
    the caller read it)."""
    import torch

    from pydistill.trainers.contexts import build_context_batch, response_hidden_states

    out = []
    with torch.no_grad():
        for start in range(0, len(completions), batch_size):
            p, c = prompt_ids[start:start + batch_size], completions[start:start + batch_size]
            hidden = response_hidden_states(model, build_context_batch(p, c, tokenizer.pad_token_id), head)
            out += [hidden[row, :len(ids)] for row, ids in enumerate(c)]
    return out


def measure(model, tokenizer, task, problems, generations: int, max_new_tokens: int = 48,
            temperature: float = 0.7, seed: int = 0, contexts=CONTEXTS) -> dict:
    import torch

    from pydistill.evaluation import generate_completions
    from pydistill.prompts import render, student_messages
    from pydistill.trainers.rosd.reflection import StepCheckReflector
    from pydistill.token_stats import token_stats
    from pydistill.boundary import read_head

    model.eval()
    prompts = [render(tokenizer, student_messages(p.question)) for p in problems for _ in range(generations)]
    torch.manual_seed(seed)
    texts, ids = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=False,
                                      temperature=temperature, batch_size=32)
    repeated = [p for p in problems for _ in range(generations)]
    correct = [task.is_correct(p, t) for p, t in zip(repeated, texts)]
    reflector = StepCheckReflector(task)
    rows = []  # (index, sibling index, explanation)
    for g in range(len(problems)):
        members = range(g * generations, (g + 1) * generations)
        successes = [i for i in members if correct[i]]
        for i in members:
            if successes and ids[i]:
                sibling = next((s for s in successes if s != i), None)  # a sole success: none (as ROSD)
                reflection = reflector.reflect_batch([dict(problem=repeated[i], attempt=texts[i],
                                                           answer=repeated[i].answer,
                                                           attempt_is_correct=correct[i])])[0]
                rows.append((i, sibling, reflection.explanation))
    summary = dict(rollouts=len(texts), accuracy=sum(correct) / len(correct), kept_rollouts=len(rows),
                   kept_correct=sum(correct[i] for i, _, _ in rows),
                   truncated_share=sum(not c or c[-1] != tokenizer.eos_token_id for c in ids) / len(ids),
                   contexts={})
    if not rows:
        return summary
    completions = [ids[i] for i, _, _ in rows]
    targets = torch.tensor([t for c in completions for t in c])
    head = read_head(model)  # the whole head: weight, bias (times the logit scale) and softcap
    weight, scoring = head.weight.detach(), dict(bias=head.bias, softcap=head.softcap)
    student_rows = hidden_rows(model, tokenizer, [tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
                                                  for i, _, _ in rows], completions, head=head)
    student_hidden = torch.cat(student_rows)
    with torch.no_grad():
        student = token_stats(student_hidden, weight, targets=targets, **scoring)
    # the answer token of incorrect rollouts that state an answer: (row, position, correct token, own token)
    answer_slots = []
    for r, (i, _, _) in enumerate(rows):
        found = re.search(r"answer is\s*(\d+)", texts[i])
        if correct[i] or not found:
            continue
        decoded = tokenizer.decode(ids[i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        at = decoded.find(found.group(0))
        if at < 0:
            continue
        position = _answer_position(tokenizer, ids[i], at + found.group(0).index(found.group(1)))
        prefix = tokenizer.decode(ids[i][:position], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # the correct answer's first token, as the tokenizer splits the text at this position
        with_right = tokenizer(prefix + repeated[i].answer, add_special_tokens=False)["input_ids"]
        with_prefix = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if with_right[:len(with_prefix)] != with_prefix or len(with_right) == len(with_prefix):
            continue
        answer_slots.append((r, position, with_right[len(with_prefix)], ids[i][position]))

    def probabilities(h):
        return head_log_probs(head, h).exp()

    def mean(values):
        return sum(values) / len(values) if values else None

    opening = tokenizer(ANSWER_FIRST, add_special_tokens=False)["input_ids"]

    def answer_first(prompt_ids):
        """Probability, per prompt, that the completion opens with ANSWER_FIRST."""
        hidden = hidden_rows(model, tokenizer, prompt_ids, [opening] * len(prompt_ids), head=head)
        with torch.no_grad():
            return [float(head_log_probs(head, h)[torch.arange(len(opening)), torch.tensor(opening)].sum().exp())
                    for h in hidden]

    student_first = mean(answer_first([tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
                                       for i, _, _ in rows]))
    correct_rows = torch.tensor([bool(correct[i]) for i, _, _ in rows for _ in range(len(ids[i]))])
    for context in contexts:
        messages = [teacher_prompt(context, repeated[i], texts[i], None if s is None else texts[s], e)
                    for i, s, e in rows]
        teacher_ids = [tokenizer(render(tokenizer, m), add_special_tokens=False)["input_ids"] for m in messages]
        teacher_rows = hidden_rows(model, tokenizer, teacher_ids, completions, head=head)
        teacher_hidden = torch.cat(teacher_rows)
        with torch.no_grad():
            teacher = token_stats(teacher_hidden, weight, targets=targets, **scoring)
            kl = token_stats(student_hidden, weight, teacher_hidden=teacher_hidden, divergence="forward_kl", **scoring)
            jsd = token_stats(student_hidden, weight, teacher_hidden=teacher_hidden, divergence="jsd", **scoring)
        lift = teacher.logp - student.logp
        lift_c = float(lift[correct_rows].mean()) if correct_rows.any() else None
        lift_i = float(lift[~correct_rows].mean()) if (~correct_rows).any() else None
        answer, wrong = [], []
        for r, position, right_token, own_token in answer_slots:
            p_s, p_t = probabilities(student_rows[r][position]), probabilities(teacher_rows[r][position])
            answer.append(float(p_t[right_token] - p_s[right_token]))
            wrong.append(float(p_t[own_token] - p_s[own_token]))
        summary["contexts"][context] = dict(
            teacher_entropy=float(teacher.entropy.mean()), student_entropy=float(student.entropy.mean()),
            forward_kl=float(kl.divergence.mean()), jsd=float(jsd.divergence.mean()), lift_correct=lift_c,
            lift_incorrect=lift_i, discrimination=None if lift_c is None or lift_i is None else lift_c - lift_i,
            answer_lift=mean(answer), wrong_answer_lift=mean(wrong), answer_slots=len(answer),
            answer_first=mean(answer_first(teacher_ids)), student_answer_first=student_first,
            teacher_prompt_tokens=sum(map(len, teacher_ids)) / len(teacher_ids))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.teacher_signal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--problems", type=int, default=12, help="training problems (groups)")
    p.add_argument("--generations", type=int, default=4, help="rollouts per problem")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contexts", nargs="+", default=list(CONTEXTS), choices=CONTEXTS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from benchmarks.measure import save_run
    from pydistill.models import load_model
    from pydistill.tasks import get_task

    started = time.time()
    model, tokenizer = load_model(args.model)
    task = get_task("arithmetic")
    problems = task.problems(args.split, n=args.problems, seed=args.seed)
    result = measure(model, tokenizer, task, problems, args.generations, args.max_new_tokens, args.temperature,
                     args.seed, args.contexts)
    save_run(result, "benchmarks.teacher_signal", argv, started, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "contexts"}))
    for name, c in result.get("contexts", {}).items():
        print(f"{name:32s} " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in c.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
