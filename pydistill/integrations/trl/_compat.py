"""Which TRL this integration was tested against, and the checks that refuse anything else loudly."""
from __future__ import annotations

import inspect
import logging
import os
import warnings

from ...boundary import unwrap

TESTED_TRL = (">=1.16", "<1.17")  # keep in step with setup.py's `trl` extra
# The command that installs a tested TRL (quoted: `>` and `<` are shell redirections).
INSTALL_TESTED_TRL = "pip install 'trl>=1.16,<1.17'"
ALLOW_UNTESTED_ENV = "PYDISTILL_ALLOW_UNTESTED_TRL"

logger = logging.getLogger("pydistill.integrations.trl")
_warned = set()  # untested TRL versions already warned about in this process


def trl_version() -> str:
    import trl

    return trl.__version__


def is_tested(version: str) -> bool:
    """Whether ``version`` is in :data:`TESTED_TRL`. PEP 440's ``<1.17`` excludes 1.17's dev builds and release
    candidates (a plain ``Version`` comparison would let 1.17.0.dev0 and 1.17.0rc1 in: they sort below 1.17);
    1.16.0rc1 sorts below 1.16, so it is refused too; 1.16's post and dev patch builds are accepted."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(",".join(TESTED_TRL)).contains(version, prereleases=True)


def check_trl_version(allow_untested=None) -> None:
    """Raise when the installed TRL is outside the tested range: the integration overrides TRL hooks whose
    meaning is only known for those versions, and computing something else silently is worse than failing.

    ``allow_untested=True`` (or the environment variable ``PYDISTILL_ALLOW_UNTESTED_TRL=1`` when the argument is
    None) lets an untested TRL through with one warning per version and process, for users who check the
    results themselves."""
    version = trl_version()
    if is_tested(version):
        return
    if allow_untested is None:
        allow_untested = os.environ.get(ALLOW_UNTESTED_ENV, "").strip().lower() in ("1", "true", "yes")
    if not allow_untested:
        raise RuntimeError(
            f"pydistill.integrations.trl is tested with TRL {','.join(TESTED_TRL)} (1.16.x releases); the installed "
            f"TRL is {version}, whose hooks may compute something else. Install a tested TRL: "
            f"{INSTALL_TESTED_TRL} (or a pydistill release tested with TRL {version}, when there is one). To try "
            f"TRL {version} anyway, at your own risk, set {ALLOW_UNTESTED_ENV}=1 or pass allow_untested_trl=True "
            "to the trainer (or to patch()).")
    if version not in _warned:
        _warned.add(version)
        warnings.warn(f"pydistill.integrations.trl runs with the untested TRL {version} (tested: "
                      f"{','.join(TESTED_TRL)}), as {ALLOW_UNTESTED_ENV} / allow_untested_trl asked: compare a few "
                      f"steps with TRL's own trainer before trusting the losses; {INSTALL_TESTED_TRL} installs a "
                      "tested TRL", UserWarning, stacklevel=3)


def announce(trainer, op: str) -> None:
    """The one INFO line (logger ``pydistill.integrations.trl``) that says a drop-in runs the fused op, so a
    user can tell from the logs that it is pydistill's path and not TRL's: the op, the fold implementation
    ``impl="auto"`` picks for the model's device, and the trainer's memory budget per op call (``memory_budget_mb``)."""
    from ...token_stats import _triton_available
    from ._head import memory_budget

    try:
        device = next(trainer.model.parameters()).device
    except (AttributeError, StopIteration):  # a model without parameters: report the CPU choice
        device = None
    impl = "triton" if device is not None and device.type == "cuda" and _triton_available() else "torch"
    logger.info("pydistill: %s runs the fused op (%s), no [B, T, V] logits; impl=auto -> %s on %s; memory budget "
                "%g MB per call; TRL %s", type(trainer).__name__, op, impl, device or "cpu",
                memory_budget(trainer), trl_version())


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
    inner = unwrap(model)  # PEFT's injected layers stay in the base model it returns
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and hasattr(head, "base_layer"):
        raise ValueError("peft_config: target_modules includes the lm_head; pydistill's fused op reads the head's "
                         "weight directly, so adapt the decoder body only")
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        raise ValueError("peft_config: prompt-learning adapters (prefix/prompt tuning) shift the positions the "
                         "fused op scores; use LoRA-style adapters with pydistill.integrations.trl")
