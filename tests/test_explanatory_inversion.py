"""Explanatory Inversion data generation and filters with a scripted teacher and student."""
import json
import re
from types import SimpleNamespace

import pytest

from pydistill.trainers.exgrpo.explanatory_inversion import (EI_RULES, JsonlCache, filter_ei_data, generate_ei_data)


def boxed(text):
    found = re.findall(r"\\boxed\{([^}]*)\}", text)
    return found[-1] if found else None


def is_correct(completion, answer):
    return boxed(completion) == answer


PROBLEMS = [SimpleNamespace(question=f"Q{i}: what is {i} + {i}?", answer=str(2 * i)) for i in range(3)]
RULES = EI_RULES[:4]


class ScriptedTeacher:
    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, prompts):
        out = []
        for prompt in prompts:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("teacher died")
            self.calls += 1
            if prompt.startswith("First, a related question"):
                qid = int(re.search(r"Now solve this question.\nQuestion: Q(\d+)", prompt).group(1))
                bad = "reverse_reasoning" in prompt  # the teacher gets confused after this rule's probe
                out.append(f"So \\boxed{{{-1 if bad else 2 * qid}}}")
            elif "Write ONE new question" in prompt:
                qid = int(re.search(r"Question: Q(\d+)", prompt).group(1))
                rule = re.search(r"Rule \((\w+)\)", prompt).group(1)
                out.append(f"P{qid}-{rule}: compute {qid} * 3 ({rule})")
            elif prompt.startswith("Question: P"):
                qid = int(re.search(r"P(\d+)-", prompt).group(1))
                out.append("answer-less ramble" if "decomposition" in prompt and qid == 2
                           else f"{qid} * 3 = {qid * 3}. \\boxed{{{qid * 3}}}")
            else:
                qid = int(re.search(r"Q(\d+)", prompt).group(1))
                out.append(f"{qid} + {qid} = {2 * qid}. \\boxed{{{2 * qid}}}")
        return out


def scripted_student(prompts):
    # solves every probe of Q0, none of Q1, and for Q2 only the counterfactual probe
    out = []
    for prompt in prompts:
        qid = int(re.search(r"P(\d+)-", prompt).group(1))
        right = qid == 0 or (qid == 2 and "counterfactual" in prompt)
        out.append(f"\\boxed{{{qid * 3 if right else 999}}}")
    return out


def test_generation_records_rule_probe_answer_and_rationale(tmp_path):
    data = generate_ei_data(PROBLEMS, ScriptedTeacher(), str(tmp_path / "ei.jsonl"), rules=RULES,
                            batch_size=5, extract_answer=boxed)
    assert set(data.questions) == {0, 1, 2}
    assert data.questions[1]["rationale"].endswith("\\boxed{2}")
    probes = data.probes[1]
    assert [p["rule"] for p in probes] == [r.name for r in RULES]
    assert probes[0]["probe"] == "P1-counterfactual: compute 1 * 3 (counterfactual)"
    assert probes[0]["probe_answer"] == "3"
    assert data.probes[2][1]["probe_answer"] is None  # ungradable solution kept as None


def test_filters_on_known_cases(tmp_path):
    teacher = ScriptedTeacher()
    data = generate_ei_data(PROBLEMS, teacher, str(tmp_path / "ei.jsonl"), rules=RULES, extract_answer=boxed)
    kept, report = filter_ei_data(data, teacher, scripted_student, str(tmp_path / "filter.jsonl"),
                                  is_correct=is_correct, min_solved_fraction=0.3, extract_answer=boxed)
    assert report.questions == 3 and report.probes == 12
    assert report.removed_unanswerable == 1  # Q2's decomposition probe
    assert report.removed_inconsistent == 3  # every question's reverse_reasoning probe
    assert report.removed_too_easy_questions == 1  # Q0: student solves all
    assert report.removed_too_hard_questions == 1  # Q1: none solved
    assert list(kept.questions) == [2] and report.kept_questions == 1
    # Q2 keeps counterfactual + explanation_challenge, the student solves 1 of 2 >= 0.3
    assert [p["rule"] for p in kept.probes[2]] == ["counterfactual", "explanation_challenge"]
    assert report.kept_probes == 2


def test_generation_resumes_after_a_crash(tmp_path):
    path = str(tmp_path / "ei.jsonl")
    with pytest.raises(RuntimeError, match="teacher died"):
        generate_ei_data(PROBLEMS, ScriptedTeacher(fail_after=7), path, rules=RULES, batch_size=1, extract_answer=boxed)
    assert len(open(path).read().splitlines()) == 7  # every finished call survived
    resumed = ScriptedTeacher()
    data = generate_ei_data(PROBLEMS, resumed, path, rules=RULES, batch_size=1, extract_answer=boxed)
    total = 3 + 3 * len(RULES) * 2  # rationales, probes, solutions
    assert resumed.calls == total - 7
    keys = [json.loads(line)["key"] for line in open(path)]
    assert len(keys) == len(set(keys)) == total
    fresh = generate_ei_data(PROBLEMS, ScriptedTeacher(), str(tmp_path / "fresh.jsonl"), rules=RULES,
                             extract_answer=boxed)
    assert data.probes == fresh.probes and data.questions == fresh.questions


def test_cache_drops_a_torn_last_record(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "text": "1"}\n{"key": "b", "te')
    cache = JsonlCache(str(path))
    assert set(cache.records) == {"a"}
    cache.add({"key": "c", "text": "3"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "c"]
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        JsonlCache(str(path))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate_ei_data(PROBLEMS, ScriptedTeacher(), str(tmp_path / "x.jsonl"), batch_size=0, extract_answer=boxed)
    with pytest.raises(ValueError, match="rules must name"):
        generate_ei_data(PROBLEMS, ScriptedTeacher(), str(tmp_path / "x.jsonl"), rules=(), extract_answer=boxed)
    with pytest.raises(ValueError, match="generator returned 0 texts for 1 prompts"):
        generate_ei_data(PROBLEMS[:1], lambda prompts: [], str(tmp_path / "y.jsonl"), extract_answer=boxed)
