"""The model side of the op, written once: the causal LM inside its wrappers, and its output head as the op reads it.

Some architectures transform the head's logits before the softmax: a multiplier (Cohere ``logit_scale``, Granite
``logits_scaling``, ``output_multiplier``, ``lm_head_multiplier``) and a final softcap (Gemma-2
``final_logit_softcapping``). The op computes ``cap(h W^T + b) / T``; the multiplier folds into its inputs,
``cap(s (h W^T + b)) == cap((s h) W^T + s b)``, and the softcap is its own option. Every path that scores a model
through the op (the bundled trainers, the TRL integration, the teachers) reads the head here, so that none scores
a Gemma-2, Cohere or Granite model on the wrong logits.
"""
from __future__ import annotations


def unwrap(model):
    """The transformers causal LM inside DDP / DeepSpeed (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT
    (``get_base_model()``)."""
    inner = model
    for _ in range(4):  # the wrappers nest in any order, a few deep at most
        inner = getattr(inner, "module", inner)
        inner = getattr(inner, "_orig_mod", inner)
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
    return inner


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_scale(config) -> float:
    """The multiplier on the raw logits before the softcap (1.0 for most architectures), from the config fields
    TRL reads: ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling`` (a divisor,
    except for HyperCLOVA X)."""
    text = _text_config(config)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(text, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def softcap(config):
    """The final-logit softcap c (``z -> c tanh(z / c)``), or None."""
    return getattr(_text_config(config), "final_logit_softcapping", None)
