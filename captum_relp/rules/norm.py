"""LN-rule for LayerNorm and RMSNorm (Ali et al. 2022).

The normalisation scale ``1 / sqrt(eps + Var[x])`` is treated as a constant in
the backward pass, which makes the layer linear in ``x``. The forward output is
computed by the module's own forward and therefore unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .base import ForwardPatchRule
from .functional import compute_dtype, ln_rule


class LayerNormRule(ForwardPatchRule):
    """LN-rule for normalisation layers, with the scale treated as constant.

    Args:
        centered (bool): ``True`` for LayerNorm (mean subtracted), ``False`` for RMSNorm.
        weight_offset (float): added to the module's ``weight``; Gemma's RMSNorm
            multiplies by ``1 + weight`` and needs ``weight_offset=1.0``.
        eps (float, optional): the norm's epsilon, for modules that do not store it
            (default: the module's ``eps`` / ``variance_epsilon``).

    The module must normalise over its last dimension and expose ``weight``
    (or none) and ``eps`` / ``variance_epsilon``.

    Example:
        >>> import torch
        >>> from captum_relp.rules import LayerNormRule
        >>> ln = torch.nn.LayerNorm(4)
        >>> x = torch.randn(2, 4)
        >>> undo = LayerNormRule().apply(ln)
        >>> torch.equal(ln(x), torch.nn.functional.layer_norm(x, (4,), ln.weight, ln.bias))
        True
        >>> undo()
    """

    name = "ln"
    category = "norm"

    def __init__(self, centered: bool = True, weight_offset: float = 0.0, eps: Optional[float] = None) -> None:
        self.centered = centered
        self.weight_offset = weight_offset
        self.eps = eps

    def prepare(self, module: nn.Module, original: Callable) -> None:
        shape = getattr(module, "normalized_shape", None)
        if shape is not None and len(tuple(shape)) != 1:
            raise ValueError(
                f"LayerNormRule supports normalisation over the last dimension only; "
                f"{type(module).__name__} has normalized_shape={tuple(shape)}"
            )

    def _eps(self, module: nn.Module, dtype: torch.dtype) -> float:
        if self.eps is not None:
            return self.eps
        for attr in ("eps", "variance_epsilon", "epsilon"):
            value = getattr(module, attr, None)
            if value is not None:
                return float(value)
        return float(torch.finfo(dtype).eps)

    def patched_forward(self, module: nn.Module, original: Callable, state: Any, x):
        weight = getattr(module, "weight", None)
        if weight is not None:
            weight = weight.detach().to(compute_dtype(x.dtype)) + self.weight_offset
        return ln_rule(original, x, weight, self._eps(module, x.dtype), self.centered)

    def __repr__(self) -> str:
        eps = "" if self.eps is None else f", eps={self.eps}"
        return f"LayerNormRule(centered={self.centered}, weight_offset={self.weight_offset}{eps})"


def RMSNormRule(weight_offset: float = 0.0) -> LayerNormRule:
    """LN-rule for RMSNorm (no centering).

    Example:
        >>> RMSNormRule(weight_offset=1.0)
        LayerNormRule(centered=False, weight_offset=1.0)
    """
    return LayerNormRule(centered=False, weight_offset=weight_offset)
