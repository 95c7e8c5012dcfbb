"""0-, epsilon- and gamma-rules for linear layers (Montavon et al. 2019).

As modified gradients: for ``z = W x + b`` and incoming gradient ``g``,

* 0-rule:        ``dx = W^T g`` (plain gradient; nothing to patch, see :class:`ZeroRule`)
* epsilon-rule:  ``dx = W^T (g * z / (z + eps * sign(z)))``
* gamma-rule:    ``dx = W'^T (g * z / z')`` with ``W' = W + gamma * W^+`` and ``z' = W' x + b``

Both work for ``torch.nn.Linear`` and Hugging Face's ``Conv1D`` (weights stored
as ``(in, out)``). The forward output is the module's own.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from .base import ForwardPatchRule
from .functional import compute_dtype


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach()
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    sign = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    return z + eps * sign


class _ModifiedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, original, scale_fn):  # type: ignore[override]
        output = original(x)
        ctx.scale, ctx.weight = scale_fn(x, output)
        ctx.in_dtype = x.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        dtype = ctx.scale.dtype
        grad = (grad_output.to(dtype) * ctx.scale) @ ctx.weight.to(dtype)
        return grad.to(ctx.in_dtype), None, None


class _LinearRule(ForwardPatchRule):
    category = "linear"

    def prepare(self, module: nn.Module, original: Callable) -> None:
        if getattr(module, "weight", None) is None or module.weight.dim() != 2:
            raise ValueError(f"{type(self).__name__} needs a module with a 2-D weight, got {module}")

    def scale(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor):
        raise NotImplementedError

    def patched_forward(self, module: nn.Module, original: Callable, state: Any, x):
        return _ModifiedLinear.apply(x, original, partial(self.scale, module))


class EpsilonRule(_LinearRule):
    """LRP-epsilon for linear layers: absorbs small or contradictory contributions.

    Example:
        >>> import torch
        >>> from captum_relp.rules import EpsilonRule
        >>> lin = torch.nn.Linear(3, 2); x = torch.randn(4, 3, requires_grad=True)
        >>> undo = EpsilonRule(0.0).apply(lin); y = lin(x); undo()
        >>> torch.equal(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
        True
    """

    name = "epsilon"

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def scale(self, module, x, output):
        z = output.detach().to(compute_dtype(output.dtype))
        return z / _stabilise(z, self.epsilon), _weight_out_in(module)

    def __repr__(self) -> str:
        return f"EpsilonRule(epsilon={self.epsilon})"


class GammaRule(_LinearRule):
    """LRP-gamma for linear layers: favours positive contributions.

    Example:
        >>> from captum_relp.rules import GammaRule
        >>> GammaRule(0.25)
        GammaRule(gamma=0.25)
    """

    name = "gamma"

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        self.gamma = gamma
        self.stabilizer = stabilizer

    def scale(self, module, x, output):
        dtype = compute_dtype(x.dtype)
        weight = _weight_out_in(module).to(dtype)
        boosted = weight + self.gamma * weight.clamp(min=0)
        bias = getattr(module, "bias", None)
        z_boosted = x.detach().to(dtype) @ boosted.t()
        if bias is not None:
            z_boosted = z_boosted + bias.detach().to(dtype)
        z = output.detach().to(dtype)
        return z / _stabilise(z_boosted, self.stabilizer), boosted

    def __repr__(self) -> str:
        return f"GammaRule(gamma={self.gamma})"
