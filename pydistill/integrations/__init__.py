"""Integrations of pydistill's fused op into other training libraries (``pydistill.integrations.trl``)."""
