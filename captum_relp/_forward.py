"""Calling the model: the module behind what a user passes, extra forward arguments, the output
tensor (``.logits`` of a Hugging Face model) and token ids checked against the vocabulary.

Shared by every attribution class of the package, so RelP, AtP, AP and IG all call the
model the same way; the metric they evaluate on its output is in :mod:`captum_relp.metrics`.

This is the one place that finds the torch module behind a model or layer.

nnsight's ``NNsight``/``LanguageModel`` and its ``Envoy`` objects (``lm.transformer.h[0]``)
are not ``nn.Module``\\ s; they hold the module in ``_module``. ``DistributedDataParallel``
and ``DataParallel`` hold it in ``module``, a ``torch.compile``\\ d module in ``_orig_mod``,
a bound ``forward`` in ``__self__``. Attribution needs the module itself: its hooks, its
submodules and (for the AH-rule) its Hugging Face config. Everything is duck-typed, so
neither nnsight nor a process group is needed.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

WRAPPER_TYPES = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(obj: Any, keep_bound: bool = False) -> Any:
    """The torch module inside an nnsight model/envoy, a (Distributed)DataParallel wrapper,
    a ``torch.compile``\\ d module or (unless ``keep_bound``) a bound method of a module.

    Anything else (a module, a plain function, ``None``) is returned as it is.

    Args:
        obj: A model, layer or callable.
        keep_bound: keep a bound method of an uncompiled module as it is (it is what the
            user asked to call); the bound ``forward`` of a compiled module is always
            unwrapped, because layer hooks and rules act on the original modules.

    Returns:
        The innermost wrapped ``nn.Module``, or ``obj``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
        >>> class Envoy:  # what nnsight hands out
        ...     def __init__(self, module): self._module = module
        >>> unwrap_model(Envoy(net)) is net, unwrap_model(net.forward) is net
        (True, True)
    """
    for _ in range(8):  # wrappers of wrappers, bounded
        owner = getattr(obj, "__self__", None)
        if isinstance(obj, WRAPPER_TYPES):
            obj = obj.module
        elif not isinstance(obj, nn.Module) and isinstance(getattr(obj, "_module", None), nn.Module):
            obj = obj._module
        elif isinstance(getattr(obj, "_orig_mod", None), nn.Module):
            obj = obj._orig_mod
        elif not isinstance(obj, nn.Module) and isinstance(owner, nn.Module) and (
                not keep_bound or isinstance(getattr(owner, "_orig_mod", None), nn.Module)):
            obj = owner
        else:
            return obj
    return obj


def unwrap_layers(layer: Any) -> Any:
    """:func:`unwrap_model` on a layer or on each entry of a list/tuple of layers.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> unwrap_layers([torch.nn.DataParallel(net[0]), net[1]]) == [net[0], net[1]]
        True
    """
    wrapped = unwrap_model(layer)
    if wrapped is not layer or isinstance(layer, nn.Module):
        return wrapped
    if isinstance(layer, (list, tuple)):
        return type(layer)(unwrap_model(entry) for entry in layer)
    return layer


def is_hf_model(module: Any) -> bool:
    """Whether ``module`` is a Hugging Face model, also behind any wrapper :func:`unwrap_model` removes.

    Example:
        >>> import torch
        >>> is_hf_model(torch.nn.Linear(1, 1))
        False
    """
    from transformers import PreTrainedModel  # a dependency; imported when first needed

    return isinstance(unwrap_model(module), PreTrainedModel)


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


def check_token_ids(model: Optional[nn.Module], tensors: Sequence[Any]) -> None:
    """Raise a ``ValueError`` naming the token ids outside the vocabulary of ``model``.

    Integer tensors among ``tensors`` are read as token ids when ``model`` has input
    embeddings (``get_input_embeddings()``, as Hugging Face models do); otherwise nothing
    is checked. An id outside the vocabulary would otherwise fail deep inside the
    embedding lookup (or, on some devices, read memory it should not).

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
        >>> check_token_ids(model, [torch.tensor([[1, 12, -1]])])
        Traceback (most recent call last):
        ...
        ValueError: token ids [-1, 12] are outside the vocabulary of GPT2LMHeadModel (size 10): ids must be in [0, 9]
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if get_embeddings is None:
        return
    vocab = getattr(get_embeddings(), "num_embeddings", None)
    if vocab is None:
        return
    for ids in tensors:
        if not isinstance(ids, Tensor) or ids.dtype not in _ID_DTYPES or not ids.numel():
            continue
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            values = sorted(set(bad.tolist()))
            more = f" and {len(values) - 10} more" if len(values) > 10 else ""
            raise ValueError(
                f"token ids {values[:10]}{more} are outside the vocabulary of {type(model).__name__} "
                f"(size {vocab}): ids must be in [0, {vocab - 1}]"
            )


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
