"""Half-rule for multiplicative gates of gated MLPs (Arras et al. 2019; Jafari et al. 2024).

Gated MLPs compute ``down_proj(act(gate_proj(x)) * up_proj(x))`` inline. The rule
re-expresses that forward with the product routed through :class:`_HalfProduct`,
whose forward is the same product and whose backward gives each factor half of
the product's gradient, so relevance is split equally instead of doubled.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .base import ForwardPatchRule
from .functional import half_product

GATED_MLP_ATTRIBUTES = ("gate_proj", "up_proj", "down_proj", "act_fn")


class HalfRule(ForwardPatchRule):
    """Half-rule for a gated MLP module with ``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``.

    Works as a canonizer: the module's forward is replaced by an equivalent one
    (same operations, same order) in which the gate product is a :func:`half_product`.
    The activation ``act_fn`` stays a module call, so its own rule still applies.

    Example:
        >>> from captum_relp.rules import HalfRule
        >>> HalfRule().name
        'half'
    """

    name = "half"
    category = "gate"
    only_with_grad = False  # the canonized forward runs whenever the module is called

    def prepare(self, module: nn.Module, original: Callable) -> None:
        missing = [a for a in GATED_MLP_ATTRIBUTES if not hasattr(module, a)]
        if missing:
            raise ValueError(
                f"HalfRule needs a gated MLP with attributes {GATED_MLP_ATTRIBUTES}; "
                f"{type(module).__name__} lacks {missing}"
            )

    def patched_forward(self, module: nn.Module, original: Callable, state: Any, x):
        gate = module.act_fn(module.gate_proj(x))
        return module.down_proj(half_product(gate, module.up_proj(x)))
