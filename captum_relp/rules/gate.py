"""Half-rule for multiplicative gates of gated MLPs (Arras et al. 2019; Jafari et al. 2024).

Gated MLPs compute ``down_proj(act(gate_proj(x)) * up_proj(x))`` inline. The rule
re-expresses that forward with the product routed through :class:`_HalfProduct`,
whose forward is the same product and whose backward gives each factor half of
the product's gradient, so relevance is split equally instead of doubled.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import ForwardPatchRule

GATED_MLP_ATTRIBUTES = ("gate_proj", "up_proj", "down_proj", "act_fn")


class _HalfProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return gate * up

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        return 0.5 * grad_output * up, 0.5 * grad_output * gate


def half_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate * up`` whose backward splits the gradient in half between the factors.

    Example:
        >>> import torch
        >>> a = torch.tensor([2.0], requires_grad=True); b = torch.tensor([3.0], requires_grad=True)
        >>> half_product(a, b).backward(); (a.grad.item(), b.grad.item())
        (1.5, 1.0)
    """
    return _HalfProduct.apply(gate, up)


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

    def prepare(self, module: nn.Module, original: Callable) -> None:
        missing = [a for a in GATED_MLP_ATTRIBUTES if not hasattr(module, a)]
        if missing:
            raise ValueError(
                f"HalfRule needs a gated MLP with attributes {GATED_MLP_ATTRIBUTES}; "
                f"{type(module).__name__} lacks {missing}"
            )

    def patched_forward(
        self, module: nn.Module, original: Callable, state: Any, x, *args: Any, **kwargs: Any
    ):
        if args or kwargs:
            return original(x, *args, **kwargs)
        gate = module.act_fn(module.gate_proj(x))
        return module.down_proj(half_product(gate, module.up_proj(x)))
