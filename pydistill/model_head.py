"""Former home of the model side of the op (0.2.0); everything is in :mod:`pydistill.boundary` now."""
from .boundary import logit_scale, softcap, unwrap

__all__ = ["logit_scale", "softcap", "unwrap"]
