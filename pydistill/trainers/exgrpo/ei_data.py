"""ExGRPO stage 0: the Explanatory Inversion data of a run (generated or read from the cache, then filtered),
and the ``pydistill ei generate`` command."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ...evaluation import generate_completions
from ...models import EMBEDDED_DEFAULT, load_model
from ...prompts import render
from ...tasks import extract_answer, same_answer
from .config import parse_rules
from .dialogue import probe_turn
from .ei_procedural import ProceduralTeacher
from .explanatory_inversion import EI_RULES, EIData, FilterReport, JsonlCache, filter_ei_data, generate_ei_data

TextGenerator = Callable[[list], list]


class ModelTextGenerator:
    """``prompts -> texts``: greedy completions of a causal LM, each prompt sent as one user message through
    the chat template. Given a name, the model is loaded on the first call only (a complete cache never
    loads it)."""

    def __init__(self, model, tokenizer=None, *, max_new_tokens: int, batch_size: int, device=None):
        self.name = model if isinstance(model, str) else None
        self.model, self.tokenizer = (None, None) if isinstance(model, str) else (model, tokenizer)
        self.max_new_tokens, self.batch_size, self.device = max_new_tokens, batch_size, device

    def __call__(self, prompts: list) -> list:
        if self.model is None:
            self.model, self.tokenizer = load_model(self.name, device=self.device)
        rendered = [render(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        texts, _ = generate_completions(self.model, self.tokenizer, rendered, max_new_tokens=self.max_new_tokens,
                                        greedy=True, batch_size=self.batch_size)
        return texts


def final_answer_matches(completion: str, answer: str) -> bool:
    """The filters' verifier: the completion's final number equals ``answer``."""
    return same_answer(extract_answer(completion), answer)


def check_cache_questions(cache_path: str, problems: Sequence, teacher_name: str, student_name: str):
    """Records are keyed by question position: refuse a cache written for other questions or models."""
    cache = JsonlCache(cache_path)
    for i, p in enumerate(problems):
        identity = dict(question=p.question, answer=str(p.answer), teacher=teacher_name, student=student_name)
        found = cache.get(f"question/{i}")
        if found is None:
            cache.add(dict(key=f"question/{i}", kind="question", **identity))
        elif {k: found.get(k) for k in identity} != identity:
            changed = ", ".join(k for k in identity if found.get(k) != identity[k])
            raise ValueError(f"ei_cache {cache_path!r} does not match this run at question {i} (different "
                             f"{changed}): use another cache path, or the same task, split, train_problems, seed "
                             f"and models")


def build_ei_dataset(problems: Sequence, teacher: TextGenerator, student: TextGenerator, cache_path: str, *,
                     rules: Sequence = EI_RULES, filters: bool = True, min_solved_fraction: float = 0.2,
                     batch_size: int = 16, teacher_name: str = "custom", student_name: str = "custom"):
    """Stage 0: (EIData kept, FilterReport). Without ``filters`` every generated probe is kept (the report
    then only counts them)."""
    check_cache_questions(cache_path, problems, teacher_name, student_name)
    unverified = 0
    if isinstance(teacher, ProceduralTeacher):  # probes written by rule, each verified: no model call
        data, unverified = teacher.ei_data(problems, rules)
    else:
        data = generate_ei_data(problems, teacher, cache_path, rules=rules, batch_size=batch_size,
                                extract_answer=extract_answer)
    if filters:
        # The base student answers each probe as it is asked at inference (its own prompt, as in the dialogues).
        kept, report = filter_ei_data(data, teacher, student, cache_path, is_correct=final_answer_matches,
                                      min_solved_fraction=min_solved_fraction, batch_size=batch_size,
                                      extract_answer=extract_answer, student_prompt=probe_turn)
        report.probes += unverified
        report.removed_unanswerable += unverified
        return kept, report
    probes = sum(len(v) for v in data.probes.values())
    kept = EIData({i: q for i, q in data.questions.items() if data.probes[i]},
                  {i: ps for i, ps in data.probes.items() if ps})
    return kept, FilterReport(questions=len(data.questions), probes=probes + unverified,
                              removed_unanswerable=unverified, kept_questions=len(kept.questions),
                              kept_probes=probes)


@dataclass(frozen=True)
class EIQuestion:
    """One training question of stages 1-2 with what the teacher wrote for it."""

    qid: int  # position in the EI question list (the cache's key)
    problem: object
    rationale: str
    probes: tuple  # dicts: rule, probe, probe_solution, probe_answer


def refuse_generation(prompts):
    raise RuntimeError("the EI cache is incomplete on this process: stage 0 runs on the main process first")


def ei_generate(task: str, *, split: str = "train", n: int = 64, seed: int = 0, data_path: Optional[str] = None,
                teacher: str = EMBEDDED_DEFAULT, student: Optional[str] = None, cache: str,
                filters: bool = True, min_solved_fraction: float = 0.2, rules: str = "all",
                max_new_tokens: int = 256, batch_size: int = 16) -> FilterReport:
    """`pydistill ei generate`: stage 0 alone, into ``cache`` (the trainer reuses it with the same task, split,
    ``train_problems`` = n, seed and models). ``student`` (the base student of the difficulty filter) defaults
    to the teacher."""
    from ...tasks import get_task

    problems = get_task(task, **({"path": data_path} if task == "gsm8k" else {})).problems(split, n=n, seed=seed)
    procedural = teacher == "procedural"
    if procedural and student is None and filters:
        raise ValueError("the procedural teacher writes probes, it does not answer them as a student: name the "
                         "base student of the difficulty filter (--student) or turn the filters off")
    student = student or teacher
    teacher_gen = ProceduralTeacher(seed) if procedural else text_generator(
        teacher, max_new_tokens=max_new_tokens, batch_size=batch_size)
    student_gen = teacher_gen if student == teacher else text_generator(student, max_new_tokens=max_new_tokens,
                                                                        batch_size=batch_size)
    teacher = f"procedural:{seed}" if procedural else teacher  # the name the trainer gives the cache
    _, report = build_ei_dataset(problems, teacher_gen, student_gen, cache, rules=parse_rules(rules),
                                 filters=filters, min_solved_fraction=min_solved_fraction, batch_size=batch_size,
                                 teacher_name=teacher, student_name=student)
    return report


def text_generator(name: str, *, max_new_tokens: int, batch_size: int) -> TextGenerator:
    """A model by name as a lazy ``prompts -> texts`` generator (greedy, chat template)."""
    return ModelTextGenerator(name, max_new_tokens=max_new_tokens, batch_size=batch_size)
