"""Teacher kinds for self-distillation: fixed (initial weights), EMA of the student, or live."""
from __future__ import annotations

import contextlib
import copy

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from .contexts import ContextBatch, causal_lm, response_hidden_states


class Teacher:
    """Scores teacher contexts under no_grad with the configured weights.

    - ``fixed``: the initial weights. Under LoRA that is the base model with the adapter disabled (no second
      copy); for a full fine-tune, a frozen copy taken at construction.
    - ``ema``: a copy updated after each optimizer step, teacher <- (1 - rate) teacher + rate student.
    - ``live``: the current student weights.
    """

    def __init__(self, model, kind: str, ema_rate: float = 0.001, starts_from_base: bool = True):
        """``starts_from_base``: the run's initial weights are the base model's (no ``init_from``). Only then
        is the LoRA adapter switch the initial weights; a run started from a checkpoint keeps a frozen copy."""
        self.kind, self.ema_rate, self.student = kind, ema_rate, model
        self.uses_adapter_switch = (kind == "fixed" and starts_from_base
                                    and hasattr(causal_lm_wrapper(model), "disable_adapter"))
        self.copy = None
        # torch's EMA step over all tensors at once: copy <- decay * copy + (1 - decay) * student
        self.ema_step = get_ema_multi_avg_fn(decay=1.0 - ema_rate) if kind == "ema" else None
        if kind == "ema" or (kind == "fixed" and not self.uses_adapter_switch):
            self.copy = copy.deepcopy(causal_lm_wrapper(model)).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    def _context(self):
        if self.uses_adapter_switch:
            return causal_lm_wrapper(self.student).disable_adapter()
        return contextlib.nullcontext()

    @torch.no_grad()
    def hidden_states(self, batch: ContextBatch, head=None) -> torch.Tensor:
        """``head``: the head the teacher context is scored with (its copy's, or the student's it shares), when
        the caller already read it."""
        model = self.copy if self.copy is not None else self.student
        with self._context():
            return response_hidden_states(model, batch, head)

    @torch.no_grad()
    def update(self):
        if self.kind != "ema":
            return
        student = dict(causal_lm_wrapper(self.student).named_parameters())
        pairs = [(p, student[name].detach()) for name, p in self.copy.named_parameters()]
        if any(hasattr(value, "full_tensor") for _, value in pairs):
            # FSDP2 student parameters are shards (DTensor): each is gathered whole in turn, never all at once.
            for p, value in pairs:
                self.ema_step([p], [value.full_tensor() if hasattr(value, "full_tensor") else value], None)
            return
        self.ema_step([p for p, _ in pairs], [value for _, value in pairs], None)

    def state_dict(self):
        return None if self.kind != "ema" else {k: v.detach().clone() for k, v in self.copy.named_parameters()}

    def load_state_dict(self, state):
        if state is None or self.copy is None:
            return
        params = dict(self.copy.named_parameters())
        for name, value in state.items():
            params[name].data.copy_(value)


class ServedTeacher:
    """A teacher on a vLLM-compatible server (``--teacher-url``): the top-k log-probs of each rollout's tokens
    under its teacher context, for the op's top-k teacher path. It holds no weights: the server's model is the
    teacher (fixed unless the server is updated), so there is nothing to update or checkpoint."""

    def __init__(self, url: str, top_k: int, model=None, temperature: float = 1.0, timeout_s: float = 60.0):
        self.url, self.top_k, self.model, self.temperature, self.timeout_s = url, top_k, model, temperature, timeout_s

    def topk(self, batch: ContextBatch):
        """``(ids [B, T, k], logprobs [B, T, k])`` of the batch's completions, aligned with its ``targets``."""
        from ..teachers import server_topk_logprobs, stack_topk

        lengths = batch.completion_mask.sum(1).tolist()
        # right-padded context + completion: the completion starts where the context ends
        starts = [int(total) - n for total, n in zip(batch.attention_mask.sum(1).tolist(), lengths)]
        ids = batch.input_ids.tolist()
        contexts = [row[:start] for row, start in zip(ids, starts)]
        responses = [row[start:start + n] for row, start, n in zip(ids, starts, lengths)]
        pairs = server_topk_logprobs(self.url, contexts, responses, top_k=self.top_k, model=self.model,
                                     temperature=self.temperature, timeout_s=self.timeout_s)
        return stack_topk(pairs, length=batch.targets.shape[1], device=batch.targets.device)


# The options of a served teacher, shared by the trainers that take one (ROSD, FD).
TEACHER_URL_HELP = ("a teacher on a vLLM-compatible server (http://host:port): its top-k log-probs of each rollout "
                    "under the method's teacher context replace the local teacher (needs teacher='fixed')")
TEACHER_TOP_K_HELP = "with teacher_url: the teacher's top-k tokens per position (plus a tail)"
TEACHER_SERVED_MODEL_HELP = "with teacher_url: the served model's name (default: the server's first)"


def check_served_teacher_options(cfg) -> None:
    """One line for a bad ``teacher_url`` / ``teacher_top_k``, or a teacher kind that a server cannot follow."""
    if cfg.teacher_url is not None:
        if not (isinstance(cfg.teacher_url, str) and cfg.teacher_url.startswith(("http://", "https://"))):
            raise ValueError(f"teacher_url must be an http:// or https:// address, got {cfg.teacher_url!r}")
        if cfg.teacher != "fixed":  # the server's weights are whatever it loaded: nothing here updates them
            raise ValueError(f"teacher_url serves fixed weights, but teacher={cfg.teacher!r} changes during "
                             "training: use teacher='fixed' with teacher_url, or a local teacher")
    if isinstance(cfg.teacher_top_k, bool) or not isinstance(cfg.teacher_top_k, int) or cfg.teacher_top_k < 1:
        raise ValueError(f"teacher_top_k must be an integer >= 1, got {cfg.teacher_top_k!r}")


def served_teacher(trainer, temperature: float):
    """The trainer's :class:`ServedTeacher` for ``config.teacher_url`` (built on first use), or None when the
    teacher is local. ``temperature``: the one the server divides the teacher's logits by."""
    cfg = trainer.config
    if cfg.teacher_url is None:
        return None
    served = getattr(trainer, "_served_teacher", None)
    if served is None:
        served = trainer._served_teacher = ServedTeacher(cfg.teacher_url, cfg.teacher_top_k,
                                                         model=cfg.teacher_served_model, temperature=temperature)
    return served


def causal_lm_wrapper(model):
    """The model without a DDP wrapper (peft wrapper kept: it owns disable_adapter)."""
    return getattr(model, "module", model)


__all__ = ["ServedTeacher", "Teacher", "causal_lm", "causal_lm_wrapper", "check_served_teacher_options",
           "served_teacher"]
