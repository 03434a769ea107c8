"""Former name of :mod:`.eager` ("reference" now means only the reference model of a KL term)."""

_RENAMED = {"reference_token_stats": "eager_token_stats", "reference_topk_divergence": "eager_topk_divergence"}


def __getattr__(name):
    from .. import _deprecated
    from . import eager

    return _deprecated.renamed(__name__, name, _RENAMED, vars(eager))
