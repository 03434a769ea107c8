"""Explanatory Inversion (ExGRPO stage 0): teacher-written probes around each question, cached to jsonl.

For each question Q with answer A the teacher writes a rationale R, then one probe per transformation rule
(:data:`EI_RULES`, the project's own wording), then answers each probe. Two filters follow:

- EI-consistency: after seeing a probe and its solution, the teacher must still answer Q correctly.
- difficulty: drop questions whose probes the base student solves all of (nothing to learn), and those it
  solves fewer than ``min_solved_fraction`` of (too hard to learn from).

Every teacher/student call is cached as one jsonl record, appended and flushed as soon as it exists, so a
crash loses at most the record in flight and a rerun resumes where the file stops (a torn last line is
ignored). The teacher and student are plain callables ``prompts -> texts`` (a local HF model through the
rollout engine, or any API). For the embedded arithmetic task, :mod:`pydistill.trainers.exgrpo.ei_procedural`
writes the probes by rule instead, each with a verified answer, so that no teacher model is needed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

TextGenerator = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class Rule:
    name: str
    instruction: str


EI_RULES: tuple[Rule, ...] = (
    Rule("counterfactual", "Change one given quantity or condition and ask how the result changes."),
    Rule("decomposition", "Ask for one intermediate quantity that the solution needs on the way."),
    Rule("explanation_challenge", "Ask why a particular step of the solution is valid, with a number to compute."),
    Rule("reverse_reasoning", "Give the final answer and ask for one of the original given quantities."),
    Rule("causal_reinforcement", "Ask what would happen to the answer if a step's operation were skipped."),
    Rule("analogy", "Pose a problem with the same structure in a different everyday setting."),
    Rule("generalization", "Ask for the same computation with every given number doubled."),
    Rule("error_diagnosis", "Present a solution with one wrong step and ask for the corrected result."),
    Rule("constraint_variation", "Add one extra condition to the problem and ask for the new result."),
    Rule("step_ordering", "Ask for the result after only the first half of the solution's steps."),
)
RULES_BY_NAME = {r.name: r for r in EI_RULES}

ANSWER_FORMAT = "Reason step by step and end with the final answer in \\boxed{}."


def rationale_prompt(question: str, answer: str) -> str:
    return (f"Question: {question}\nThe correct final answer is {answer}.\n"
            f"Write a clear step-by-step solution that reaches this answer. {ANSWER_FORMAT}")


def probe_prompt(question: str, answer: str, rationale: str, rule: Rule) -> str:
    return (f"Question: {question}\nAnswer: {answer}\nSolution:\n{rationale}\n\n"
            f"Write ONE new question that tests understanding of this solution. Rule ({rule.name}): "
            f"{rule.instruction} The new question must have a single numeric answer. Reply with the question only.")


def probe_answer_prompt(probe: str) -> str:
    return f"Question: {probe}\n{ANSWER_FORMAT}"


def consistency_prompt(question: str, probe: str, probe_solution: str) -> str:
    return (f"First, a related question and its solution.\nQuestion: {probe}\nSolution:\n{probe_solution}\n\n"
            f"Now solve this question.\nQuestion: {question}\n{ANSWER_FORMAT}")


@dataclass
class FilterReport:
    """How many probes and questions each stage kept or removed."""

    questions: int = 0
    probes: int = 0
    removed_inconsistent: int = 0
    removed_unanswerable: int = 0
    removed_too_easy_questions: int = 0
    removed_too_hard_questions: int = 0
    removed_no_probe_questions: int = 0  # every probe of the question was dropped by the filters above
    kept_questions: int = 0
    kept_probes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class JsonlCache:
    """Append-only jsonl store keyed by ``record["key"]``; a torn final line (a crash mid-write) is dropped."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        if os.path.exists(path):
            self._load()

    def _load(self):
        with open(self.path, "rb") as f:
            data = f.read()
        complete, newline, torn = data.rpartition(b"\n")  # `torn`: a record cut short by a crash, if any
        for number, line in enumerate(complete.split(b"\n") if newline else [], 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{self.path}: line {number} is not valid JSON (the cache is corrupt)") from None
            self.records[record["key"]] = record
        if torn:  # drop it, so that the next append starts on a fresh line
            with open(self.path, "r+b") as f:
                f.truncate(len(complete) + len(newline))

    def get(self, key: str) -> Optional[dict]:
        return self.records.get(key)

    def add(self, record: dict) -> dict:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record
        return record


def _batched(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _run_cached(cache: JsonlCache, jobs: list[tuple[str, str, dict]], generate: TextGenerator, batch_size: int):
    """For each (key, prompt, fields) not yet cached, generate and store {key, text, **fields}."""
    todo = [job for job in jobs if cache.get(job[0]) is None]
    for batch in _batched(todo, batch_size):
        texts = generate([prompt for _, prompt, _ in batch])
        if len(texts) != len(batch):
            raise ValueError(f"generator returned {len(texts)} texts for {len(batch)} prompts")
        for (key, _, fields), text in zip(batch, texts):
            cache.add({"key": key, "text": text, **fields})
    return [cache.get(key) for key, _, _ in jobs]


@dataclass
class EIData:
    """Generated probes per question id, each a dict(rule, probe, probe_solution, probe_answer, rationale...)."""

    questions: dict = field(default_factory=dict)  # id -> dict(question, answer, rationale)
    probes: dict = field(default_factory=dict)  # id -> list of probe dicts


def generate_ei_data(problems: Sequence, teacher: TextGenerator, cache_path: str, *,
                     rules: Sequence[Rule] = EI_RULES, batch_size: int = 8,
                     extract_answer: Optional[Callable[[str], Optional[str]]] = None) -> EIData:
    """Rationales, probes and probe solutions for ``problems`` (objects with question and answer), resumable.

    Question ids are positions in ``problems``; keep the list stable between resumed runs.
    """
    if extract_answer is None:
        from ...tasks import extract_answer
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not rules:
        raise ValueError("rules must name at least one transformation rule")
    cache = JsonlCache(cache_path)
    ids = range(len(problems))
    rationales = _run_cached(cache, [(f"rationale/{i}", rationale_prompt(problems[i].question, problems[i].answer),
                                      {"kind": "rationale", "qid": i}) for i in ids], teacher, batch_size)
    probe_jobs = [(f"probe/{i}/{r.name}", probe_prompt(problems[i].question, problems[i].answer,
                                                       rationales[i]["text"], r), {"kind": "probe", "qid": i,
                                                                                    "rule": r.name})
                  for i in ids for r in rules]
    probes = _run_cached(cache, probe_jobs, teacher, batch_size)
    solution_jobs = [(f"solution/{p['qid']}/{p['rule']}", probe_answer_prompt(p["text"].strip()),
                      {"kind": "solution", "qid": p["qid"], "rule": p["rule"]}) for p in probes]
    solutions = _run_cached(cache, solution_jobs, teacher, batch_size)
    data = EIData()
    for i in ids:
        data.questions[i] = dict(question=problems[i].question, answer=problems[i].answer,
                                 rationale=rationales[i]["text"])
        data.probes[i] = []
    for probe, solution in zip(probes, solutions):
        data.probes[probe["qid"]].append(dict(rule=probe["rule"], probe=probe["text"].strip(),
                                              probe_solution=solution["text"],
                                              probe_answer=extract_answer(solution["text"])))
    return data


def filter_ei_data(data: EIData, teacher: TextGenerator, student: TextGenerator, cache_path: str, *,
                   is_correct: Callable[[str, str], bool], min_solved_fraction: float = 0.2,
                   batch_size: int = 8, extract_answer: Optional[Callable[[str], Optional[str]]] = None,
                   student_prompt: Callable[[str], str] = probe_answer_prompt):
    """Apply the EI-consistency filter (per probe) then the difficulty filter (per question).

    ``is_correct(completion, answer)`` verifies a completion against a reference answer. ``student_prompt``
    turns a probe into what the base student is asked (by default the teacher's format; a trainer passes the
    student's own prompt, which also keeps a student that is the teacher model from merely repeating the
    teacher's greedy solution). Probes whose teacher
    solution has no final answer cannot be graded and are dropped. Returns (kept EIData, FilterReport).
    """
    if extract_answer is None:
        from ...tasks import extract_answer
    if not 0.0 <= min_solved_fraction <= 1.0:
        raise ValueError(f"min_solved_fraction must be in [0, 1], got {min_solved_fraction}")
    cache = JsonlCache(cache_path)
    report = FilterReport(questions=len(data.questions), probes=sum(len(v) for v in data.probes.values()))
    gradable = {i: [p for p in ps if p["probe_answer"] is not None] for i, ps in data.probes.items()}
    report.removed_unanswerable = report.probes - sum(len(v) for v in gradable.values())

    flat = [(i, p) for i, ps in gradable.items() for p in ps]
    checks = _run_cached(cache, [(f"consistency/{i}/{p['rule']}",
                                  consistency_prompt(data.questions[i]["question"], p["probe"], p["probe_solution"]),
                                  {"kind": "consistency", "qid": i, "rule": p["rule"]}) for i, p in flat],
                         teacher, batch_size)
    consistent = {i: [] for i in gradable}
    for (i, p), check in zip(flat, checks):
        if is_correct(check["text"], data.questions[i]["answer"]):
            consistent[i].append(p)
        else:
            report.removed_inconsistent += 1

    flat = [(i, p) for i, ps in consistent.items() for p in ps]
    attempts = _run_cached(cache, [(f"student/{i}/{p['rule']}", student_prompt(p["probe"]),
                                    {"kind": "student", "qid": i, "rule": p["rule"]}) for i, p in flat],
                           student, batch_size)
    solved = {i: 0 for i in consistent}
    for (i, p), attempt in zip(flat, attempts):
        solved[i] += int(is_correct(attempt["text"], p["probe_answer"]))
    kept = EIData()
    for i, ps in consistent.items():
        if not ps:
            report.removed_no_probe_questions += 1
            continue
        fraction = solved[i] / len(ps)
        if fraction == 1.0:
            report.removed_too_easy_questions += 1
        elif fraction < min_solved_fraction:
            report.removed_too_hard_questions += 1
        else:
            kept.questions[i], kept.probes[i] = data.questions[i], ps
    report.kept_questions = len(kept.questions)
    report.kept_probes = sum(len(v) for v in kept.probes.values())
    return kept, report
