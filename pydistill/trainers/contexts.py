"""Student and teacher contexts that score the same rollout tokens, and the hidden states at those tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..model_head import logit_scale, softcap, unwrap


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


def lm_head_weight(model) -> torch.Tensor:
    return causal_lm(model).get_output_embeddings().weight


def lm_head_bias(model):
    """The head's bias times the model's logit scale (the scale folds into the op's inputs), or None."""
    bias = getattr(causal_lm(model).get_output_embeddings(), "bias", None)
    scale = logit_scale(causal_lm(model).config)
    return bias if bias is None or scale == 1.0 else bias * scale


def lm_head_softcap(model):
    """The model's final-logit softcap, to pass to every op call on its hidden states (None for most)."""
    return softcap(causal_lm(model).config)


def response_hidden_states(model, batch: ContextBatch) -> torch.Tensor:
    """Last-layer hidden states [B, T, H] (after the final norm) at the positions that predict the completion
    tokens. Runs the decoder body only: the lm_head, and so any [B, T, V] logits, is never called."""
    if isinstance(model, ResponseHiddenStates) or isinstance(getattr(model, "module", None), ResponseHiddenStates):
        return model(batch.input_ids, batch.attention_mask, batch.positions)
    return ResponseHiddenStates(model)(batch.input_ids, batch.attention_mask, batch.positions)


class ResponseHiddenStates(torch.nn.Module):
    """The decoder body as a module whose forward returns the response hidden states.

    This is what the trainer hands to accelerate: DDP's gradient synchronisation hooks into a wrapped module's
    forward, and the fused loss needs the body's output, not the model's logits. The lm_head weight stays a
    parameter of the wrapped module (it receives its gradient through the fused op in the same backward).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        # accelerate's FSDP auto-wrap reads the decoder layer classes to shard one by one from here
        self._no_split_modules = getattr(causal_lm(model), "_no_split_modules", None)

    def tie_weights(self):
        """accelerate's FSDP preparation re-ties tied embeddings after sharding through this method."""
        causal_lm(self.model).tie_weights()

    def forward(self, input_ids, attention_mask, positions):
        body = causal_lm(self.model).get_decoder()
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        # Under bf16 autocast the body may return bf16 while the head stays fp32: the fused op needs one dtype.
        hidden = hidden.to(lm_head_weight(self.model).dtype)
        scale = logit_scale(causal_lm(self.model).config)  # the model's logit multiplier, folded into h
        return hidden if scale == 1.0 else hidden * scale
