"""The trainers' accelerate setup: experiment trackers (``report_to``), mixed precision, gradient checkpointing.

Precision (:func:`training_precision`): a full fine-tune on CUDA loads fp32 weights and runs the forward
passes under bf16 autocast, so AdamW updates fp32 master weights (AdamW on bf16 weights loses updates
smaller than bf16's 8-bit mantissa). A LoRA run keeps the frozen base in bf16 on CUDA (peft keeps the adapter
weights in fp32). The CPU trains in fp32 without autocast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

TRACKERS = ("tensorboard", "wandb")
REPORT_TO = ("none", "all") + TRACKERS


def parse_report_to(report_to) -> list:
    """``report_to`` ("none", "all", "tensorboard", "wandb", a comma list or a list) as accelerate's
    ``log_with`` list ([] for none). Raises one ValueError naming the field for an unknown or missing tracker."""
    names = report_to if isinstance(report_to, (list, tuple)) else str(report_to).split(",")
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown or not names:
        raise ValueError(f"report_to must be one of {REPORT_TO} or a comma list of {TRACKERS}, got {report_to!r}")
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"report_to 'none' cannot be combined with other trackers, got {report_to!r}")
        return []
    if "all" in names:
        return [t for t in TRACKERS if _installed(t)]
    missing = [n for n in names if not _installed(n)]
    if missing:
        raise ValueError(f"report_to {report_to!r} needs the {', '.join(missing)} package, which is not installed "
                         f"(pip install {' '.join(missing)})")
    return names


def _installed(tracker: str) -> bool:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[tracker]()


@dataclass(frozen=True)
class Precision:
    load_dtype: Optional[torch.dtype]  # dtype the weights are loaded in (None: the loader's default)
    mixed_precision: str  # accelerate's mixed_precision: "bf16" (autocast in the forward passes) or "no"


def training_precision(full_finetune: bool, device: torch.device) -> Precision:
    """fp32 master weights with bf16 autocast for a full fine-tune on CUDA; otherwise the loader's dtype."""
    if device.type == "cuda" and full_finetune:
        bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
        return Precision(torch.float32, "bf16" if bf16 else "no")
    return Precision(None, "no")


def make_accelerator(config, full_finetune: bool):
    """The run's Accelerator: trackers from ``config.report_to`` logging under ``<output_dir>/tracking``, and
    the mixed precision of :func:`training_precision`. Returns (accelerator, precision)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = not torch.cuda.is_available()
    precision = training_precision(full_finetune, torch.device("cpu" if cpu else "cuda"))
    log_with = parse_report_to(config.report_to)
    project = ProjectConfiguration(project_dir=config.output_dir,
                                   logging_dir=os.path.join(config.output_dir, "tracking"))
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision.mixed_precision, log_with=log_with or None,
                              project_config=project)
    return accelerator, precision


def init_trackers(accelerator, config, method: str):
    """Start the trackers (main process only, as accelerate does) with the run's flat config as
    hyperparameters; TensorBoard takes only numbers, strings and booleans, so None becomes "None"."""
    from dataclasses import asdict

    if not accelerator.log_with:
        return
    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(config).items()}
    run = os.path.basename(os.path.normpath(config.output_dir)) or method
    accelerator.init_trackers(f"pydistill-{method}", config=hparams,
                              init_kwargs={"wandb": {"name": run, "dir": config.output_dir}})


def log_to_trackers(accelerator, step: int, values: dict):
    """The numeric values of one logged step to every tracker (metrics.jsonl is written separately)."""
    if accelerator.log_with:
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        accelerator.log(scalars, step=step)


def finish_trackers(accelerator):
    """Flush and close the trackers. Not ``accelerator.end_training()``: that also destroys the process group,
    which a caller may still need after ``train()`` returns."""
    for tracker in accelerator.trackers:
        tracker.finish()


def enable_gradient_checkpointing(model):
    """Recompute each decoder layer's activations in backward (transformers' non-reentrant checkpointing, which
    needs no input gradients, so it works under LoRA's frozen embeddings)."""
    from .contexts import causal_lm

    lm = causal_lm(model)
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
