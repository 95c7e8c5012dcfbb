"""Rule registry and presets: which LRP rule applies to which module type.

Module types are keyed by their qualified name (``module.ClassName``), so the
registry covers Hugging Face families without importing every modeling file;
actual classes can be registered too. Each entry has a *category* (``norm``,
``activation``, ``gate``, ``linear`` or ``custom``); a :class:`RuleSet` (Zennit
calls it a composite) enables categories and adds an optional attention rule.
"""
from __future__ import annotations

import fnmatch
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from torch import nn

from . import families
from .families import registry_entries
from .rules import AHRule, EpsilonRule, GammaRule, HalfRule, IdentityRule, LayerNormRule, Rule
from .rules.fused_gate import LAYOUTS
from .rules.gate import GATED_MLP_ATTRIBUTES
from .rules.hookpoint import TRANSFORMER_LENS_ENTRIES, HookPointRule, has_hook_points
from .rules.norm import RMSNormRule

RuleFactory = Callable[[], Rule]
CATEGORIES = ("norm", "activation", "gate", "linear", "structural", "custom", "attention")

_ACT = "transformers.activations."
_TORCH_ACT = "torch.nn.modules.activation."

_DEFAULT_ENTRIES: Dict[str, Tuple[str, RuleFactory]] = {
    "torch.nn.modules.normalization.LayerNorm": ("norm", LayerNormRule),
    "torch.nn.modules.normalization.RMSNorm": ("norm", RMSNormRule),
    "torch.nn.modules.linear.Linear": ("linear", None),  # type: ignore[dict-item]
    "transformers.pytorch_utils.Conv1D": ("linear", None),  # type: ignore[dict-item]
}
_DEFAULT_ENTRIES.update(registry_entries())  # norms, gated MLPs, attention ... of the family table
# the package's own SAE: ReLU (piecewise linear) encoder, so the Identity-rule equals its gradient;
# an SAE splice runs the encoder without gradients and only its linear decoder on the gradient path,
# so nothing below a splice needs a rule (whatever dictionary type it holds)
_DEFAULT_ENTRIES["captum_relp.circuits.sae.SparseAutoencoder"] = ("structural", None)  # type: ignore[assignment]
_DEFAULT_ENTRIES["captum_relp.circuits.nodes.SAESplice"] = ("structural", None)  # type: ignore[assignment]
for _name in (
    "GELUTanh", "NewGELUActivation", "GELUActivation", "SiLUActivation", "FastGELUActivation",
    "QuickGELUActivation", "AccurateGELUActivation", "MishActivation", "ReLUSquaredActivation",
):
    _DEFAULT_ENTRIES[_ACT + _name] = ("activation", IdentityRule)
for _name in ("GELU", "SiLU", "ReLU", "Tanh", "Mish", "LeakyReLU"):
    _DEFAULT_ENTRIES[_TORCH_ACT + _name] = ("activation", IdentityRule)

_DEFAULT_ENTRIES.update(TRANSFORMER_LENS_ENTRIES)  # type: ignore[arg-type]

_REGISTRY: Dict[str, Tuple[str, Optional[RuleFactory]]] = dict(_DEFAULT_ENTRIES)
_NOT_ACTIVATIONS = {"Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention"}


def type_key(module_type: Union[type, str]) -> str:
    """The registry key of a module type: ``'<module>.<ClassName>'``.

    Example:
        >>> import torch
        >>> type_key(torch.nn.LayerNorm)
        'torch.nn.modules.normalization.LayerNorm'
    """
    if isinstance(module_type, str):
        return module_type
    return f"{module_type.__module__}.{module_type.__qualname__}"


def registered_category(module_type: Union[type, str]) -> Optional[str]:
    """The registry category of a module type (``None`` if it is not registered).

    Example:
        >>> import torch
        >>> registered_category(torch.nn.LayerNorm), registered_category("my.Unknown")
        ('norm', None)
    """
    return _REGISTRY.get(type_key(module_type), (None, None))[0]


def _category_of(rule: Rule) -> str:
    if isinstance(rule, HookPointRule) and "hook_pattern" in rule.hooks:
        return "attention"
    if isinstance(rule, LayerNormRule) or (isinstance(rule, HookPointRule) and "hook_scale" in rule.hooks):
        return "norm"
    if isinstance(rule, IdentityRule):
        return "activation"
    if isinstance(rule, HalfRule):
        return "gate"
    if isinstance(rule, (EpsilonRule, GammaRule)):
        return "linear"
    return "custom"


def register_rule(
    module_type: Union[type, str],
    rule: Union[Rule, RuleFactory, None],
    category: Optional[str] = None,
) -> None:
    """Register the LRP rule for a module type (a class or its qualified name).

    Args:
        module_type: the module class, or ``'package.module.ClassName'``.
        rule: a :class:`~captum_relp.rules.Rule` instance or a zero-argument factory.
        category: ``norm``, ``activation``, ``gate``, ``structural``, ``custom`` or ``attention``
            (default: inferred from the rule). Presets apply ``norm``/``activation``/``gate``/``custom``;
            ``attention`` rules (per-module AH-rules, e.g. on TransformerLens attention) apply
            when the rule set has an ``attention`` rule. ``structural`` (with ``rule=None``)
            declares a module type that needs no rule (linear in the attributed activations, or
            off their path), so strict mode stops flagging it and its submodules.

    Example:
        >>> import torch
        >>> from captum_relp import register_rule, unregister_rule
        >>> from captum_relp.rules import IdentityRule
        >>> class MyAct(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> register_rule(MyAct, IdentityRule())
        >>> unregister_rule(MyAct)
    """
    if rule is None:
        if category != "structural":
            raise ValueError("rule=None is only allowed with category='structural'")
        _REGISTRY[type_key(module_type)] = (category, None)
        return
    factory = rule if not isinstance(rule, Rule) else (lambda: rule)
    category = category or _category_of(factory())
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    _REGISTRY[type_key(module_type)] = (category, factory)


def unregister_rule(module_type: Union[type, str]) -> None:
    """Remove a registered module type (restoring the built-in entry, if any).

    Example:
        >>> unregister_rule("my.module.Unknown")
    """
    key = type_key(module_type)
    if key in _DEFAULT_ENTRIES:
        _REGISTRY[key] = _DEFAULT_ENTRIES[key]
    else:
        _REGISTRY.pop(key, None)


def registered_rules() -> Dict[str, Tuple[str, str]]:
    """A copy of the registry as ``{type key: (category, rule repr)}``.

    Example:
        >>> registered_rules()["torch.nn.modules.normalization.LayerNorm"]
        ('norm', 'LayerNormRule(centered=True, weight_offset=0.0)')
    """
    return {
        key: (cat, repr(factory()) if factory is not None
              else "none needed (structural)" if cat == "structural" else "0-rule (gradient)")
        for key, (cat, factory) in _REGISTRY.items()
    }


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
        category, factory = _REGISTRY.get(key, (None, None))
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


def needs_rule(module: nn.Module) -> bool:
    """Whether strict mode requires a rule for ``module`` (norms, activations, gated MLPs).

    Example:
        >>> import torch
        >>> needs_rule(torch.nn.GELU()), needs_rule(torch.nn.Linear(2, 2))
        (True, False)
    """
    cls = type(module)
    name = cls.__name__
    if name in _NOT_ACTIVATIONS or registered_category(cls) in ("linear", "structural"):
        return False
    if "norm" in name.lower():
        return True
    if cls.__module__ in ("torch.nn.modules.activation", "transformers.activations"):
        return True
    if name.endswith("Activation"):
        return True
    if has_hook_points(module):  # TransformerLens: norms, attention, MLPs computed in code
        return True
    if any(all(hasattr(module, attr) for attr in attrs) for attrs in (GATED_MLP_ATTRIBUTES, *LAYOUTS.values())):
        return True  # gated MLPs, also with fused gate/up projections (Phi-3, ModernBERT)
    # a leaf module of unknown type computes something of its own (e.g. x * sigmoid(x))
    is_leaf = next(module.children(), None) is None
    return is_leaf and not _is_structural_leaf(cls)


def _is_structural_leaf(cls: type) -> bool:
    """Leaves known to be linear in the attributed activations or off their path."""
    if cls.__module__.startswith("transformers.models.") and cls.__name__.endswith("RotaryEmbedding"):
        return True  # cos/sin of positions only
    return cls.__module__ in ("torch.nn.modules.dropout", "torch.nn.modules.sparse",
                              "torch.nn.modules.linear", "torch.nn.modules.flatten",
                              "torch.nn.modules.container", "torch.nn.modules.pooling")


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


class UnsupportedModuleError(TypeError):
    """Raised in strict mode when a model holds modules that no rule covers."""


def check_coverage(model: nn.Module, ruleset: RuleSet, strict: bool = True) -> None:
    """Raise (strict) or warn about normalisation/activation/gate modules with no rule.

    Example:
        >>> import torch
        >>> check_coverage(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GELU()), RuleSet())
    """
    problems = []
    unknown = families.unknown_family_message(model) if ruleset.categories else None
    if unknown is not None:
        problems.append(unknown)
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
    check_coverage(model, ruleset, strict)
    refusal = families.ah_refusal(model) if ruleset.attention is not None else None
    if refusal is not None:
        raise UnsupportedModuleError(refusal)
    with _RULED_LOCK:
        if model in _RULED:
            raise RuntimeError(
                f"rules are already applied to this {type(model).__name__} (nested or concurrent "
                "apply_rules on one model): the second set would wrap the first and contexts exited out "
                "of order would leave modules patched"
            )
        _RULED.add(model)
    undos = []
    try:
        per_module_attention = False
        for path, module in model.named_modules():
            rule = ruleset.rule_for(module, path)
            if rule is not None:
                undos.append(rule.apply(module))
                per_module_attention |= registered_category(type(module)) == "attention"
        hf_config = hasattr(getattr(model, "config", None), "_attn_implementation")
        if ruleset.attention is not None and families.switches_attention_function(model) and (
                hf_config or not per_module_attention):
            undos.append(ruleset.attention.apply(model))
        for rule in families.model_rules(model, ruleset.categories):
            undos.append(rule.apply(model))
        yield ruleset
    finally:
        try:
            for undo in reversed(undos):
                undo()
        finally:
            with _RULED_LOCK:
                _RULED.discard(model)
