"""The rules for the nonlinear modules of a transformer (the paper's Table 4).

* **LN-rule** for LayerNorm and RMSNorm (Ali et al. 2022): the normalisation scale
  ``1 / sqrt(eps + Var[x])`` is treated as a constant in the backward pass, which makes
  the layer linear in ``x``. The forward output is computed by the module's own forward
  and therefore unchanged.
* **Identity-rule** for pointwise activations (Jafari et al. 2024, MambaLRP): ``act(x)``
  is rewritten as ``x * [act(x) / x]_const``: the backward pass multiplies the incoming
  gradient by ``act(x) / x``. At ``x = 0`` the ratio takes its limit ``act'(0)``, computed
  once per module by autograd, instead of dividing by ~0.
* **Half-rule** for multiplicative gates of gated MLPs (Arras et al. 2019; Jafari et al.
  2024): gated MLPs compute ``down_proj(act(gate_proj(x)) * up_proj(x))`` inline. The rule
  re-expresses that forward with the product routed through
  :func:`~captum_relp.rules.functional.half_product`, whose forward is the same product and
  whose backward gives each factor half of the product's gradient, so relevance is split
  equally instead of doubled.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .base import ForwardPatchRule
from .functional import compute_dtype, half_product, identity_rule, ln_rule, slope_at_zero

GATED_MLP_ATTRIBUTES = ("gate_proj", "up_proj", "down_proj", "act_fn")


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
