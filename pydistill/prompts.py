"""The project's prompts: the student context and the teacher contexts with privileged information."""
from __future__ import annotations

from ._deprecated import renamed_keyword

# Short on purpose: small models ramble when asked for long step-by-step reasoning, and every calculation
# written as "a op b = c" is what the step checker and the reflectors read.
STUDENT_INSTRUCTION = ("Answer with one short calculation in the form \"a op b = c\", then write \"The answer is\" "
                       "and the number.")


def student_messages(question: str) -> list:
    """Student context: the problem only."""
    return [{"role": "user", "content": f"{question}\n{STUDENT_INSTRUCTION}"}]


def opsd_teacher_messages(question: str, solution: str) -> list:
    """OPSD teacher context: the problem, a reference solution, and a request to reason to the same answer."""
    return [{"role": "user", "content": (
        f"{question}\n\nHere is a reference solution:\n{solution}\n\n"
        "Understand the reasoning of the reference solution, then solve the problem yourself in your own words "
        f"and reach the same final answer.\n{STUDENT_INSTRUCTION}")}]


# Per frame of the FD teacher context: the feedback's heading, the sibling's heading and the closing request.
_FEEDBACK_FRAME_TEXT = {
    "notes": ("Notes on this problem:", "Here is a correct solution:",
              "Use these notes, then solve the problem yourself in your own words."),
    "previous_attempt": ("A previous attempt at this problem received this feedback:",
                         "Here is a correct attempt by another student:",
                         "Take this into account and solve the problem yourself."),
}
FEEDBACK_FRAMES = tuple(_FEEDBACK_FRAME_TEXT)


def feedback_teacher_messages(question: str, feedback: str | None, sibling: str | None = None,
                              frame: str = "notes") -> list:
    """Feedback Distillation teacher context: the problem, the feedback, and optionally a successful attempt by
    a sibling rollout. With neither, it is the student context itself. ``frame``: "previous_attempt" presents
    the feedback as what an earlier attempt received and asks for a new solution; "notes" presents it as notes
    on the problem and asks for a solution in the solver's own words (OPSD's wording), with no earlier attempt."""
    if frame not in _FEEDBACK_FRAME_TEXT:
        raise ValueError(f"frame must be one of {FEEDBACK_FRAMES}, got {frame!r}")
    feedback_heading, sibling_heading, request = _FEEDBACK_FRAME_TEXT[frame]
    parts = [question]
    if feedback:
        parts.append(f"{feedback_heading}\n{feedback}")
    if sibling:
        parts.append(f"{sibling_heading}\n{sibling}")
    if len(parts) == 1:
        return student_messages(question)
    parts.append(f"{request}\n{STUDENT_INSTRUCTION}")
    return [{"role": "user", "content": "\n\n".join(parts)}]


@renamed_keyword("reference", "task_solution")
def rosd_teacher_messages(question: str, sibling_solution: str | None, explanation: str | None,
                          task_solution: bool = False) -> list:
    """ROSD teacher context: the problem, a correct sibling rollout (``task_solution``: the task's worked
    solution instead; ``reference`` is its former name), the reflection's explanation of where the attempt went
    wrong (never the quote itself), and a request to solve the original question correctly. A section with
    nothing in it (None) is left out, as the authors' code does for a correct rollout that is its group's only
    success."""
    # the model reads "reference solution" here: the prompt's wording, kept as the runs were measured with it
    source = "a reference solution" if task_solution else "a correct solution by another student"
    parts = [question]
    if sibling_solution:
        parts.append(f"Here is {source}:\n{sibling_solution}")
    if explanation:
        parts.append(f"A review of an earlier attempt at this problem says:\n{explanation}")
    parts.append(f"Keep this in mind and solve the original question correctly.\n{STUDENT_INSTRUCTION}")
    return [{"role": "user", "content": "\n\n".join(parts)}]


def render(tokenizer, messages: list) -> str:
    """Messages as the prompt string the model continues (chat template with the generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
