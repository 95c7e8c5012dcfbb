"""Attribution classes: RelP, AtP, activation patching and IG baselines."""
from .layer_activation_patching import LayerActivationPatching
from .layer_attribution_patching import LayerAttributionPatching
from .layer_integrated_gradients_patching import LayerIntegratedGradientsPatching
from .layer_relevance_patching import LayerRelevancePatching

__all__ = [
    "LayerRelevancePatching",
    "LayerAttributionPatching",
    "LayerActivationPatching",
    "LayerIntegratedGradientsPatching",
]
