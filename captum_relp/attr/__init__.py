"""Attribution classes (RelP, AtP, activation patching, IG) and the method table."""
from .layer_activation_patching import LayerActivationPatching
from .layer_attribution_patching import LayerAttributionPatching
from .layer_integrated_gradients_patching import LayerIntegratedGradientsPatching
from .layer_relevance_patching import LayerRelevancePatching
from .methods import METHODS, Method, PassCounter, get_method

__all__ = [
    "LayerRelevancePatching",
    "LayerAttributionPatching",
    "LayerActivationPatching",
    "LayerIntegratedGradientsPatching",
    "METHODS",
    "Method",
    "PassCounter",
    "get_method",
]
