"""Contrastive metrics used as ``metric=`` in the attribution classes.

Each metric maps model logits ``(B, T, V)`` to one value per example ``(B,)``,
read at each row's final position (``positions``, default: the last one).
This module also holds the package's only row-tiling code (:func:`tile_rows`):
activation patching and IG run ``k`` tiled copies of a batch of ``N`` examples,
and the one metric contract every method evaluates through (:class:`MetricEvaluator`,
:func:`checked_metric`: shape ``(rows,)``, finite, named in the error).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from captum._utils.common import _select_targets
from torch import Tensor

IdsType = Union[int, Sequence[int], Tensor]
TargetType = Union[None, int, Sequence[int], Tensor]
MetricType = Optional[Callable[[Tensor], Tensor]]


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

    def _difference(self, final: Tensor) -> Tensor:
        """``final[correct] - final[wrong]`` per row of ``(rows, V)`` final-position values."""
        rows = final.shape[0]
        index = torch.arange(rows, device=final.device)
        correct = tile_rows(self.correct_ids, rows, final.device)
        wrong = tile_rows(self.wrong_ids, rows, final.device)
        return final[index, correct] - final[index, wrong]

    def __call__(self, logits: Tensor) -> Tensor:
        return self._difference(final_logits(logits, self.positions))


class ProbDiff(LogitDiff):
    """``p(correct) - p(wrong)`` (softmax over the vocabulary) at the final position.

    Example:
        >>> import torch
        >>> ProbDiff(1, 0)(torch.zeros(1, 2, 4))
        tensor([0.])
    """

    def __call__(self, logits: Tensor) -> Tensor:
        return self._difference(torch.softmax(final_logits(logits, self.positions).float(), dim=-1))


def logit_diff(correct_ids: IdsType, wrong_ids: IdsType, positions: Optional[IdsType] = None) -> LogitDiff:
    """Shorthand for :class:`LogitDiff`.

    Example:
        >>> import torch
        >>> logit_diff(2, 3)(torch.arange(8.0).reshape(1, 2, 4))
        tensor([-1.])
    """
    return LogitDiff(correct_ids, wrong_ids, positions)


def last_positions(attention_mask: Optional[Tensor], n_rows: int, seq_len: int, device) -> Tensor:
    """Index of the last real token of each row (right padding); ``seq_len - 1`` without mask."""
    if attention_mask is None:
        return torch.full((n_rows,), seq_len - 1, dtype=torch.long, device=device)
    mask = attention_mask.to(device).long()
    positions = torch.arange(mask.shape[1], device=device).expand_as(mask)
    return (positions * mask).max(dim=1).values


def _metric_name(metric: Callable) -> str:
    return getattr(metric, "__name__", None) or repr(metric)


def _finite(values: Tensor, what: Union[str, Callable[[], str]]) -> Tensor:
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        what = what() if callable(what) else what  # a metric's repr only when it is needed
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
    return _finite(values, lambda: f"the values of metric {_metric_name(metric)}")


class MetricEvaluator:
    """Maps a model output to one scalar per example, from ``target`` or ``metric``.

    * ``metric``: a callable ``metric(output) -> Tensor[B]``. When the output has
      ``k * B`` rows (tiled batches used by activation patching and IG), it is
      called on each block of ``B`` rows.
    * ``target``: for 3-D outputs ``(B, T, V)`` (language-model logits) the logit
      of token ``target`` at each row's last real position; for 2-D outputs
      Captum's target selection; 0-/1-D outputs are used as they are.
    * ``logit_positions``: the sequence positions a plain callable ``metric`` reads from
      language-model logits (see ``captum_relp._read_positions``).
    """

    def __init__(self, batch_size: int, target: TargetType = None, metric: MetricType = None,
                 logit_positions: Any = None) -> None:
        if target is not None and metric is not None:
            raise ValueError("pass either target or metric, not both")
        if logit_positions is not None and (metric is None or getattr(metric, "reads_final_logits", False)):
            raise ValueError(
                "logit_positions is for a plain callable metric; target= and metrics that declare "
                "their positions (LogitDiff(positions=...), ProbDiff) already read only those"
            )
        self.batch_size = batch_size
        self.target = target
        self.metric = metric
        self.logit_positions = logit_positions

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
