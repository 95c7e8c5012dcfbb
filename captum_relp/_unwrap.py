"""The one place that finds the torch module behind what a user passes as a model or layer.

nnsight's ``NNsight``/``LanguageModel`` and its ``Envoy`` objects (``lm.transformer.h[0]``)
are not ``nn.Module``\\ s; they hold the module in ``_module``. ``DistributedDataParallel``
and ``DataParallel`` hold it in ``module``, a ``torch.compile``\\ d module in ``_orig_mod``,
a bound ``forward`` in ``__self__``. Attribution needs the module itself: its hooks, its
submodules and (for the AH-rule) its Hugging Face config. Everything is duck-typed, so
neither nnsight nor a process group is needed.
"""
from __future__ import annotations

from typing import Any

from torch import nn

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
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(unwrap_model(module), PreTrainedModel)


__all__ = ["unwrap_model", "unwrap_layers", "WRAPPER_TYPES"]
