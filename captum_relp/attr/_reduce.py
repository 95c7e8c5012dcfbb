"""Scores reduced as they are computed (``reduce=``), freeing each layer's tensors early.

With ``reduce="sum"`` (over hidden units) or ``reduce="heads"`` (per attention head),
RelP and AtP turn each layer's ``(act - act_ref) * coefficient`` into its reduced score
the moment the coefficient arrives in the backward pass (``on_coefficient`` of
:func:`~captum_relp._coefficients.coefficient_pass`) and drop that layer's reference
activation right away: no full ``(B, T, d)`` coefficient is kept.
"""
from __future__ import annotations

from typing import Optional

import torch  # noqa: F401  (the doctests run in this module's namespace)
from torch import Tensor

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


__all__ = ["REDUCTIONS", "check_reduce", "reduce_scores"]
