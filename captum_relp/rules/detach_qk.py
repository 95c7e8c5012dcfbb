"""AH-rule for attention computed in a module's own code, not through ``AttentionInterface``.

The AH-rule holds the attention probabilities constant in the backward pass. Where the
attention scores are computed inline (GPT-Neo, Bloom, Falcon, MPT), the rule detaches the
queries and keys at the one place the module hands them over:

* :class:`DetachQKArgsRule`: the first two arguments of a method (GPT-Neo's ``_attn``);
* :class:`DetachQKOutputsRule`: the first two outputs of a method (Bloom's ``_reshape``,
  Falcon's ``_split_heads``);
* :class:`DetachQKColumnsRule`: the first two thirds of a fused ``[q | k | v]`` projection's
  output (MPT's ``Wqkv``).

Forward values are unchanged (detaching copies no value); the probabilities, a function of
queries and keys only, then get no gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import Rule, UndoFn, set_instance_attribute


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


__all__ = ["DetachQKArgsRule", "DetachQKOutputsRule", "DetachQKColumnsRule"]
