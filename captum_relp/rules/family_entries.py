"""Rule-registry entries generated from the family table (norms, gated MLPs, activations, attention)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

from ..families import FAMILY_TABLE, Attention, Norm
from .attention import DetachQKArgsRule, DetachQKColumnsRule, DetachQKOutputsRule
from .nonlinear import FusedGateRule, HalfRule, IdentityRule, LayerNormRule

_AH_RULES = {"method-args": DetachQKArgsRule, "method-outputs": DetachQKOutputsRule,
             "qkv-columns": DetachQKColumnsRule}


def registry_entries() -> Dict[str, Tuple[str, Any]]:
    """Rule-registry entries ``{type key: (category, rule factory)}`` generated from the table.

    Example:
        >>> registry_entries()["transformers.models.phi3.modeling_phi3.Phi3MLP"][1]()
        FusedGateRule('gate_up_proj')
    """
    entries: Dict[str, Tuple[str, Any]] = {}
    for family in FAMILY_TABLE.values():
        for norm in family.norms:
            entries[family.key(norm.cls)] = ("norm", _norm_factory(norm))
        if family.gated_mlp is not None:
            cls, layout = family.gated_mlp
            entries[family.key(cls)] = ("gate", HalfRule if layout == "separate" else _fused(layout))
        for cls in family.activations:
            entries[family.key(cls)] = ("activation", IdentityRule)
        for cls in family.structural:
            linear = cls.startswith("linear:")
            entries[family.key(cls.split(":")[-1])] = ("linear" if linear else "structural", None)
        if family.attn.how in _AH_RULES:
            entries[family.key(family.attn.cls)] = ("attention", _ah_factory(family.attn))
    return entries


def _norm_factory(norm: Norm):
    return lambda: LayerNormRule(centered=not norm.rms, weight_offset=norm.weight_offset, eps=norm.eps)


def _fused(layout: str):
    return lambda: FusedGateRule(layout)


def _ah_factory(attn: Attention):
    return lambda: _AH_RULES[attn.how](attn.method)


__all__ = ["registry_entries"]
