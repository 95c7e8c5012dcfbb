"""Contrastive prompt tasks used in the RelP experiments (IOI and SVA).

Example:
    >>> from captum_relp.tasks import generate_ioi_pairs, generate_sva_pairs
    >>> len(generate_ioi_pairs(3)), len(generate_sva_pairs(3, "within_rc"))
    (3, 3)
"""

from captum_relp.tasks.ioi import (
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
    IOIBatch,
    IOIMetric,
    IOIPair,
    encode_ioi,
    generate_ioi_pairs,
    ioi_metric,
)
from captum_relp.tasks.sva import (
    MAIN_VERBS,
    NOUNS,
    PREPOSITIONS,
    RC_VERBS,
    STRUCTURES,
    VERBS,
    SVABatch,
    SVAMetric,
    SVAPair,
    encode_sva,
    generate_sva_pairs,
    split_nouns,
    sva_metric,
)

__all__ = [
    "NAMES", "OBJECTS", "PLACES", "TEMPLATES", "IOIBatch", "IOIMetric", "IOIPair",
    "encode_ioi", "generate_ioi_pairs", "ioi_metric",
    "MAIN_VERBS", "NOUNS", "PREPOSITIONS", "RC_VERBS", "STRUCTURES", "VERBS", "SVABatch",
    "SVAMetric", "SVAPair", "encode_sva", "generate_sva_pairs", "split_nouns", "sva_metric",
]
