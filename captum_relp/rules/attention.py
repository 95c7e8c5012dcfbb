"""AH-rule for attention (Ali et al. 2022): attention probabilities treated as constant.

Hugging Face models route attention through a registry of attention functions
(``AttentionInterface``) chosen by ``config._attn_implementation``. The rule
registers a wrapper ``relp_ah_<impl>`` around whatever implementation the model
uses (eager, sdpa, flash, ...) that passes *detached* queries and keys, so the
output ``A @ V`` is linear in ``V`` with ``A`` constant in the backward pass,
without materialising ``A``. The wrapper is also registered with
``AttentionMaskInterface`` under the same name (mapped to the original mask
function), otherwise causal and padding masks would be silently dropped.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

from .base import Rule, UndoFn

_PREFIX = "relp_ah_"


def _original_attention(name: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ("eager", "None") or name not in ALL_ATTENTION_FUNCTIONS:
        modeling = sys.modules[type(module).__module__]
        eager = getattr(modeling, "eager_attention_forward", None)
        if eager is None:
            raise ValueError(
                f"AHRule: {type(module).__module__} has no eager_attention_forward to wrap"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def _make_ah_attention(original_name: str) -> Callable:
    def ah_attention(module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
        attention = _original_attention(original_name, module)
        return attention(module, query.detach(), key.detach(), value, attention_mask, *args, **kwargs)

    ah_attention.__name__ = f"{_PREFIX}{original_name}"
    return ah_attention


def register_ah_attention(original_name: str) -> str:
    """Register the AH-rule wrapper of ``original_name`` and its mask function.

    Returns the registered name.

    Example:
        >>> register_ah_attention("sdpa")
        'relp_ah_sdpa'
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"{_PREFIX}{original_name}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_ah_attention(original_name))
    if name not in AttentionMaskInterface._global_mapping:
        mask_key = original_name if original_name in ALL_MASK_ATTENTION_FUNCTIONS else "eager"
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_key])
    return name


class AHRule(Rule):
    """AH-rule, applied to a whole Hugging Face model (it switches the attention function).

    Example:
        >>> from captum_relp.rules import AHRule
        >>> AHRule().name
        'ah'
    """

    name = "ah"

    def apply(self, module: nn.Module) -> UndoFn:
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            raise ValueError(
                f"AHRule needs a Hugging Face model with a config; {type(module).__name__} has none"
            )
        original = config._attn_implementation
        if original is not None and original.startswith(_PREFIX):
            return lambda: None
        config._attn_implementation = register_ah_attention(str(original or "eager"))

        def undo() -> None:
            config._attn_implementation = original

        return undo
