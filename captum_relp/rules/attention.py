"""AH-rule for attention (Ali et al. 2022): attention probabilities treated as constant.

Hugging Face models route attention through a registry of attention functions
(``AttentionInterface``) chosen by ``config._attn_implementation``. The rule
registers a wrapper ``relp_ah_<impl>`` around whatever implementation the model
uses (eager, sdpa, flash, ...) that passes *detached* queries and keys, so the
output ``A @ V`` is linear in ``V`` with ``A`` constant in the backward pass,
without materialising ``A``. The wrapper is also registered with
``AttentionMaskInterface`` under the same name (mapped to the original mask
function), otherwise causal and padding masks would be silently dropped.

Where the attention scores are computed inline (GPT-Neo, Bloom, Falcon, MPT), the
AH-rule detaches the queries and keys at the one place the module hands them over:

* :class:`DetachQKArgsRule`: the first two arguments of a method (GPT-Neo's ``_attn``);
* :class:`DetachQKOutputsRule`: the first two outputs of a method (Bloom's ``_reshape``,
  Falcon's ``_split_heads``);
* :class:`DetachQKColumnsRule`: the first two thirds of a fused ``[q | k | v]`` projection's
  output (MPT's ``Wqkv``).

Forward values are unchanged (detaching copies no value); the probabilities, a function of
queries and keys only, then get no gradient.
"""
from __future__ import annotations

import sys
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from .base import Rule, UndoFn, set_instance_attribute

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
        return partial(setattr, config, "_attn_implementation", original)


def _patch_method(module: nn.Module, method: str, make: Callable[[Callable], Callable]) -> UndoFn:
    original = getattr(module, method, None)
    if not callable(original):
        raise ValueError(f"{type(module).__name__} has no method {method!r} to apply the AH-rule to")
    return set_instance_attribute(module, method, make(original))


class DetachQKArgsRule(Rule):
    """AH-rule: ``module.<method>(query, key, ...)`` receives detached queries and keys.

    Example:
        >>> import torch
        >>> m = torch.nn.Module(); m.attend = lambda q, k, v: (q @ k.T).softmax(-1) @ v
        >>> q = torch.ones(2, 2, requires_grad=True)
        >>> undo = DetachQKArgsRule("attend").apply(m)
        >>> m.attend(q, q, torch.ones(2, 2)).requires_grad; undo()
        False
    """

    name = "ah"
    category = "attention"

    def __init__(self, method: str) -> None:
        self.method = method

    def apply(self, module: nn.Module) -> UndoFn:
        def make(original: Callable) -> Callable:
            def call(query, key, *args: Any, **kwargs: Any):
                return original(query.detach(), key.detach(), *args, **kwargs)
            return call
        return _patch_method(module, self.method, make)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method!r})"


class DetachQKOutputsRule(DetachQKArgsRule):
    """AH-rule: the first two outputs ``(query, key, value, ...)`` of ``module.<method>`` are detached.

    Example:
        >>> DetachQKOutputsRule("_split_heads")
        DetachQKOutputsRule('_split_heads')
    """

    def apply(self, module: nn.Module) -> UndoFn:
        def make(original: Callable) -> Callable:
            def call(*args: Any, **kwargs: Any):
                query, key, *rest = original(*args, **kwargs)
                return (query.detach(), key.detach(), *rest)
            return call
        return _patch_method(module, self.method, make)


class DetachQKColumnsRule(DetachQKArgsRule):
    """AH-rule: the q and k thirds of the fused projection ``module.<child>`` (output ``[q | k | v]``).

    Example:
        >>> import torch
        >>> m = torch.nn.Module(); m.Wqkv = torch.nn.Linear(2, 6)
        >>> undo = DetachQKColumnsRule("Wqkv").apply(m)
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> m.Wqkv(x)[:, :4].sum().backward(); undo()
        >>> x.grad  # queries and keys carry no gradient
        tensor([[0., 0.]])
    """

    def apply(self, module: nn.Module) -> UndoFn:
        child = getattr(module, self.method, None)
        if not isinstance(child, nn.Module):
            raise ValueError(f"{type(module).__name__} has no projection {self.method!r} to apply the AH-rule to")

        def hook(mod: nn.Module, args: Any, output: torch.Tensor):
            if output.shape[-1] % 3:
                raise ValueError(f"{self.method} output width {output.shape[-1]} is not [q | k | v]")
            split = 2 * output.shape[-1] // 3
            return torch.cat([output[..., :split].detach(), output[..., split:]], dim=-1)

        return child.register_forward_hook(hook).remove

