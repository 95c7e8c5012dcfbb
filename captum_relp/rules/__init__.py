"""LRP rules: small objects that adapt one module's backward pass."""
from .activation import IdentityRule
from .attention import AHRule
from .base import ForwardPatchRule, PassRule, Rule
from .gate import HalfRule
from .linear import EpsilonRule, GammaRule
from .norm import LayerNormRule, RMSNormRule

ZeroRule = PassRule

__all__ = [
    "Rule",
    "ForwardPatchRule",
    "PassRule",
    "ZeroRule",
    "LayerNormRule",
    "RMSNormRule",
    "IdentityRule",
    "HalfRule",
    "AHRule",
    "EpsilonRule",
    "GammaRule",
]
