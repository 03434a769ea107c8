"""Which TRL this integration was tested against, and the checks that refuse anything else loudly."""
from __future__ import annotations

import inspect

TESTED_TRL = (">=1.16", "<1.17")  # keep in step with setup.py's `trl` extra


def trl_version() -> str:
    import trl

    return trl.__version__


def check_trl_version() -> None:
    """Raise when the installed TRL is outside the tested range: the integration overrides TRL hooks whose
    meaning is only known for those versions, and computing something else silently is worse than failing."""
    from packaging.version import Version

    version = Version(trl_version())
    if not (Version("1.16") <= version < Version("1.17")):
        raise RuntimeError(f"pydistill.integrations.trl supports TRL {','.join(TESTED_TRL)}; installed TRL is "
                           f"{version}. Install `pydistill[trl]` or a pydistill release tested with TRL {version}.")


def check_hook(cls, name: str, parameters) -> None:
    """The TRL method this integration replaces must still exist with the parameters it is called with."""
    method = getattr(cls, name, None)
    if method is None:
        raise RuntimeError(f"TRL {trl_version()}: {cls.__name__}.{name} no longer exists; pydistill's integration "
                           f"cannot take over its computation")
    found = list(inspect.signature(method).parameters)
    missing = [p for p in parameters if p not in found]
    if missing:
        raise RuntimeError(f"TRL {trl_version()}: {cls.__name__}.{name} lost the parameters {missing} that "
                           f"pydistill's integration expects; its semantics may have changed")


def check_not_zero3(trainer) -> None:
    """DeepSpeed ZeRO-3 partitions the lm_head to empty shards outside its own forward; the fused op reads the
    weight directly in its backward recompute, so it cannot run there."""
    plugin = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(plugin, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        raise ValueError("DeepSpeed ZeRO-3 (zero_stage=3) is not supported by pydistill.integrations.trl: it "
                         "partitions the lm_head weight that the fused op reads; use ZeRO-2 or FSDP2")


def check_text_peft(model) -> None:
    """Adapters must leave the positions and the lm_head alone: the op reads the head's weight directly."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and hasattr(head, "base_layer"):
        raise ValueError("peft_config: target_modules includes the lm_head; pydistill's fused op reads the head's "
                         "weight directly, so adapt the decoder body only")
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        raise ValueError("peft_config: prompt-learning adapters (prefix/prompt tuning) shift the positions the "
                         "fused op scores; use LoRA-style adapters with pydistill.integrations.trl")
