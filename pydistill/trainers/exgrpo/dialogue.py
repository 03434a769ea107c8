"""Multi-turn dialogues as token sequences, for ExGRPO's k-turn rollouts.

A dialogue is a list of turns, each a user text and the token ids the student generated in reply. The
builder renders the chat template around them piece by piece, so that:

- the prompt of turn i (:meth:`DialogueBuilder.prompt_ids`) is exactly the prefix the student conditions on
  when it generates reply i, and the full sequence (:meth:`DialogueBuilder.build`) contains those same ids;
- the generated ids are kept as generated (never re-tokenized from text), so the training positions score
  exactly the sampled tokens;
- a mask marks the trained tokens (every reply's generated ids), and each token knows its turn.

Works with any template whose rendering of a conversation is a prefix of the rendering of that conversation
extended by more messages (ChatML, Llama 3, SmolLM2 and most instruct templates).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ...prompts import student_messages
from ..contexts import ContextBatch, build_context_batch


@dataclass(frozen=True)
class Turn:
    user: str
    reply_ids: tuple  # generated token ids of the assistant's reply (EOS included if generated)


@dataclass
class DialogueTokens:
    input_ids: list  # the whole dialogue
    trained: list  # 1 where the token is a generated reply token
    turn: list  # turn index of each token (the template text of a turn belongs to it)
    reply_spans: list  # (start, stop) of each reply in input_ids


class DialogueBuilder:
    """Token sequences of dialogues under ``tokenizer``'s chat template (optional fixed system prompt)."""

    def __init__(self, tokenizer, system: Optional[str] = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer must have a chat_template to build dialogues")
        self.tokenizer = tokenizer
        self.system = system
        eos = tokenizer.eos_token_id
        self.end_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    def _messages(self, turns: Sequence[Turn], next_user: Optional[str] = None) -> list:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for t in turns:
            messages.append({"role": "user", "content": t.user})
            messages.append({"role": "assistant", "content": self._reply_text(t)})
        if next_user is not None:
            messages.append({"role": "user", "content": next_user})
        return messages

    def _reply_text(self, turn: Turn) -> str:
        return self.tokenizer.decode(self._strip_end(turn.reply_ids), skip_special_tokens=False)

    def _render(self, messages, generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str) -> list:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _extension(self, rendered: str, longer: str) -> str:
        if not longer.startswith(rendered):
            raise ValueError("the chat template does not render a conversation as a prefix of its extension")
        return longer[len(rendered):]

    def build(self, turns: Sequence[Turn], next_user: Optional[str] = None) -> DialogueTokens:
        """The dialogue's tokens; with ``next_user``, ending with the generation prompt of one more turn."""
        out = DialogueTokens([], [], [], [])

        def add(ids, trained, turn):
            out.input_ids += ids
            out.trained += [trained] * len(ids)
            out.turn += [turn] * len(ids)

        rendered = ""
        for i, turn in enumerate(turns):
            with_prompt = self._render(self._messages(turns[:i], turn.user), True)
            add(self._encode(self._extension(rendered, with_prompt)), 0, i)
            reply = list(turn.reply_ids)
            start = len(out.input_ids)
            add(reply, 1, i)
            out.reply_spans.append((start, len(out.input_ids)))
            closed = self._render(self._messages(turns[: i + 1]), False)
            tail, reply_text = self._extension(with_prompt, closed), self._reply_text(turn)
            if not tail.startswith(reply_text):
                raise ValueError(f"reply {i} is changed by the chat template (e.g. stripped) and cannot be aligned")
            # What the template writes after the reply (end-of-turn marker, newline), less the end-of-turn
            # token(s) the model generated itself, which are already in the reply ids.
            closing = tail[len(reply_text):]
            generated_end = self.tokenizer.decode(reply[len(self._strip_end(reply)):], skip_special_tokens=False)
            if generated_end and closing.startswith(generated_end):
                closing = closing[len(generated_end):]
            add(self._encode(closing), 0, i)
            rendered = closed
        if next_user is not None:
            add(self._encode(self._extension(rendered, self._render(self._messages(turns, next_user), True))),
                0, len(turns))
        return out

    def _strip_end(self, ids: list) -> list:
        ids = list(ids)
        while ids and ids[-1] in self.end_ids:
            ids.pop()
        return ids

    def prompt_ids(self, turns: Sequence[Turn], next_user: str) -> list:
        """Ids the student conditions on to generate its reply to ``next_user`` after ``turns``."""
        return self.build(turns, next_user).input_ids


def probe_turn(probe: str) -> str:
    """A probe as a user turn, in the student's own prompt format."""
    return student_messages(probe)[0]["content"]


def question_turn(question: str) -> str:
    """The question as the dialogue's last user turn: exactly the single-pass inference prompt's content."""
    return student_messages(question)[0]["content"]


def dialogue_context_batch(dialogues: Sequence[DialogueTokens], pad_id: int, device=None) -> ContextBatch:
    """Rows of whole dialogues in the trainer's layout: the "completion" of a row runs from its first reply to
    the end of its last one, and its mask marks the reply tokens only (template and user text are context)."""
    prompts, completions, masks = [], [], []
    for d in dialogues:
        if not d.reply_spans:
            raise ValueError("a dialogue needs at least one reply")
        start, stop = d.reply_spans[0][0], d.reply_spans[-1][1]
        prompts.append(d.input_ids[:start])
        completions.append(d.input_ids[start:stop])
        masks.append(d.trained[start:stop])
    batch = build_context_batch(prompts, completions, pad_id, device)
    trained = torch.zeros_like(batch.completion_mask)
    for row, mask in enumerate(masks):
        trained[row, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    batch.completion_mask = trained
    return batch


def context_rows(batch: ContextBatch, rows: slice) -> ContextBatch:
    """The rows ``rows`` of ``batch`` as a batch of their own."""
    return ContextBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.positions[rows],
                        batch.completion_mask[rows], batch.targets[rows])
