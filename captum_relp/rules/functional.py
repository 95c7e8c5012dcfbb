"""Functional LRP rules: building blocks for custom forwards.

Each function computes exactly the forward value of the operation it wraps and
changes only the backward pass, so it can be dropped into a module's own code:

* :func:`identity_rule` — ``fn(x)`` whose backward multiplies by ``fn(x) / x``
  (Identity-rule for pointwise activations).
* :func:`ln_rule` — ``norm_fn(x)`` whose backward treats ``1 / sqrt(eps + Var[x])``
  as a constant (LN-rule for LayerNorm/RMSNorm).
* :func:`half_product` — ``a * b`` whose backward gives each factor half of the
  product's gradient (Half-rule for multiplicative gates).

Example:
    >>> import torch
    >>> x = torch.tensor([0.0, 1.0], requires_grad=True)
    >>> identity_rule(torch.nn.functional.gelu, x).sum().backward()
    >>> x.grad
    tensor([0.5000, 0.8413])
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

_TINY = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rules compute in: at least float32, float64 kept (``promote_types(dtype, float32)``).

    Example:
        >>> import torch
        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def identity_ratio(x: Tensor, output: Tensor, slope_at_zero: float) -> Tensor:
    """``output / x`` in :func:`compute_dtype`, replaced by ``slope_at_zero`` where ``|x|`` is tiny.

    Example:
        >>> import torch
        >>> x = torch.tensor([0.0, 2.0])
        >>> identity_ratio(x, torch.relu(x), 0.5)
        tensor([0.5000, 1.0000])
    """
    dtype = compute_dtype(x.dtype)
    x32 = x.to(dtype)
    safe = x32.abs() > _TINY
    ratio = output.to(dtype) / torch.where(safe, x32, torch.ones_like(x32))
    return torch.where(safe, ratio, torch.full_like(ratio, slope_at_zero))


def slope_at_zero(fn: Callable[[Tensor], Tensor]) -> float:
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


class _IdentityRatio(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, at_zero):  # type: ignore[override]
        output = fn(x)
        ctx.save_for_backward(identity_ratio(x, output, at_zero).to(x.dtype))
        return output

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return grad_output * ratio, None, None


def identity_rule(fn: Callable[[Tensor], Tensor], x: Tensor, at_zero: Optional[float] = None) -> Tensor:
    """``fn(x)``, with the backward pass of the Identity-rule: ``grad * fn(x) / x``.

    Args:
        fn: a pointwise function with ``fn(0) = 0`` (GELU, SiLU, ReLU, tanh ...).
        x: its input.
        at_zero: the ratio used where ``x`` is ~0 (default: ``fn'(0)``, computed by autograd).

    Returns:
        Tensor: ``fn(x)``, bit-identical to calling ``fn`` directly.

    Example:
        >>> import torch
        >>> x = torch.tensor([2.0], requires_grad=True)
        >>> identity_rule(torch.relu, x).backward(); x.grad
        tensor([1.])
    """
    if at_zero is None:
        at_zero = slope_at_zero(fn)
    return _IdentityRatio.apply(x, fn, at_zero)


class _ConstantScaleNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_fn, centered, weight, eps):  # type: ignore[override]
        output = norm_fn(x)
        x32 = x.to(compute_dtype(x.dtype))
        var = x32.var(dim=-1, unbiased=False, keepdim=True) if centered else x32.pow(2).mean(-1, keepdim=True)
        ctx.save_for_backward(torch.rsqrt(var + eps))
        ctx.centered, ctx.weight, ctx.in_dtype = centered, weight, x.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (inv_scale,) = ctx.saved_tensors
        grad = grad_output.to(inv_scale.dtype)
        if ctx.weight is not None:
            grad = grad * ctx.weight.to(inv_scale.dtype)
        if ctx.centered:
            grad = grad - grad.mean(dim=-1, keepdim=True)
        return (grad * inv_scale).to(ctx.in_dtype), None, None, None, None


def ln_rule(
    norm_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-5,
    centered: bool = True,
) -> Tensor:
    """``norm_fn(x)``, with the backward pass of the LN-rule (scale held constant).

    Args:
        norm_fn: the normalisation over the last dimension (its own forward is used).
        x: its input.
        weight: the elementwise gain the norm applies (``None`` for none; Gemma: ``1 + w``).
        eps: the norm's epsilon.
        centered: ``True`` for LayerNorm (mean subtracted), ``False`` for RMSNorm.

    Returns:
        Tensor: ``norm_fn(x)``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 3.0]], requires_grad=True)
        >>> norm = lambda t: torch.nn.functional.layer_norm(t, (2,))
        >>> ln_rule(norm, x, eps=0.0).sum().backward(); x.grad  # centred, so zero
        tensor([[0., 0.]])
    """
    return _ConstantScaleNorm.apply(x, norm_fn, centered, weight, eps)


class _HalfProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):  # type: ignore[override]
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        a, b = ctx.saved_tensors
        return 0.5 * grad_output * b, 0.5 * grad_output * a


def half_product(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` whose backward splits the gradient in half between the factors.

    Example:
        >>> import torch
        >>> a = torch.tensor([2.0], requires_grad=True); b = torch.tensor([3.0], requires_grad=True)
        >>> half_product(a, b).backward(); (a.grad.item(), b.grad.item())
        (1.5, 1.0)
    """
    return _HalfProduct.apply(a, b)


__all__ = ["identity_rule", "ln_rule", "half_product", "identity_ratio", "slope_at_zero", "compute_dtype"]
