"""Identity-rule for pointwise activations (Jafari et al. 2024, MambaLRP).

``act(x)`` is rewritten as ``x * [act(x) / x]_const``: the backward pass multiplies
the incoming gradient by ``act(x) / x``. At ``x = 0`` the ratio takes its limit
``act'(0)``, computed once per module by autograd, instead of dividing by ~0.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import ForwardPatchRule
from .functional import identity_rule, slope_at_zero


class IdentityRule(ForwardPatchRule):
    """Identity-rule: the nonlinear factor ``act(x) / x`` is treated as constant.

    Valid for activations with ``act(0) = 0`` (GELU variants, SiLU, ReLU, tanh).

    Example:
        >>> import torch
        >>> from captum_relp.rules import IdentityRule
        >>> act = torch.nn.GELU()
        >>> x = torch.tensor([0.0, 1.0], requires_grad=True)
        >>> undo = IdentityRule().apply(act)
        >>> act(x).sum().backward(); undo()
        >>> x.grad  # gelu(x) / x, with the limit 0.5 at x = 0
        tensor([0.5000, 0.8413])
    """

    name = "identity"
    category = "activation"

    def prepare(self, module: nn.Module, original: Callable) -> float:
        with torch.no_grad():
            at_zero = original(torch.zeros(1))
        if at_zero.abs().item() > 1e-6:
            raise ValueError(
                f"IdentityRule needs act(0) = 0, but {type(module).__name__}(0) = {at_zero.item():.4g}"
            )
        return slope_at_zero(original)

    def patched_forward(self, module: nn.Module, original: Callable, state: Any, x):
        return identity_rule(original, x, state)
