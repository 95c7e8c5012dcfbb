"""Calling the model and turning its output into one scalar metric per example.

Shared by every attribution class of the package, so RelP, AtP, AP and IG all
evaluate exactly the same metric.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _select_targets
from torch import Tensor, nn

from .metrics import tile_rows

TargetType = Union[None, int, Sequence[int], Tensor]
MetricType = Optional[Callable[[Tensor], Tensor]]


def is_hf_model(module: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, PreTrainedModel)


def root_module(forward_func: Callable, model: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """The module whose submodules get rules: ``model``, ``forward_func`` or its owner."""
    if model is not None:
        return model
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def split_forward_args(
    forward_func: Callable, additional_forward_args: Any
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
    else:
        output = forward_func(*inputs, *args, **kwargs)
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, tuple) and not isinstance(output, Tensor):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"forward_func must return a tensor or an output with .logits, got {type(output)}")
    return output


def last_positions(attention_mask: Optional[Tensor], n_rows: int, seq_len: int, device) -> Tensor:
    """Index of the last real token of each row (right padding); ``seq_len - 1`` without mask."""
    if attention_mask is None:
        return torch.full((n_rows,), seq_len - 1, dtype=torch.long, device=device)
    mask = attention_mask.to(device).long()
    positions = torch.arange(mask.shape[1], device=device).expand_as(mask)
    return (positions * mask).max(dim=1).values


class MetricEvaluator:
    """Maps a model output to one scalar per example, from ``target`` or ``metric``.

    * ``metric``: a callable ``metric(output) -> Tensor[B]``. When the output has
      ``k * B`` rows (tiled batches used by activation patching and IG), it is
      called on each block of ``B`` rows.
    * ``target``: for 3-D outputs ``(B, T, V)`` (language-model logits) the logit
      of token ``target`` at each row's last real position; for 2-D outputs
      Captum's target selection; 0-/1-D outputs are used as they are.
    """

    def __init__(self, batch_size: int, target: TargetType = None, metric: MetricType = None) -> None:
        if target is not None and metric is not None:
            raise ValueError("pass either target or metric, not both")
        self.batch_size = batch_size
        self.target = target
        self.metric = metric

    def check_target(self, output: Tensor) -> None:
        if self.target is None or self.metric is not None or output.dim() < 2:
            return
        values = torch.as_tensor(self.target).flatten()
        n_classes = output.shape[-1]
        if values.numel() and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(
                f"target out of range: got values in [{int(values.min())}, {int(values.max())}], "
                f"output has {n_classes} classes"
            )
        if values.numel() not in (1, self.batch_size):
            raise ValueError(f"target must have 1 or {self.batch_size} entries, got {values.numel()}")

    def __call__(self, output: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        rows = output.shape[0] if output.dim() else 1
        if self.metric is not None:
            if rows % self.batch_size:
                raise ValueError(f"output has {rows} rows, not a multiple of batch size {self.batch_size}")
            blocks = [
                self.metric(output[i : i + self.batch_size]).reshape(-1)
                for i in range(0, rows, self.batch_size)
            ]
            return torch.cat(blocks)
        if output.dim() <= 1 or (self.target is None and output.dim() == 2 and output.shape[1] == 1):
            return output.reshape(-1)
        if self.target is None:
            raise ValueError(
                f"target (or metric) is required for a model output of shape {tuple(output.shape)}"
            )
        target = tile_rows(self.target, rows, output.device)
        if output.dim() == 2:
            return _select_targets(output, target).reshape(-1)
        last = last_positions(attention_mask, rows, output.shape[1], output.device)
        rows_idx = torch.arange(rows, device=output.device)
        return output[rows_idx, last][rows_idx, target]
