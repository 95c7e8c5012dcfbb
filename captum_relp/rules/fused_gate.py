"""Half-rule for gated MLPs whose gate and up projections are one fused linear layer.

Phi-3 computes ``down_proj(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2)``;
ModernBERT computes ``Wo(drop(act(input) * gate))`` with ``input, gate = Wi(x).chunk(2)``.
The rule re-expresses that forward with the product routed through
:func:`~captum_relp.rules.functional.half_product` (same operands, same order), so the forward
is bit-identical and relevance is split in half between the two factors.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from torch import nn

from .base import ForwardPatchRule
from .functional import half_product

LAYOUTS: Dict[str, Tuple[str, str, str]] = {
    "gate_up_proj": ("gate_up_proj", "activation_fn", "down_proj"),
    "wi": ("Wi", "act", "Wo"),
}
"""``layout: (fused projection, activation, output projection)`` attribute names."""


class FusedGateRule(ForwardPatchRule):
    """Half-rule on a fused gated MLP (``layout`` one of :data:`LAYOUTS`).

    Example:
        >>> import torch
        >>> from captum_relp.rules.fused_gate import FusedGateRule
        >>> mlp = torch.nn.Module()
        >>> mlp.gate_up_proj, mlp.down_proj = torch.nn.Linear(2, 4), torch.nn.Linear(2, 2)
        >>> mlp.activation_fn = torch.nn.SiLU()
        >>> mlp.forward = lambda x: mlp.down_proj(torch.mul(*mlp.gate_up_proj(x).chunk(2, -1)[::-1]))
        >>> undo = FusedGateRule("gate_up_proj").apply(mlp); undo()
    """

    name = "half"
    category = "gate"

    def __init__(self, layout: str) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        self.layout = layout

    def prepare(self, module: nn.Module, original: Callable) -> None:
        missing = [a for a in LAYOUTS[self.layout] if not hasattr(module, a)]
        if missing:
            raise ValueError(f"FusedGateRule({self.layout!r}): {type(module).__name__} lacks {missing}")

    def patched_forward(self, module: nn.Module, original: Callable, state: Any, x, *args: Any, **kwargs: Any):
        if self.layout == "gate_up_proj":
            gate, up = module.gate_up_proj(x).chunk(2, dim=-1)
            return module.down_proj(half_product(up, module.activation_fn(gate)))
        inputs, gate = module.Wi(x).chunk(2, dim=-1)
        return module.Wo(module.drop(half_product(module.act(inputs), gate)))

    def __repr__(self) -> str:
        return f"FusedGateRule({self.layout!r})"


__all__ = ["LAYOUTS", "FusedGateRule"]
