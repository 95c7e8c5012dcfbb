"""Rule sets (Zennit's composites) and the named presets ``relp``, ``relp-ah`` and ``none``.

A :class:`RuleSet` says which registry categories apply, plus optional attention,
linear, per-type and per-path rules. Presets are registered here and nowhere else.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import nn

from .attention import AHRule
from .base import Rule
from .registry import needs_rule, registered_category, registry_entry, type_key

@dataclass
class RuleSet:
    """A composite: the rule categories to apply, plus optional attention and linear rules.

    Args:
        name: a label.
        categories: registry categories applied (``norm``, ``activation``, ``gate``, ``custom``).
        attention: a model-level rule for attention, e.g. :class:`~captum_relp.rules.AHRule`.
        linear: a rule for every ``nn.Linear``/``Conv1D`` (default: the 0-rule, i.e. none).
        overrides: per-type rules (``{type key: rule}``) that take precedence over the registry.
        name_map: per-module rules by path pattern (``fnmatch`` syntax on
            ``model.named_modules()`` paths, e.g. ``{"lm_head": EpsilonRule()}`` or
            ``{"*.mlp.c_fc": GammaRule()}``); the first matching pattern wins and takes
            precedence over ``overrides`` and the registry. A rule of ``None`` leaves the
            module to the 0-rule.

    Example:
        >>> from captum_relp import RuleSet
        >>> from captum_relp.rules import EpsilonRule
        >>> RuleSet("relp-eps", linear=EpsilonRule(1e-3)).categories
        ('norm', 'activation', 'gate', 'custom')
        >>> import torch
        >>> RuleSet(name_map={"lm_head": EpsilonRule()}).rule_for(torch.nn.Linear(2, 2), "lm_head")
        EpsilonRule(epsilon=1e-06)
    """

    name: str = "relp"
    categories: Tuple[str, ...] = ("norm", "activation", "gate", "custom")
    attention: Optional[Rule] = None
    linear: Optional[Rule] = None
    overrides: Dict[str, Rule] = field(default_factory=dict)
    name_map: Dict[str, Optional[Rule]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when the rule set changes nothing (plain gradients everywhere)."""
        return not (self.categories or self.attention or self.linear or self.overrides
                    or any(r is not None for r in self.name_map.values()))

    def rule_for(self, module: nn.Module, path: Optional[str] = None) -> Optional[Rule]:
        """The rule applied to ``module`` (at ``path`` in the model, for ``name_map``)."""
        if path is not None:
            for pattern, rule in self.name_map.items():
                if fnmatch.fnmatchcase(path, pattern):
                    return rule
        key = type_key(type(module))
        if key in self.overrides:
            return self.overrides[key]
        category, factory = registry_entry(key)
        if category == "linear":
            return self.linear
        if category == "attention":  # per-module attention rules (TransformerLens): the AH-rule
            return factory() if self.attention is not None and factory is not None else None
        if category in self.categories and factory is not None:
            return factory()
        return None

    def uncovered(self, model: nn.Module) -> List[Tuple[str, str]]:
        """Normalisation, activation and gated-MLP modules of ``model`` with no rule."""
        if not self.categories:
            return []
        missing, structural = [], []
        for path, module in model.named_modules():
            if any(path.startswith(prefix + ".") for prefix in structural):
                continue  # inside a module declared structural: covered as a whole
            if registered_category(type(module)) == "structural":
                structural.append(path)
            if any(fnmatch.fnmatchcase(path, pattern) for pattern in self.name_map):
                continue  # an explicit choice, also when it is None (the 0-rule)
            if registered_category(type(module)) == "attention":
                continue  # plain gradients through attention unless the rule set has the AH-rule
            if self.rule_for(module, path) is None and needs_rule(module):
                missing.append((path or "<root>", type_key(type(module))))
        return missing


PRESETS: Dict[str, Callable[[], RuleSet]] = {
    "relp": lambda: RuleSet("relp"),
    "relp-ah": lambda: RuleSet("relp-ah", attention=AHRule()),
    "none": lambda: RuleSet("none", categories=()),
}


def resolve_rules(rules: Union[str, RuleSet, None]) -> RuleSet:
    """Turn a preset name (``'relp'``, ``'relp-ah'``, ``'none'``) or a RuleSet into a RuleSet.

    Example:
        >>> resolve_rules("relp-ah").attention
        AHRule()
    """
    if rules is None:
        return PRESETS["none"]()
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str) and rules in PRESETS:
        return PRESETS[rules]()
    raise ValueError(f"rules must be one of {sorted(PRESETS)} or a RuleSet, got {rules!r}")
