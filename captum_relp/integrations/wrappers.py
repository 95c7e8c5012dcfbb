"""Unwrapping nnsight models/envoys and data-parallel wrappers to the torch module inside.

nnsight's ``NNsight``/``LanguageModel`` and its ``Envoy`` objects (``lm.transformer.h[0]``)
are not ``nn.Module``\\ s; they hold the module in ``_module``. ``DistributedDataParallel``
and ``DataParallel`` hold it in ``module``. Attribution needs the module itself: its
hooks, its submodules and (for the AH-rule) its Hugging Face config. These helpers
are duck-typed, so neither nnsight nor a process group is needed to use them.
"""
from __future__ import annotations

from typing import Any

from torch import nn

WRAPPER_TYPES = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(obj: Any) -> Any:
    """The torch module inside an nnsight model/envoy or a (Distributed)DataParallel wrapper.

    Anything else (a module, a plain function, ``None``) is returned as it is.

    Args:
        obj: A model, layer or callable.

    Returns:
        The innermost wrapped ``nn.Module``, or ``obj``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
        >>> class Envoy:  # what nnsight hands out
        ...     def __init__(self, module): self._module = module
        >>> unwrap_model(Envoy(net)) is net
        True
    """
    for _ in range(8):  # wrappers of wrappers, bounded
        if isinstance(obj, WRAPPER_TYPES):
            obj = obj.module
        elif not isinstance(obj, nn.Module) and isinstance(getattr(obj, "_module", None), nn.Module):
            obj = obj._module
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


__all__ = ["unwrap_model", "unwrap_layers", "WRAPPER_TYPES"]
