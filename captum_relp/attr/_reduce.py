"""Scores reduced as they are computed (``reduce=``), freeing each layer's tensors early.

With ``reduce="sum"`` (over hidden units) or ``reduce="heads"`` (per attention head),
RelP and AtP turn each layer's ``(act - act_ref) * coefficient`` into its reduced score
inside a gradient hook, the moment the coefficient arrives in the backward pass, and drop
that layer's reference activation right away: no full ``(B, T, d)`` coefficient is kept.
"""
from __future__ import annotations

from typing import Callable, ContextManager, List, Optional, Sequence

import torch
from torch import Tensor

from .._forward import call_model
from .._hooks import capture, layer_hooks
from ..metrics import MetricEvaluator
from ..models import split_heads

REDUCTIONS = (None, "sum", "heads")


def check_reduce(reduce: Optional[str], num_heads: Optional[int]) -> None:
    """Raise on an unknown reduction, or ``"heads"`` without ``num_heads``.

    Example:
        >>> check_reduce("sum", None)
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if reduce == "heads" and not num_heads:
        raise ValueError("reduce='heads' needs num_heads")


def reduce_scores(scores: Tensor, reduce: Optional[str], num_heads: Optional[int] = None) -> Tensor:
    """Sum over the last dimension (hidden units), per head (``(..., H*D) -> (..., H)``), or nothing.

    Example:
        >>> reduce_scores(torch.ones(1, 2, 4), "heads", 2)
        tensor([[[2., 2.],
                 [2., 2.]]])
    """
    if reduce is None:
        return scores
    if reduce == "sum":
        return scores.sum(-1)
    return split_heads(scores, int(num_heads))  # type: ignore[arg-type]


def streamed_scores(
    forward_func: Callable, layers: Sequence[torch.nn.Module], flags: Sequence[bool], run, args, kwargs,
    evaluator: MetricEvaluator, combine: Callable[[int, Tensor, Tensor], Tensor],
    rules_context: Callable[[], ContextManager], require: Callable[[Optional[Tensor], int], Tensor],
    on_disconnected: Callable[[int], None],
) -> List[Tensor]:
    """One forward and backward pass; ``combine(i, act, coefficient)`` runs per layer in the backward.

    ``rules_context()`` applies the backward rules around the pass; ``require(t, i)``
    checks that layer ``i`` was called. The activation of layer ``i`` and its
    coefficient are released once ``combine`` returns. For a layer the metric does not
    depend on, ``on_disconnected(i)`` is called (it raises unless zeros were asked for),
    then the layer scores zero.
    """
    store: List[Optional[Tensor]] = [None] * len(layers)
    results: List[Optional[Tensor]] = [None] * len(layers)

    def on_grad(index: int):
        def hook(grad: Tensor) -> None:
            act = store[index]
            results[index] = combine(index, act.detach(), grad).detach()  # type: ignore[union-attr]
            store[index] = None

        return hook

    with torch.enable_grad(), rules_context(), layer_hooks(
        layers, flags, capture(store, make_leaf=True)
    ):
        output = call_model(forward_func, run, args, kwargs)
        evaluator.check_target(output)
        values = evaluator(output, kwargs.get("attention_mask"))
        acts = [require(t, i) for i, t in enumerate(store)]
        shapes = [(a.shape, a.dtype, a.device) for a in acts]
        for index, act in enumerate(acts):
            act.register_hook(on_grad(index))
        leaves = [a for a in acts if a.is_leaf] or acts
        del output, acts
        torch.autograd.grad(values.sum(), leaves, allow_unused=True)
        del leaves, values
    for index, result in enumerate(results):
        if result is None:  # the metric does not depend on this layer
            on_disconnected(index)
            shape, dtype, device = shapes[index]
            zero = torch.zeros(shape, dtype=dtype, device=device)
            results[index] = combine(index, zero, zero)
    return results  # type: ignore[return-value]


__all__ = ["REDUCTIONS", "check_reduce", "reduce_scores", "streamed_scores"]
