"""The project's prompts: the student context and the teacher contexts with privileged information."""
from __future__ import annotations

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


def render(tokenizer, messages: list) -> str:
    """Messages as the prompt string the model continues (chat template with the generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
