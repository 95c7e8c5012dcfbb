"""LRP rules: small objects that adapt one module's backward pass, the registry that maps
module types to rules, and the rule sets (composites) and presets built on it."""
from .attention import AHRule
from .base import ForwardPatchRule, Rule, ZeroRule
from .composites import (PRESETS, RulePlan, RuleSet, RulesLike, UnsupportedModuleError, apply_rules,
                         check_coverage, resolve_rules, rule_plan)
from .linear import EpsilonRule, GammaRule
from .nonlinear import HalfRule, IdentityRule, LayerNormRule, RMSNormRule
from .registry import register_rule, registered_rules, type_key, unregister_rule

__all__ = [
    "Rule", "ForwardPatchRule", "ZeroRule", "LayerNormRule", "RMSNormRule", "IdentityRule", "HalfRule", "AHRule",
    "EpsilonRule", "GammaRule", "RuleSet", "PRESETS", "RulePlan", "RulesLike", "rule_plan", "resolve_rules",
    "register_rule", "unregister_rule", "registered_rules", "type_key", "apply_rules", "check_coverage",
    "UnsupportedModuleError",
]
