"""Applying a rule set to a model for the duration of a ``with`` block, with strict coverage."""
from __future__ import annotations

import threading
import warnings
import weakref
from contextlib import contextmanager
from typing import Iterator, Union

from torch import nn

from .. import families
from .gate import GATED_MLP_ATTRIBUTES
from .presets import RuleSet, resolve_rules
from .registry import registered_category

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
    ruleset.check_patterns(model)
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
