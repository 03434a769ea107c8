"""`pydistill export`: a run's checkpoint as one standalone model folder (LoRA merged into the base weights)."""
from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_merged(checkpoint: str, output_dir: str, *, model: str, lora_r: int = 0, lora_alpha: int = 128,
                  dtype: str = "float32", overwrite: bool = False) -> str:
    """Write ``checkpoint``'s weights on top of ``model`` as a ``save_pretrained`` folder with the tokenizer
    (``AutoModelForCausalLM.from_pretrained(output_dir)`` loads it, no peft needed): a LoRA run's adapter is
    merged into the base weights. ``lora_r`` / ``lora_alpha``: the run's LoRA settings (0: a full fine-tune).
    Refuses a non-empty ``output_dir`` unless ``overwrite``. Returns ``output_dir``."""
    from .models import LoraSettings, load_model
    from .trainers.checkpoint import load_weights

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):  # before minutes of loading, not after
        raise ValueError(f"output {output_dir!r} is a file, not a folder (expected a folder to write the model to)")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"output {output_dir!r} is not empty (choose another folder or pass --overwrite)")
    lora = LoraSettings(r=lora_r, alpha=lora_alpha) if lora_r else None
    try:  # merge in float32: the adapter's update is added to the base weights before any rounding
        network, tokenizer = load_model(model, lora=lora, dtype=torch.float32, device="cpu")
    except OSError as exc:
        raise ValueError(f"model {model!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
    load_weights(network, checkpoint)
    if lora is not None:
        network = network.merge_and_unload()
    network.to(DTYPES[dtype])
    os.makedirs(output_dir, exist_ok=True)
    network.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


__all__ = ["DTYPES", "export_merged"]
