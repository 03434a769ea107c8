"""Student and teacher contexts that score the same rollout tokens; the trainers' spellings of the model boundary
(:mod:`pydistill.boundary`) on them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..boundary import Head, ResponseHiddenStates, hidden_states, read_head, unwrap


@dataclass
class ContextBatch:
    input_ids: torch.Tensor  # [B, L] right-padded context + completion
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, T] index of the hidden state that predicts completion token t
    completion_mask: torch.Tensor  # [B, T] bool
    targets: torch.Tensor  # [B, T] completion token ids (pad positions hold the pad id)


def build_context_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
                        device=None) -> ContextBatch:
    """Right-padded ``prompt + completion`` sequences, and for each completion token t of row b the position
    ``len(prompt_b) - 1 + t`` whose hidden state predicts it. Two batches built from different prompts but
    the same ``completion_ids`` (student and teacher contexts) line up row for row and token for token."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"prompt_ids and completion_ids must have one entry per rollout, got {len(prompt_ids)} "
                         f"and {len(completion_ids)}")
    b = len(prompt_ids)
    t = max((len(c) for c in completion_ids), default=0)
    length = max((len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)), default=0)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    positions = torch.zeros((b, t), dtype=torch.long)
    completion_mask = torch.zeros((b, t), dtype=torch.bool)
    targets = torch.full((b, t), pad_id, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if not p:
            raise ValueError(f"prompt {row} is empty: a completion needs at least one context token")
        seq = list(p) + list(c)
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        positions[row, :len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        completion_mask[row, :len(c)] = True
        targets[row, :len(c)] = torch.tensor(list(c), dtype=torch.long)
    to = (lambda x: x.to(device)) if device is not None else (lambda x: x)  # noqa: E731
    return ContextBatch(to(input_ids), to(attention), to(positions), to(completion_mask), to(targets))


def causal_lm(model):
    """The underlying transformers causal LM of a model that may be wrapped by peft, accelerate or compile."""
    return unwrap(model)


def teacher_head(teacher) -> Optional[Head]:
    """The head of a teacher that holds its own weights (a frozen or EMA copy); None when it reads the student's
    (one W read serves both contexts)."""
    return None if teacher is None or teacher.copy is None else read_head(teacher.copy)


def head_options(head: Head, teacher: Optional[Head] = None) -> dict:
    """The head keyword arguments of a fused loss on ``head`` (and a teacher context on ``teacher``'s: its weight,
    bias and softcap)."""
    return dict(bias=head.bias, softcap=head.softcap, **({} if teacher is None else teacher.teacher_options()))


def response_hidden_states(model, batch: ContextBatch, head: Optional[Head] = None) -> torch.Tensor:
    """The op's input [B, T, H] at the positions that predict the completion tokens (:func:`pydistill.boundary.
    hidden_states`); through ``model``'s own forward when it is the accelerate-wrapped :class:`ResponseHiddenStates`.
    ``head``: the model's head when the caller already read it (the step's one read), else read here."""
    if isinstance(model, ResponseHiddenStates) or isinstance(getattr(model, "module", None), ResponseHiddenStates):
        return model(batch.input_ids, batch.attention_mask, batch.positions, head=head)
    return hidden_states(model, batch.input_ids, batch.attention_mask, batch.positions, head=head)
