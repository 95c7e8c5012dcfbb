"""Calling the model and turning its output into one scalar metric per example.

Shared by every attribution class of the package, so RelP, AtP, AP and IG all
evaluate exactly the same metric.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _select_targets
from torch import Tensor, nn

from .metrics import tile_rows

TargetType = Union[None, int, Sequence[int], Tensor]
MetricType = Optional[Callable[[Tensor], Tensor]]


def is_hf_model(module: Any) -> bool:
    """Whether ``module`` is a Hugging Face model, also behind ``torch.compile`` or a bound ``forward``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(unwrap(module), PreTrainedModel)


def unwrap(forward_func: Any) -> Any:
    """The module behind a compiled module (``_orig_mod``) or a bound method (``__self__``).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(1, 1)
        >>> unwrap(net.forward) is net
        True
    """
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(getattr(forward_func, "_orig_mod", None), nn.Module):
            forward_func = forward_func._orig_mod
        elif not isinstance(forward_func, nn.Module) and isinstance(getattr(forward_func, "__self__", None), nn.Module):
            forward_func = forward_func.__self__
        else:
            break
    return forward_func


def is_compiled(forward_func: Any) -> bool:
    """Whether ``forward_func`` is a ``torch.compile``d module (or its bound ``forward``)."""
    module = getattr(forward_func, "__self__", forward_func)
    return isinstance(getattr(module, "_orig_mod", None), nn.Module)


def root_module(forward_func: Callable, model: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """The module whose submodules get rules: ``model``, ``forward_func`` or its owner (uncompiled)."""
    if model is not None:
        return unwrap(model)
    owner = unwrap(forward_func)
    return owner if isinstance(owner, nn.Module) else None


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


def last_positions(attention_mask: Optional[Tensor], n_rows: int, seq_len: int, device) -> Tensor:
    """Index of the last real token of each row (right padding); ``seq_len - 1`` without mask."""
    if attention_mask is None:
        return torch.full((n_rows,), seq_len - 1, dtype=torch.long, device=device)
    mask = attention_mask.to(device).long()
    positions = torch.arange(mask.shape[1], device=device).expand_as(mask)
    return (positions * mask).max(dim=1).values


def disconnected_message(names: Sequence[str]) -> str:
    """The error for tensors the metric does not depend on (shared by every gradient user)."""
    return (
        f"the metric does not depend on {', '.join(names)}: its coefficient is disconnected from the "
        "metric. Is the layer downstream of the metric's inputs, or is the model wrapped in a graph "
        "that bypasses module hooks (e.g. torch.compile of a submodule)? Pass allow_unused=True to "
        "score such layers as zero."
    )


def metric_grads(values: Tensor, tensors: Sequence[Tensor], names: Sequence[str],
                 allow_unused: bool = False) -> List[Tensor]:
    """Gradients (or rule coefficients) of ``values.sum()`` w.r.t. ``tensors``.

    A tensor the metric does not depend on raises a ``ValueError`` naming it (``names``),
    unless ``allow_unused`` asks for zeros: never a silent zero.

    Example:
        >>> import torch
        >>> x, y = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
        >>> metric_grads((3 * x), [x, y], ["x", "y"], allow_unused=True)
        [tensor([3., 3.]), tensor([0., 0.])]
    """
    grads = torch.autograd.grad(values.sum(), list(tensors), allow_unused=True)
    missing = [name for name, grad in zip(names, grads) if grad is None]
    if missing and not allow_unused:
        raise ValueError(disconnected_message(missing))
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def _metric_name(metric: Callable) -> str:
    return getattr(metric, "__name__", None) or repr(metric)


def _finite(values: Tensor, what: str) -> Tensor:
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{what} contain {bad} non-finite value(s) (NaN or inf): scores would be NaN")
    return values


def checked_metric(metric: Callable[[Tensor], Tensor], output: Tensor, rows: int) -> Tensor:
    """``metric(output)``, checked to be a finite tensor of shape ``(rows,)``.

    Raises:
        ValueError: naming the metric and the shape it returned, e.g. for a metric
            that averages over the batch (``.mean()``) or keeps the position axis.

    Example:
        >>> import torch
        >>> checked_metric(lambda out: out[:, -1, 0], torch.zeros(2, 3, 4), 2)
        tensor([0., 0.])
    """
    values = metric(output)
    if not isinstance(values, Tensor) or tuple(values.shape) != (rows,):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            f"metric {_metric_name(metric)} returned shape {shape} for {rows} rows; it must return one "
            f"value per row, shape ({rows},) (do not average over the batch)"
        )
    return _finite(values, f"the values of metric {_metric_name(metric)}")


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
                checked_metric(self.metric, output[i : i + self.batch_size], self.batch_size)
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
            return _finite(_select_targets(output, target).reshape(-1), "the target outputs")
        last = last_positions(attention_mask, rows, output.shape[1], output.device)
        rows_idx = torch.arange(rows, device=output.device)
        return _finite(output[rows_idx, last][rows_idx, target], "the target logits")
