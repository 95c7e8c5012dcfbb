"""Hooks on layer inputs/outputs and a guard that restores the model afterwards."""
from __future__ import annotations

import inspect
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

from torch import Tensor, nn

TensorFn = Callable[[int, Tensor], Optional[Tensor]]


@contextmanager
def hooks_removed() -> Iterator[List[Any]]:
    """A list to put hook handles in; every handle in it is removed when the block exits.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(1, 1)
        >>> with hooks_removed() as handles:
        ...     handles.append(net.register_forward_hook(lambda *args: None))
        >>> len(net._forward_hooks)
        0
    """
    handles: List[Any] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def as_layer_list(layer: Union[nn.Module, Sequence[nn.Module]]) -> List[nn.Module]:
    if isinstance(layer, nn.Module):
        return [layer]
    layers = list(layer)
    if not layers or not all(isinstance(m, nn.Module) for m in layers):
        raise TypeError("layer must be an nn.Module or a non-empty list of nn.Modules")
    return layers


def per_layer_flags(flag: Union[bool, Sequence[bool]], n_layers: int, name: str) -> List[bool]:
    if isinstance(flag, bool):
        return [flag] * n_layers
    flags = [bool(f) for f in flag]
    if len(flags) != n_layers:
        raise ValueError(f"{name} has {len(flags)} entries for {n_layers} layers")
    return flags


def check_layers_in_model(model: Optional[nn.Module], layers: Sequence[nn.Module]) -> None:
    if model is None:
        return
    known = {id(m) for m in model.modules()}
    for index, layer in enumerate(layers):
        if id(layer) not in known:
            raise ValueError(
                f"layer[{index}] ({type(layer).__name__}) is not a submodule of the model "
                f"({type(model).__name__})"
            )


@contextmanager
def layer_hooks(
    layers: Sequence[nn.Module], to_input: Sequence[bool], fn: TensorFn
) -> Iterator[None]:
    """Call ``fn(i, tensor)`` on layer i's output (or first input) and substitute its result.

    For modules returning tuples (Hugging Face attention and decoder layers) the
    first element is used.
    """
    def output_hook(index: int):
        def hook(module, args, output):
            if isinstance(output, Tensor):
                return fn(index, output)
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
                new = fn(index, output[0])
                if new is None:
                    return None
                return type(output)((new, *output[1:])) if isinstance(output, tuple) else [new, *output[1:]]
            raise TypeError(f"layer[{index}] ({type(module).__name__}) returned no tensor to attribute")

        return hook

    def input_hook(index: int):
        def hook(module, args, kwargs):
            if args and isinstance(args[0], Tensor):
                new = fn(index, args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            if "hidden_states" in kwargs and isinstance(kwargs["hidden_states"], Tensor):
                new = fn(index, kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})
            raise TypeError(f"layer[{index}] ({type(module).__name__}) received no tensor input")

        return hook

    with hooks_removed() as handles:
        for index, (layer, use_input) in enumerate(zip(layers, to_input)):
            if use_input:
                handles.append(layer.register_forward_pre_hook(input_hook(index), with_kwargs=True))
            else:
                handles.append(layer.register_forward_hook(output_hook(index)))
        yield


@contextmanager
def captum_safe_outputs(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Make Hugging Face modules digestible for Captum's layer hooks, without changing results.

    * ``None`` entries of tuple outputs (attention modules return ``(output, None)``
      under sdpa) become empty tensors; callers discard them.
    * Positional arguments after the first (GPT-2 blocks get ``past_key_values=None``
      positionally) are passed as keywords, so Captum sees one input tensor.
    """

    def output_hook(module, args, output):
        if isinstance(output, tuple) and any(o is None for o in output):
            reference = next(o for o in output if isinstance(o, Tensor))
            return tuple(reference.new_zeros(0) if o is None else o for o in output)
        return None

    def input_hook(module, args, kwargs):
        if len(args) <= 1:
            return None
        names = list(inspect.signature(module.forward).parameters)
        moved = dict(zip(names[1:], args[1:]))
        return args[:1], {**kwargs, **moved}

    with hooks_removed() as handles:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(input_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(output_hook))
        yield


class _Owner:
    """The lock of one model and the thread that holds it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: Optional[int] = None


_OWNERS: "weakref.WeakKeyDictionary[nn.Module, _Owner]" = weakref.WeakKeyDictionary()
_OWNERS_LOCK = threading.Lock()


class NestedAttributionError(RuntimeError):
    """An attribution was started on a model this thread is already attributing."""


@contextmanager
def model_owned(model: nn.Module) -> Iterator[None]:
    """Hold ``model`` for one attribution: other threads wait; a nested call in this thread raises.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(1, 1)
        >>> with model_owned(net):
        ...     pass
    """
    with _OWNERS_LOCK:
        owner = _OWNERS.setdefault(model, _Owner())
    if owner.thread == threading.get_ident():
        raise NestedAttributionError(
            f"{type(model).__name__} is already being attributed in this thread (an attribute() call "
            "inside a metric or a forward hook?). Nested attribution on the same model would mix the "
            "outer call's hooks and rules into the inner one; compute the inner quantity before or after."
        )
    with owner.lock:
        owner.thread = threading.get_ident()
        try:
            yield
        finally:
            owner.thread = None


@contextmanager
def frozen_model(model: Optional[nn.Module]) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; flags and mode restored on exit.

    The model is held for the duration (:func:`model_owned`), so concurrent
    attributions of one model run one after the other and never interleave their
    saves and restores.
    """
    if model is None:
        yield
        return
    with model_owned(model):
        # by name: accelerate's offload hooks replace Parameter objects during a forward
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            for param in model.parameters():
                param.requires_grad_(False)
            yield
        finally:
            for name, param in model.named_parameters():
                param.requires_grad_(flags.get(name, param.requires_grad))
            for module, mode in modes:
                module.training = mode


def capture(store: List[Optional[Tensor]], make_leaf: bool = False) -> TensorFn:
    """A hook function recording each layer's tensor (as a grad leaf if needed)."""

    def fn(index: int, tensor: Tensor) -> Optional[Tensor]:
        if store[index] is not None:
            raise RuntimeError(
                f"layer[{index}] was called more than once in one forward pass; attribute a module "
                "that runs once"
            )
        if make_leaf and not tensor.requires_grad:
            tensor = tensor.detach().requires_grad_(True)
        store[index] = tensor
        # the model goes on with a copy: a block may add to this tensor in place (Falcon adds the
        # attention output to the MLP output), which would change the stored activation
        return tensor.clone()

    return fn


def pad_mask_like(attention_mask: Optional[Tensor], tensor: Tensor) -> Optional[Tensor]:
    """The attention mask broadcast to ``tensor`` when its first two dims are (batch, seq)."""
    if attention_mask is None or tensor.dim() < 2 or tensor.shape[:2] != attention_mask.shape[:2]:
        return None
    shape = tuple(attention_mask.shape[:2]) + (1,) * (tensor.dim() - 2)
    return attention_mask.to(tensor.device).reshape(shape).to(tensor.dtype)

