"""Calibrated rules: choose the LRP rule set per component type from exact patching runs.

Which LRP rules make RelP agree best with activation patching (AP) depends on the
model and the task: the LN-rule may help on the residual stream and hurt on
attention outputs. :func:`calibrate_rules` runs exact AP once on a few calibration
pairs, runs RelP with every candidate :class:`~captum_relp.RuleSet`, and keeps, per
group of layers (``resid``/``attn``/``mlp`` by default), the best fixed preset (the
gradient, i.e. AtP, ``relp`` or ``relp-ah``, whichever agrees best with AP) unless another
candidate beats it beyond the noise (a paired bootstrap over the calibration pairs, the
selection in ``calibration._select``). The result,
:class:`CalibratedRules`, is saved as versioned, validated JSON
(the file schema in ``calibration._schema``) and is accepted as ``rules=`` by
:class:`~captum_relp.LayerRelevancePatching`.
"""
from ._select import bootstrap_interval, paired_bootstrap
from .calibrate import (
    CalibrationWarning,
    CandidateScores,
    calibrate_on_batch,
    calibrate_rules,
    calibrated_ioi_rules,
    choose_rules,
    score_candidates,
)
from .calibrated_rules import (
    SCORES,
    CalibratedRules,
    agreement,
    default_candidates,
    explicit_ruleset,
    infer_groups,
    model_categories,
)

__all__ = ["CalibratedRules", "calibrate_rules", "calibrated_ioi_rules", "calibrate_on_batch", "score_candidates",
           "choose_rules", "CandidateScores", "CalibrationWarning", "default_candidates", "model_categories",
           "explicit_ruleset", "infer_groups", "agreement", "SCORES", "paired_bootstrap", "bootstrap_interval"]
