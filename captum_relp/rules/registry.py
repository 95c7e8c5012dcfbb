"""Rule registry: which LRP rule applies to which module type.

Module types are keyed by their qualified name (``module.ClassName``), so the
registry covers Hugging Face families without importing every modeling file;
actual classes can be registered too. Each entry has a *category* (``norm``,
``activation``, ``gate``, ``linear`` or ``custom``); a
:class:`~captum_relp.rules.RuleSet` (Zennit calls it a composite) enables
categories and adds an optional attention rule.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple, Union

from torch import nn

from ..families import FAMILY_TABLE
from .base import Rule
from .hookpoint import TRANSFORMER_LENS_ENTRIES
from .nonlinear import (GATED_MLP_ATTRIBUTES, LAYOUTS, FusedGateRule, HalfRule, IdentityRule, LayerNormRule,
                        RMSNormRule)

RuleFactory = Callable[[], Rule]
CATEGORIES = ("norm", "activation", "gate", "linear", "structural", "custom", "attention")

_ACT = "transformers.activations."
_TORCH_ACT = "torch.nn.modules.activation."

def registry_entries() -> Dict[str, Tuple[str, Any]]:
    """Rule-registry entries ``{type key: (category, rule factory)}`` generated from the table.

    Example:
        >>> registry_entries()["transformers.models.phi3.modeling_phi3.Phi3MLP"][1]()
        FusedGateRule('gate_up_proj')
    """
    entries: Dict[str, Tuple[str, Any]] = {}
    for family in FAMILY_TABLE.values():
        for norm in family.norms:
            entries[family.key(norm.cls)] = ("norm", partial(LayerNormRule, centered=not norm.rms,
                                                             weight_offset=norm.weight_offset, eps=norm.eps))
        if family.gated_mlp is not None:
            cls, layout = family.gated_mlp
            entries[family.key(cls)] = ("gate", HalfRule if layout == "separate" else partial(FusedGateRule, layout))
        for cls in family.activations:
            entries[family.key(cls)] = ("activation", IdentityRule)
        for cls in family.structural:
            linear = cls.startswith("linear:")
            entries[family.key(cls.split(":")[-1])] = ("linear" if linear else "structural", None)
    return entries


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
    return registry_entry(module_type)[0]


def registry_entry(module_type: Union[type, str]) -> Tuple[Optional[str], Optional[RuleFactory]]:
    """``(category, rule factory)`` of a module type; ``(None, None)`` if it is not registered.

    Example:
        >>> import torch
        >>> registry_entry(torch.nn.GELU)[0], registry_entry("my.Unknown")
        ('activation', (None, None))
    """
    return _REGISTRY.get(type_key(module_type), (None, None))


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
            (default: the rule's own :attr:`~captum_relp.rules.Rule.category`). Presets apply
            ``norm``/``activation``/``gate``/``custom``;
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
    category = category or factory().category
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
    if ("norm" in name.lower() or name.endswith("Activation") or has_hook_points(module)
            or cls.__module__ in ("torch.nn.modules.activation", "transformers.activations")):
        return True  # norms, activations; TransformerLens modules computing through hook points
    if any(all(hasattr(module, attr) for attr in attrs) for attrs in (GATED_MLP_ATTRIBUTES, *LAYOUTS.values())):
        return True  # gated MLPs, also with fused gate/up projections (Phi-3, ModernBERT)
    # a leaf module of unknown type computes something of its own (e.g. x * sigmoid(x))
    is_leaf = next(module.children(), None) is None
    return is_leaf and not _is_structural_leaf(cls)


def has_hook_points(module: nn.Module) -> bool:
    """Whether ``module`` computes through hook points a rule must act on.

    True for modules with ``hook_scale`` (norms), ``hook_pattern`` (attention) or
    ``hook_pre`` and ``hook_post`` (MLPs): strict mode needs a rule for them.

    Example:
        >>> import torch
        >>> has_hook_points(torch.nn.Linear(2, 2))
        False
    """
    def point(name: str) -> bool:
        return isinstance(module.__dict__.get("_modules", {}).get(name), nn.Module)

    return point("hook_scale") or point("hook_pattern") or (point("hook_pre") and point("hook_post"))


def _is_structural_leaf(cls: type) -> bool:
    """Leaves known to be linear in the attributed activations or off their path."""
    if cls.__module__.startswith("transformers.models.") and cls.__name__.endswith("RotaryEmbedding"):
        return True  # cos/sin of positions only
    return cls.__module__ in ("torch.nn.modules.dropout", "torch.nn.modules.sparse",
                              "torch.nn.modules.linear", "torch.nn.modules.flatten",
                              "torch.nn.modules.container", "torch.nn.modules.pooling")
