"""Controllers: small policies that read gradient statistics and decide (batch size, LR, filtering).

Every controller keeps its state in ``state_dict`` and continues exactly after
``load_state_dict``.
"""

from gradnoise.control.batch_size import (
    LR_RULES,
    BatchDecision,
    adascale_gain,
    lr_scale,
    target_accumulation,
    with_hysteresis,
)
from gradnoise.control.controller import BatchSizeController
from gradnoise.control.gaf import GradientAgreementFilter, agreement_filter, cosine_distance

__all__ = [
    "LR_RULES",
    "BatchDecision",
    "BatchSizeController",
    "GradientAgreementFilter",
    "adascale_gain",
    "agreement_filter",
    "cosine_distance",
    "lr_scale",
    "target_accumulation",
    "with_hysteresis",
]
