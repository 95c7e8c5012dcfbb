"""Rule sets (Zennit's composites), the named presets ``relp``, ``relp-ah`` and ``none``, and
applying a rule set to a model for the duration of a ``with`` block, with strict coverage.

A :class:`RuleSet` says which registry categories apply, plus optional attention,
linear, per-type and per-path rules. Presets are registered here and nowhere else.
"""
from __future__ import annotations

import fnmatch
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import (AbstractSet, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union,
                    runtime_checkable)

from torch import nn

from .. import families
from .attention import AHRule, require_ah_calls
from .base import Rule, UnsupportedModuleError, ZeroRule
from .nonlinear import GATED_MLP_ATTRIBUTES
from .registry import needs_rule, registered_category, registry_entry, type_key


@dataclass
class RuleSet:
    """A composite: the rule categories to apply, plus optional attention and linear rules.

    Args:
        name: a label.
        categories: registry categories applied (``norm``, ``activation``, ``gate``, ``custom``).
        attention: a model-level rule for attention, e.g. :class:`~captum_relp.rules.AHRule`.
        linear: a rule for every ``nn.Linear``/``Conv1D`` (default: the 0-rule, i.e. none).
        overrides: per-type rules (``{type key: rule}``, keyed by
            :func:`~captum_relp.rules.type_key` or by the class itself) that take precedence
            over the registry; a type the model has no module of raises when the rules are
            applied (:meth:`check_overrides`).
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

    def __post_init__(self) -> None:
        self.overrides = {type_key(key): rule for key, rule in self.overrides.items()}

    @property
    def is_empty(self) -> bool:
        """True when the rule set changes nothing (plain gradients everywhere)."""
        return not (self.categories or self.attention or self.linear or self.overrides
                    or any(r is not None for r in self.name_map.values()))

    def plan(self, model: Optional[nn.Module], layers: Sequence[nn.Module],
             flags: Sequence[bool]) -> List[Tuple["RuleSet", List[int]]]:
        """This rule set for every layer (the :class:`RulePlan` protocol)."""
        return [(self, list(range(len(layers))))]

    def rule_for(self, module: nn.Module, path: Optional[str] = None,
                 plain: AbstractSet[str] = frozenset()) -> Optional[Rule]:
        """The rule applied to ``module`` (at ``path`` in the model, for ``name_map``); ``None``
        (the plain gradient) for paths in ``plain`` that ``name_map`` does not name (the
        family's query/key norms, :func:`~captum_relp.families.gradient_paths`)."""
        if path is not None:
            for pattern, rule in self.name_map.items():
                if fnmatch.fnmatchcase(path, pattern):
                    return rule
            if _within(path, plain):
                return None
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

    def check_patterns(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` naming each ``name_map`` pattern that matches no module path.

        Example:
            >>> import torch
            >>> RuleSet(name_map={"lm_head": None}).check_patterns(torch.nn.Sequential(torch.nn.Linear(1, 1)))
            Traceback (most recent call last):
            ...
            ValueError: RuleSet 'relp': name_map pattern(s) ['lm_head'] match no module of Sequential (its paths look like ['', '0'])
        """
        paths = [path for path, _ in model.named_modules()]
        unmatched = [p for p in self.name_map if not any(fnmatch.fnmatchcase(path, p) for path in paths)]
        if unmatched:
            raise ValueError(f"RuleSet {self.name!r}: name_map pattern(s) {unmatched} match no module of "
                             f"{type(model).__name__} (its paths look like {paths[:5]})")

    def check_overrides(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` naming each ``overrides`` type that ``model`` has no module of.

        The message lists the module types of ``model`` that carry rules. Exempt: the 0-rule
        on a registered type of a category this rule set leaves to the plain gradient (what
        :func:`~captum_relp.calibration.explicit_ruleset` adds), which changes nothing anywhere.

        Example:
            >>> import torch
            >>> from captum_relp.rules import IdentityRule
            >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU())
            >>> RuleSet(overrides={torch.nn.GELU: IdentityRule()}).check_overrides(net)
            Traceback (most recent call last):
            ...
            ValueError: RuleSet 'relp': overrides for module type(s) ['torch.nn.modules.activation.GELU'] that Sequential does not contain; its module types with rules: ['torch.nn.modules.activation.ReLU', 'torch.nn.modules.linear.Linear'] (override by type_key(cls) of one of them)
        """
        present = {type_key(type(module)) for module in model.modules()}
        absent = sorted(key for key, rule in self.overrides.items()
                        if key not in present and not self._spells_out_gradient(key, rule))
        if absent:
            ruled = _ruled_types(model)
            listing = str(ruled[:12])[:-1] + (f", ... {len(ruled) - 12} more]" if len(ruled) > 12 else "]")
            raise ValueError(f"RuleSet {self.name!r}: overrides for module type(s) {absent} that "
                             f"{type(model).__name__} does not contain; its module types with rules: {listing} "
                             "(override by type_key(cls) of one of them)")

    def _spells_out_gradient(self, key: str, rule: Optional[Rule]) -> bool:
        """The 0-rule on a registered type whose category this rule set does not apply."""
        category = registered_category(key)
        return type(rule) is ZeroRule and category is not None and category not in self.categories

    def uncovered(self, model: nn.Module) -> List[Tuple[str, str]]:
        """Normalisation, activation and gated-MLP modules of ``model`` with no rule."""
        if not self.categories:
            return []
        missing, structural = [], []
        plain = families.gradient_paths(model)
        for path, module in model.named_modules():
            if any(path.startswith(prefix + ".") for prefix in structural):
                continue  # inside a module declared structural: covered as a whole
            if registered_category(type(module)) == "structural":
                structural.append(path)
            if any(fnmatch.fnmatchcase(path, pattern) for pattern in self.name_map):
                continue  # an explicit choice, also when it is None (the 0-rule)
            if registered_category(type(module)) == "attention" or _within(path, plain):
                continue  # plain gradients through attention (unless the AH-rule) and query/key norms
            if self.rule_for(module, path) is None and needs_rule(module):
                missing.append((path or "<root>", type_key(type(module))))
        return missing


def _ruled_types(model: nn.Module) -> List[str]:
    """Sorted type keys of the modules of ``model`` that a rule can apply to."""
    ruled = ("norm", "activation", "gate", "linear", "custom", "attention")
    return sorted({type_key(type(module)) for module in model.modules()
                   if registered_category(type(module)) in ruled or needs_rule(module)})


def _within(path: str, plain: AbstractSet[str]) -> bool:
    """``path`` is one of ``plain`` or inside one (StableLM's query/key norms hold a LayerNorm per head)."""
    return path in plain or any(path.startswith(prefix + ".") for prefix in plain)


PRESETS: Dict[str, Callable[[], RuleSet]] = {
    "relp": lambda: RuleSet("relp"),
    "relp-ah": lambda: RuleSet("relp-ah", attention=AHRule()),
    "none": lambda: RuleSet("none", categories=()),
}


@runtime_checkable
class RulePlan(Protocol):
    """The one question every ``rules=`` value answers: which rule set applies to which
    attributed layer (a :class:`RuleSet` answers "this one, for all of them";
    :class:`~captum_relp.CalibratedRules` one per layer group). The rule set then says
    which rule applies to which module (``RuleSet.rule_for``).
    """

    @property
    def is_empty(self) -> bool:
        """True when no rule is applied anywhere (so no model is needed)."""

    def plan(self, model: Optional[nn.Module], layers: Sequence[nn.Module],
             flags: Sequence[bool]) -> List[Tuple[RuleSet, List[int]]]:
        """``(rule set, layer indices)`` pairs covering every layer once; one pass each."""


RulesLike = Union[str, RulePlan, None]


def rule_plan(rules: RulesLike) -> RulePlan:
    """What any ``rules=`` value stands for: a preset name (or ``None``, the ``"none"``
    preset) becomes its :class:`RuleSet`; a :class:`RuleSet` or another :class:`RulePlan`
    (:class:`~captum_relp.CalibratedRules`) is returned as it is.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GELU())
        >>> [(rs.name, idx) for rs, idx in rule_plan("relp").plan(net, [net[0], net[1]], [False, False])]
        [('relp', [0, 1])]
    """
    if rules is None:
        return PRESETS["none"]()
    if isinstance(rules, str) and rules in PRESETS:
        return PRESETS[rules]()
    if isinstance(rules, RulePlan) and not isinstance(rules, str):
        return rules
    raise ValueError(f"rules must be one of {sorted(PRESETS)}, a RuleSet or CalibratedRules, got {rules!r}")


def resolve_rules(rules: RulesLike) -> RuleSet:
    """The one :class:`RuleSet` a preset name (``'relp'``, ``'relp-ah'``, ``'none'``) or a
    RuleSet stands for, where one rule set applies to the whole model (edges, feature edges,
    :func:`~captum_relp.apply_rules`).

    Example:
        >>> resolve_rules("relp-ah").attention
        AHRule()
    """
    resolved = rule_plan(rules)
    if not isinstance(resolved, RuleSet):
        raise ValueError(
            f"{type(resolved).__name__} chooses a rule set per attributed layer; here one rule set applies "
            "to the whole model: pass a preset name or a RuleSet (e.g. one of its candidates)"
        )
    return resolved



def check_coverage(model: nn.Module, ruleset: RuleSet, strict: bool = True) -> None:
    """Raise (strict) or warn about normalisation/activation/gate modules with no rule.

    Example:
        >>> import torch
        >>> check_coverage(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GELU()), RuleSet())
    """
    unknown = families.unknown_family_message(model) if ruleset.categories else None
    problems = [] if unknown is None else [unknown]
    missing = ruleset.uncovered(model)
    if missing:
        types = sorted({t for _, t in missing})
        listing = ", ".join(f"{p} ({t.rsplit('.', 1)[-1]})" for p, t in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        examples = {t: model.get_submodule(p) if p != "<root>" else model for p, t in reversed(missing)}
        fixes = "; ".join(f"{t.rsplit('.', 1)[-1]}: {suggested_fix(t, examples[t])}" for t in types[:4])
        problems.append(
            f"No LRP rule for {len(missing)} module(s) under rule set {ruleset.name!r}: {listing}{more}. "
            f"Types: {types}. Suggested: {fixes}. Or pass strict=False to use plain gradients through them."
        )
    if not problems:
        return
    message = " ".join(problems)
    if strict:
        raise UnsupportedModuleError(message)
    warnings.warn(message, stacklevel=3)


def suggested_fix(key: str, module: nn.Module) -> str:
    """The registration that fits a module strict mode flags (norm, activation, gate, linear-like).

    Example:
        >>> import torch
        >>> "category='structural'" in suggested_fix("my.Conv", torch.nn.Conv2d(1, 1, 1))
        True
    """
    name = type(module).__name__.lower()
    if "norm" in name:
        return (f"captum_relp.register_rule({key!r}, LayerNormRule()) (RMSNormRule() if it does not "
                f"subtract the mean; weight_offset=1.0 if it scales by 1 + weight)")
    if all(hasattr(module, attr) for attr in GATED_MLP_ATTRIBUTES):
        return f"captum_relp.register_rule({key!r}, HalfRule())"
    linear_like = (nn.Embedding, nn.EmbeddingBag, nn.Linear, nn.modules.conv._ConvNd)
    if isinstance(module, linear_like) or "embed" in name or "conv" in name:
        return (f"captum_relp.register_rule({key!r}, None, category='structural') if it is linear in "
                f"the attributed activations (embeddings, convolutions, projections)")
    if next(module.children(), None) is None:
        return (f"captum_relp.register_rule({key!r}, IdentityRule()) if it is a pointwise activation "
                f"with f(0) = 0, else a rule of its own (see {families.GUIDE})")
    return f"a rule of its own for its nonlinearity (see {families.GUIDE})"


_RULED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_RULED_LOCK = threading.Lock()


@contextmanager
def apply_rules(
    model: nn.Module, rules: Union[str, RuleSet, None] = "relp", strict: bool = True
) -> Iterator[RuleSet]:
    """Apply a rule set to ``model`` for the duration of the ``with`` block.

    The forward output is unchanged; the backward pass follows the rules. Every
    patch is undone on exit, also when an exception is raised.

    Example:
        >>> import torch
        >>> from captum_relp import apply_rules
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.GELU())
        >>> x = torch.randn(2, 3)
        >>> with apply_rules(net, "relp"):
        ...     y = net(x)
        >>> torch.equal(y, net(x))
        True
    """
    ruleset = resolve_rules(rules)
    ruleset.check_patterns(model)
    ruleset.check_overrides(model)
    check_coverage(model, ruleset, strict)
    refusal = families.ah_refusal(model) if ruleset.attention is not None else None
    if refusal is not None:
        raise UnsupportedModuleError(refusal)
    with ruled(model):
        undos = []
        try:
            per_module_attention = False
            plain = families.gradient_paths(model)
            for path, module in model.named_modules():
                rule = ruleset.rule_for(module, path, plain)
                if rule is not None:
                    undos.append(rule.apply(module))
                    per_module_attention |= registered_category(type(module)) == "attention"
            if ruleset.attention is not None:  # families computing attention in their own code
                undos += [rule.apply(module) for module, rule in families.ah_module_rules(model)]
            hf_config = hasattr(getattr(model, "config", None), "_attn_implementation")
            if ruleset.attention is not None and families.switches_attention_function(model) and (
                    hf_config or not per_module_attention):
                undos.append(ruleset.attention.apply(model))
                if hf_config and not per_module_attention and isinstance(ruleset.attention, AHRule):
                    undos.append(require_ah_calls(model))  # attention that bypasses the wrapper raises
            undos += [rule.apply(model) for rule in families.model_rules(model, ruleset.categories)]
            yield ruleset
        finally:
            for undo in reversed(undos):
                undo()


@contextmanager
def ruled(model: nn.Module) -> Iterator[nn.Module]:
    """Mark ``model`` as having rules applied for the ``with`` block; a second, nested or
    concurrent, application to the same model raises a ``RuntimeError``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(1, 1)
        >>> with ruled(net):
        ...     with ruled(net): pass
        Traceback (most recent call last):
        ...
        RuntimeError: rules are already applied to this Linear (nested or concurrent apply_rules on one model): the second set would wrap the first and contexts exited out of order would leave modules patched
    """
    with _RULED_LOCK:
        if model in _RULED:
            raise RuntimeError(
                f"rules are already applied to this {type(model).__name__} (nested or concurrent "
                "apply_rules on one model): the second set would wrap the first and contexts exited out "
                "of order would leave modules patched"
            )
        _RULED.add(model)
    try:
        yield model
    finally:
        with _RULED_LOCK:
            _RULED.discard(model)
