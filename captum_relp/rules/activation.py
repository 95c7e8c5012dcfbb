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

_TINY = 1e-6


class _IdentityRatio(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, original, slope_at_zero):  # type: ignore[override]
        output = original(x)
        ctx.save_for_backward(identity_ratio(x, output, slope_at_zero).to(x.dtype))
        return output

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return grad_output * ratio, None, None


def identity_ratio(x: torch.Tensor, output: torch.Tensor, slope_at_zero: float) -> torch.Tensor:
    """``output / x`` in float32, replaced by ``slope_at_zero`` where ``|x|`` is tiny.

    Example:
        >>> import torch
        >>> x = torch.tensor([0.0, 2.0])
        >>> identity_ratio(x, torch.relu(x), 0.5)
        tensor([0.5000, 1.0000])
    """
    x32 = x.float()
    safe = x32.abs() > _TINY
    ratio = output.float() / torch.where(safe, x32, torch.ones_like(x32))
    return torch.where(safe, ratio, torch.full_like(ratio, slope_at_zero))


def slope_at_zero(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Derivative of a pointwise function at 0, the limit of ``fn(x) / x``.

    Example:
        >>> import torch
        >>> slope_at_zero(torch.nn.functional.silu)
        0.5
    """
    with torch.enable_grad():
        zero = torch.zeros(1, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(zero).sum(), zero, allow_unused=True)
    return 0.0 if grad is None else float(grad.item())


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

    def prepare(self, module: nn.Module, original: Callable) -> float:
        with torch.no_grad():
            at_zero = original(torch.zeros(1))
        if at_zero.abs().item() > 1e-6:
            raise ValueError(
                f"IdentityRule needs act(0) = 0, but {type(module).__name__}(0) = {at_zero.item():.4g}"
            )
        return slope_at_zero(original)

    def patched_forward(
        self, module: nn.Module, original: Callable, state: Any, x, *args: Any, **kwargs: Any
    ):
        if args or kwargs or not torch.is_grad_enabled() or not x.requires_grad:
            return original(x, *args, **kwargs)
        return _IdentityRatio.apply(x, original, state)
