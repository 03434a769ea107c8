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

from ..boundary import unwrap

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


def policy_model(config, model, tokenizer, device, precision):
    """(model, tokenizer) to train: the given model (LoRA applied when the config asks for it) or the configured
    one loaded, in the training dtype, with ``init_from``'s weights and gradient checkpointing."""
    from ..models import LoraSettings, apply_lora, load_model
    from .checkpoint import load_weights, resolve_checkpoint

    lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha) if config.lora_r else None
    if model is None:
        try:
            model, tokenizer = load_model(config.model, lora=lora, device=device, dtype=precision.load_dtype)
        except OSError as exc:  # transformers' "not a local folder and not a valid model identifier ..."
            raise ValueError(f"model {config.model!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
    elif lora is not None and not hasattr(model, "disable_adapter"):
        model = apply_lora(model, lora)
    if precision.load_dtype is not None:
        model.to(precision.load_dtype)  # fp32 master weights for AdamW (a no-op for a model loaded so)
    if config.init_from:
        load_weights(model, resolve_checkpoint(config.init_from))
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def enable_gradient_checkpointing(model):
    """Recompute each decoder layer's activations in backward (transformers' non-reentrant checkpointing, which
    needs no input gradients, so it works under LoRA's frozen embeddings)."""
    lm = unwrap(model)
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False


# ----- sharded parameters (FSDP2 through accelerate) -----------------------------------------------------------
# Under FSDP each process holds a shard of every parameter outside a wrapped module's forward. The trainers read
# the lm_head weight for the fused loss, run teacher forwards through the unwrapped model and generate with it,
# all outside the policy's forward; `root_view` makes the root unit's parameters (embeddings, final norm,
# lm_head: everything accelerate does not wrap per decoder layer) whole for that span, while each decoder
# layer gathers its own in its forward hooks. Those gathers are collectives, so every process must run the same
# number of forwards: generation passes `synced_gpus` (processes that finished keep stepping until all have).


def uses_sharded_parameters(accelerator) -> bool:
    """True under FSDP (any version) or DeepSpeed ZeRO-3; raises for the combinations the trainers do not run."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise ValueError("DeepSpeed ZeRO stage 3 is not supported by the pydistill trainers (the fused loss reads "
                             "the lm_head weight outside the forward): use zero_stage 1 or 2, or FSDP with "
                             "fsdp_version: 2 in the accelerate config")
        return False
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if not accelerator.is_fsdp2:
        raise ValueError(f"FSDP version {accelerator.state.fsdp_plugin.fsdp_version} is not supported by the "
                         "pydistill trainers: set fsdp_version: 2 in the accelerate config (FSDP1's "
                         "summon_full_params cannot span the forward and backward the fused loss needs)")
    return True


def start_sharded(policy, device):
    """FSDP2 initializes lazily in the root's first forward, and a decoder layer called before it fails: run one
    one-token forward through the root on every process."""
    one = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        policy(one, torch.ones_like(one), one)


class root_view:
    """Context: the FSDP2 root unit's parameters whole (``unshard``) until exit (``reshard``); a no-op when
    ``active`` is False. Gradients of a backward run inside still reduce-scatter to the shards."""

    def __init__(self, policy, active: bool):
        self.policy, self.active = policy, active

    def __enter__(self):
        if self.active:
            self.policy.unshard()
        return self

    def __exit__(self, *exc):
        if self.active:
            self.policy.reshard()
        return False
