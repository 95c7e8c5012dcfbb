"""What a plain callable metric is shown when only some logit positions are computed, and the
check, in every real run, that it gives the same values as on the full logits.

A metric that chooses its positions from the logit values (the position of the largest logit,
the first token whose probability passes a threshold) reads other positions on real logits than
on the probes of :mod:`captum_relp._read_positions`. :func:`agrees_with_full_logits` compares its
value on what it was shown with its value on the full logits of the same forward pass; the caller
then hands it the full logits, so scores equal the full-logits path or the check says why not.
"""
from __future__ import annotations

import math
from typing import Any, List

import torch
from torch import Tensor


def shown_logits(output: Tensor, rows: int, length: int, local: List[int], count: int) -> Tensor:
    """The ``(rows, length, V)`` logits a plain metric is shown, from the head's output rows.

    Example:
        >>> out = torch.arange(4.0).reshape(2, 2)  # rows: example 0 and 1 at one position, V = 2
        >>> shown_logits(out, 2, 3, [2], 2)[1].tolist()  # repeated over the 3 positions
        [[2.0, 3.0], [2.0, 3.0], [2.0, 3.0]]
    """
    picked = output[:count].reshape(rows, len(local), output.shape[-1])
    if len(local) == length:  # the metric is shown exactly the positions computed
        return picked
    if len(local) == 1:  # a view: no (rows, T, V) tensor is allocated
        return picked.expand(rows, length, output.shape[-1])
    filled = torch.cat([picked, picked.new_full((rows, 1, output.shape[-1]), math.nan)], dim=1)
    where = torch.full((length,), len(local), dtype=torch.long, device=output.device)
    where[local] = torch.arange(len(local), device=output.device)
    return filled[:, where]


FULL_LOGITS_RTOL = 1e-6
"""A plain metric on the logits it is shown must equal its value on the full logits to this
relative tolerance (times the largest value, at least 1), else it gets the full logits."""


def agrees_with_full_logits(evaluator: Any, shown: Tensor, full: Tensor) -> bool:
    """Whether the metric gives the same values on the logits it is shown as on the full logits
    of the same run (both finite, equal to :data:`FULL_LOGITS_RTOL`).

    Example:
        >>> from captum_relp.metrics import MetricEvaluator
        >>> full = torch.tensor([[[0.0, 1.0], [5.0, 0.0]]])  # (1, T=2, V=2)
        >>> shown = full[:, 1:].expand(1, 2, 2)  # position 1 only, repeated
        >>> agrees_with_full_logits(MetricEvaluator(1, metric=lambda l: l[:, -1, 0]), shown, full)
        True
        >>> largest = lambda l: l[:, :, 1].max(1).values  # the largest logit of token 1, any position
        >>> agrees_with_full_logits(MetricEvaluator(1, metric=largest), shown, full)
        False
    """
    rows = full.shape[0]
    with torch.no_grad():
        try:
            values = [(evaluator.metric(shown[i : i + evaluator.batch_size].detach()),
                       evaluator.metric(full[i : i + evaluator.batch_size].detach()))
                      for i in range(0, rows, evaluator.batch_size)]
        except Exception:  # noqa: BLE001  (it cannot take what it was shown: the full logits)
            return False
    for mine, reference in values:
        if not (isinstance(mine, Tensor) and isinstance(reference, Tensor)) or mine.shape != reference.shape:
            return False
        if not bool(torch.isfinite(mine).all()) or not bool(torch.isfinite(reference).all()):
            return False
        if mine.numel() and float((mine - reference).abs().max()) > \
                FULL_LOGITS_RTOL * max(1.0, float(reference.abs().max())):
            return False
    return True


__all__ = ["FULL_LOGITS_RTOL", "agrees_with_full_logits", "shown_logits"]
