"""captum-relp: Relevance Patching (RelP) for Captum.

The public API is small:

* :class:`LayerRelevancePatching` (RelP) and :class:`LayerAttributionPatching` (AtP)
* :class:`LayerActivationPatching` (exact activation patching, the ground truth)
* :class:`LayerIntegratedGradientsPatching` (Captum's LayerIntegratedGradients with a metric)
* the rule registry: :class:`RuleSet`, :func:`register_rule`, :func:`apply_rules`
* :func:`model_components` (residual stream, attention and MLP outputs per family)
* :func:`calibrate_rules` / :class:`CalibratedRules` (rule sets chosen per component type)
"""
from .attr import (
    LayerActivationPatching,
    LayerAttributionPatching,
    LayerIntegratedGradientsPatching,
    LayerRelevancePatching,
)
from .calibration import CalibratedRules, calibrate_rules
from .metrics import LogitDiff, ProbDiff, logit_diff
from .models import ModelComponents, model_components, split_heads
from .rules import (
    PRESETS,
    RuleSet,
    UnsupportedModuleError,
    apply_rules,
    register_rule,
    unregister_rule,
)

__version__ = "0.1.0"

__all__ = [
    "LayerRelevancePatching",
    "LayerAttributionPatching",
    "LayerActivationPatching",
    "LayerIntegratedGradientsPatching",
    "LogitDiff",
    "ProbDiff",
    "logit_diff",
    "ModelComponents",
    "model_components",
    "split_heads",
    "RuleSet",
    "PRESETS",
    "UnsupportedModuleError",
    "apply_rules",
    "register_rule",
    "unregister_rule",
    "calibrate_rules",
    "CalibratedRules",
]
