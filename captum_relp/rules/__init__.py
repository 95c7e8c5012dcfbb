"""LRP rules: small objects that adapt one module's backward pass."""
from .activation import IdentityRule
from .attention import AHRule
from .base import ForwardPatchRule, Rule, ZeroRule
from .gate import HalfRule
from .linear import EpsilonRule, GammaRule
from .norm import LayerNormRule, RMSNormRule

__all__ = [
    "Rule",
    "ForwardPatchRule",
    "ZeroRule",
    "LayerNormRule",
    "RMSNormRule",
    "IdentityRule",
    "HalfRule",
    "AHRule",
    "EpsilonRule",
    "GammaRule",
]
