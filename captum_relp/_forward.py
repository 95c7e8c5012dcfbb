"""Calling the model: extra forward arguments and the output tensor (``.logits`` of a Hugging Face model).

Shared by every attribution class of the package, so RelP, AtP, AP and IG all call the
model the same way; the metric they evaluate on its output is in :mod:`captum_relp.metrics`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from ._unwrap import is_hf_model


def split_forward_args(
    forward_func: Callable, additional_forward_args: Any, model: Optional[nn.Module] = None
) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Positional and keyword extra arguments.

    A dict is passed as keywords. For Hugging Face models a tuple's first tensor
    is taken as the ``attention_mask`` (their second positional argument is not
    the mask in every family).
    """
    if additional_forward_args is None:
        return (), {}
    if isinstance(additional_forward_args, dict):
        return (), dict(additional_forward_args)
    if not isinstance(additional_forward_args, tuple):
        additional_forward_args = (additional_forward_args,)
    if is_hf_model(forward_func) and additional_forward_args:
        first, *rest = additional_forward_args
        if rest:
            raise ValueError(
                "additional_forward_args: for a Hugging Face model pass (attention_mask,) or a "
                "dict of keyword arguments"
            )
        return (), {"attention_mask": first}
    return additional_forward_args, {}


def call_model(forward_func: Callable, inputs: Tuple[Tensor, ...], args: Tuple, kwargs: Dict) -> Tensor:
    """Run the model; a Hugging Face model's ``.logits`` is returned."""
    if is_hf_model(forward_func):
        kwargs = dict(kwargs)
        kwargs.setdefault("use_cache", False)
    output = forward_func(*inputs, *args, **kwargs)
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, tuple) and not isinstance(output, Tensor):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"forward_func must return a tensor or an output with .logits, got {type(output)}")
    return output
