"""Contrastive metrics used as ``metric=`` in the attribution classes.

Each metric maps model logits ``(B, T, V)`` to one value per example ``(B,)``,
read at each row's final position (``positions``, default: the last one).
This module also holds the package's only row-tiling code (:func:`tile_rows`):
activation patching and IG run ``k`` tiled copies of a batch of ``N`` examples.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

IdsType = Union[int, Sequence[int], Tensor]


def tile_rows(ids: IdsType, rows: int, device=None) -> Tensor:
    """One value per row: one value for all, or ``N`` values tiled over ``k * N`` rows.

    Rows are read as ``k`` copies of the ``N`` examples (``[ex0..exN-1, ex0..]``).

    Example:
        >>> tile_rows([3, 4], 4)
        tensor([3, 4, 3, 4])
    """
    values = torch.as_tensor(ids, device=device).reshape(-1).long()
    if values.numel() == 1:
        return values.expand(rows)
    if rows % values.numel():
        raise ValueError(f"{values.numel()} ids cannot be tiled over {rows} rows")
    return values.repeat(rows // values.numel())


def final_logits(logits: Tensor, positions: Optional[IdsType] = None) -> Tensor:
    """Logits ``(rows, V)`` at each row's final position (default: the last one).

    ``logits`` may be ``(rows, T, V)``, already ``(rows, V)``, or a model output
    with ``.logits``; ``positions`` are tiled over ``k * N`` rows like ids.

    Example:
        >>> import torch
        >>> final_logits(torch.arange(12.0).reshape(1, 3, 4), [1])
        tensor([[4., 5., 6., 7.]])
    """
    logits = getattr(logits, "logits", logits)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if logits.dim() == 2:
        return logits
    if positions is None:
        return logits[:, -1]
    rows = logits.shape[0]
    return logits[torch.arange(rows, device=logits.device), tile_rows(positions, rows, logits.device)]


class LogitDiff:
    """``logit(correct) - logit(wrong)`` at each row's final position.

    Args:
        correct_ids, wrong_ids: token ids, one per example (or one for all).
        positions: index of the final position per example (default: ``-1``).

    Logits with ``k * N`` rows (tiled copies of the ``N`` examples, as activation
    patching and IG produce) give ``k * N`` values.

    Example:
        >>> import torch
        >>> logits = torch.zeros(2, 3, 5); logits[:, -1, 1] = 2.0
        >>> LogitDiff([1, 1], [0, 0])(logits)
        tensor([2., 2.])
    """

    reads_final_logits = True
    """Declares that only ``positions`` are read and ``(rows, V)`` logits are accepted, so the
    attribution classes compute logits only there on Hugging Face causal LMs."""

    def __init__(self, correct_ids: IdsType, wrong_ids: IdsType, positions: Optional[IdsType] = None):
        self.correct_ids = correct_ids
        self.wrong_ids = wrong_ids
        self.positions = positions

    def _final_logits(self, logits: Tensor) -> Tensor:
        return final_logits(logits, self.positions)

    def at_positions(self, positions: IdsType) -> "LogitDiff":
        """A copy of this metric that reads ``positions`` (one per example).

        Example:
            >>> import torch
            >>> logits = torch.zeros(1, 3, 4); logits[0, 1, 2] = 1.0
            >>> LogitDiff(2, 0).at_positions([1])(logits)
            tensor([1.])
        """
        import copy

        metric = copy.copy(self)
        metric.positions = positions
        return metric

    def _pair(self, final: Tensor):
        rows = final.shape[0]
        index = torch.arange(rows, device=final.device)
        correct = tile_rows(self.correct_ids, rows, final.device)
        wrong = tile_rows(self.wrong_ids, rows, final.device)
        return final[index, correct], final[index, wrong]

    def __call__(self, logits: Tensor) -> Tensor:
        correct, wrong = self._pair(self._final_logits(logits))
        return correct - wrong


class ProbDiff(LogitDiff):
    """``p(correct) - p(wrong)`` (softmax over the vocabulary) at the final position.

    Example:
        >>> import torch
        >>> ProbDiff(1, 0)(torch.zeros(1, 2, 4))
        tensor([0.])
    """

    def __call__(self, logits: Tensor) -> Tensor:
        probs = torch.softmax(self._final_logits(logits).float(), dim=-1)
        correct, wrong = self._pair(probs)
        return correct - wrong


def logit_diff(correct_ids: IdsType, wrong_ids: IdsType, positions: Optional[IdsType] = None) -> LogitDiff:
    """Shorthand for :class:`LogitDiff`.

    Example:
        >>> import torch
        >>> logit_diff(2, 3)(torch.arange(8.0).reshape(1, 2, 4))
        tensor([-1.])
    """
    return LogitDiff(correct_ids, wrong_ids, positions)
