r"""Metrics of task files: one value per example from the logits at the positions they read.

Every metric here reads the logits at the last prompt token :math:`p` of each row and, for
answers longer than one token, at the :math:`m - 1` positions after it, where the answer's
own tokens were appended to the prompt (*teacher forcing*: the model reads the answer's
first tokens as input, so attribution flows through every step). With :math:`P_j` the
softmax of the logits :math:`z_j` at position :math:`p + j`:

* :class:`SetLogitDiff` (logit difference, the default):
  :math:`\frac{1}{|A|}\sum_{a \in A} z_0[a] - \frac{1}{|B|}\sum_{b \in B} z_0[b]`, for the
  answer set :math:`A` and the foil set :math:`B` (one token each in most tasks:
  :math:`z_0[a] - z_0[b]`);
* :class:`SetProbDiff` (probability difference over token sets, greater-than style):
  :math:`\sum_{a \in A} P_0(a) - \sum_{b \in B} P_0(b)`;
* :class:`DigitYearProbDiff` (greater-than when the tokenizer splits years into digits): the
  probability of the two-digit years above the label :math:`10t + u` minus those at or below
  it, with :math:`P(d_1 d_2) = P_0(d_1)\,P_1(d_2 \mid d_1)` and the label's tens digit
  :math:`t` appended: :math:`\sum_{d > t} P_0(d) + P_0(t) \sum_{d > u} P_1(d) - \sum_{d < t}
  P_0(d) - P_0(t) \sum_{d \le u} P_1(d)`;
* :class:`AnswerLogProb` (log-probability of the answer):
  :math:`\log \sum_{a \in A} P_0(a) + \sum_{j=1}^{m-1} \log P_j(s_j)` for an answer
  sequence :math:`s_0 \dots s_{m-1}` (:math:`A = \{s_0\}`) or a set :math:`A` of one-token
  answers.

Metrics that read one position declare it (``reads_final_logits``, ``positions``), so the
attribution classes compute the logits only there; those that read several positions are
plain callables whose positions are found and checked against the full logits in every run.
:func:`linearized` gives a metric's first-order expansion around the clean logits.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import Tensor

from captum_relp._coefficients import TensorSites, layer_coefficients
from captum_relp.metrics import MetricEvaluator, tile_rows


def padded(rows: Sequence[Sequence[int]], fill: int = -1) -> Tensor:
    """Ragged id lists -> ``(N, K)`` long tensor padded with ``fill``.

    Example:
        >>> padded([[1], [2, 3]])
        tensor([[ 1, -1],
                [ 2,  3]])
    """
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def _tile(values: Tensor, rows: int, device) -> Tensor:
    """``(N, ...)`` per-example values tiled over ``k * N`` rows."""
    values = values.to(device)
    if rows % values.shape[0]:
        raise ValueError(f"{values.shape[0]} examples cannot be tiled over {rows} rows")
    return values.repeat(rows // values.shape[0], *([1] * (values.dim() - 1)))


def _set_sum(values: Tensor, ids: Tensor, mean: bool = False) -> Tensor:
    """Per row, the sum (or mean) of ``values[row, ids[row]]`` over the ids that are not ``-1``."""
    keep = ids >= 0
    picked = values.gather(1, ids.clamp_min(0)) * keep
    total = picked.sum(1)
    return total / keep.sum(1) if mean else total


class ReadMetric:
    """A metric computed from the logits at ``width`` positions per row, starting at ``positions``.

    Subclasses define ``from_read``, the value from the gathered ``(rows, width, V)`` logits.
    With ``width == 1`` the metric declares its position (``reads_final_logits``) and accepts
    ``(rows, V)`` logits.
    """

    def __init__(self, positions: Tensor, width: int = 1) -> None:
        self.positions = torch.as_tensor(positions).long()
        self.width = int(width)
        self.reads_final_logits = self.width == 1

    def read_positions(self) -> Tensor:
        """``(N, width)`` the positions each example's value is read from."""
        return self.positions[:, None] + torch.arange(self.width)

    def gather(self, logits: Tensor) -> Tensor:
        """``(rows, width, V)``: the logits this metric reads."""
        logits = getattr(logits, "logits", logits)
        if logits.dim() == 2:
            if self.width != 1:
                raise ValueError(f"{type(self).__name__} reads {self.width} positions, got (rows, V) logits")
            return logits[:, None]
        rows = logits.shape[0]
        where = tile_rows(self.positions, rows, logits.device)[:, None] + torch.arange(self.width, device=logits.device)
        return logits[torch.arange(rows, device=logits.device)[:, None], where]

    def at_positions(self, positions: Tensor) -> "ReadMetric":
        """A copy that reads from ``positions`` (one per example)."""
        metric = copy.copy(self)
        metric.positions = torch.as_tensor(positions).long()
        return metric

    def from_read(self, read: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, logits: Tensor) -> Tensor:
        return self.from_read(self.gather(logits))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.positions.shape[0]})"


class SetLogitDiff(ReadMetric):
    """Mean logit of the answer set minus mean logit of the foil set at the last prompt token.

    Args:
        correct, incorrect: ``(N, K)`` ids padded with ``-1`` (see :func:`padded`).
        positions: ``(N,)`` the last prompt token of each example.

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0, 3.0, 5.0]]])
        >>> SetLogitDiff(padded([[2, 3]]), padded([[1]]), torch.tensor([0]))(logits)
        tensor([3.])
    """

    def __init__(self, correct: Tensor, incorrect: Tensor, positions: Tensor) -> None:
        super().__init__(positions)
        self.correct, self.incorrect = correct, incorrect

    def from_read(self, read: Tensor) -> Tensor:
        final = read[:, 0]
        rows = final.shape[0]
        return (_set_sum(final, _tile(self.correct, rows, final.device), mean=True)
                - _set_sum(final, _tile(self.incorrect, rows, final.device), mean=True))


class SetProbDiff(SetLogitDiff):
    """Probability of the answer set minus probability of the foil set at the last prompt token.

    Example:
        >>> logits = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]))
        >>> SetProbDiff(padded([[2, 3]]), padded([[0, 1]]), torch.tensor([0]))(logits)
        tensor([0.4000])
    """

    def from_read(self, read: Tensor) -> Tensor:
        probs = torch.softmax(read[:, 0].float(), dim=-1)
        rows = probs.shape[0]
        return (_set_sum(probs, _tile(self.correct, rows, probs.device))
                - _set_sum(probs, _tile(self.incorrect, rows, probs.device)))


class DigitYearProbDiff(ReadMetric):
    """Greater-than over two-digit years written as two digit tokens (see the module docstring).

    Args:
        labels: ``(N,)`` the start year's last two digits; the tens digit must be appended
            to the prompt (the metric reads the position after it too).
        digit_ids: the token ids of ``0`` ... ``9``.
        positions: ``(N,)`` the last prompt token of each example.

    Example:
        >>> digits = list(range(10))
        >>> z = torch.full((1, 2, 10), -1e9); z[0, 0, 5] = 0.0  # P(5) = 1 after the prompt
        >>> z[0, 1, :] = 0.0  # every second digit equally likely after "5"
        >>> DigitYearProbDiff(torch.tensor([52]), digits, torch.tensor([0]))(z)  # 7/10 - 3/10
        tensor([0.4000])
    """

    def __init__(self, labels: Tensor, digit_ids: Sequence[int], positions: Tensor) -> None:
        super().__init__(positions, width=2)
        self.labels = torch.as_tensor(labels).long()
        self.digit_ids = torch.as_tensor(list(digit_ids)).long()

    def from_read(self, read: Tensor) -> Tensor:
        rows = read.shape[0]
        probs = torch.softmax(read.float(), dim=-1)[..., self.digit_ids.to(read.device)]  # (rows, 2, 10)
        labels = _tile(self.labels, rows, read.device)
        tens, units = (labels // 10)[:, None], (labels % 10)[:, None]
        digit = torch.arange(10, device=read.device)[None]
        first, second = probs[:, 0], probs[:, 1]
        p_tens = first.gather(1, tens)[:, 0]
        above = (first * (digit > tens)).sum(1) + p_tens * (second * (digit > units)).sum(1)
        below = (first * (digit < tens)).sum(1) + p_tens * (second * (digit <= units)).sum(1)
        return above - below


class AnswerLogProb(ReadMetric):
    """Log-probability of the answer: a set of one-token answers, or a teacher-forced sequence.

    Args:
        first: ``(N, K)`` the answer's first token, or a set of one-token answers (padded ``-1``).
        rest: ``(N, m - 1)`` the sequence's later tokens (padded ``-1``), or ``None``.
        positions: ``(N,)`` the last prompt token of each example.

    Example:
        >>> z = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
        >>> AnswerLogProb(padded([[0]]), padded([[2]]), torch.tensor([0]))(z).exp()  # 0.5 * 0.8
        tensor([0.4000])
    """

    def __init__(self, first: Tensor, rest: Optional[Tensor], positions: Tensor) -> None:
        width = 1 if rest is None or rest.shape[1] == 0 else 1 + rest.shape[1]
        super().__init__(positions, width=width)
        self.first, self.rest = first, rest

    def from_read(self, read: Tensor) -> Tensor:
        rows = read.shape[0]
        logp = torch.log_softmax(read.float(), dim=-1)
        first = _tile(self.first, rows, read.device)
        keep = first >= 0
        values = logp[:, 0].gather(1, first.clamp_min(0)).masked_fill(~keep, -torch.inf).logsumexp(1)
        if self.width > 1:
            rest = _tile(self.rest, rows, read.device)
            later = logp[:, 1:].gather(2, rest.clamp_min(0)[..., None])[..., 0]
            values = values + (later * (rest >= 0)).sum(1)
        return values


class LinearizedMetric(ReadMetric):
    """A metric's first-order expansion around reference logits: ``M(z0) + grad . (z - z0)``.

    Reads the same positions as the metric it expands. See :func:`linearized`.
    """

    def __init__(self, metric: ReadMetric, value: Tensor, read: Tensor, grad: Tensor) -> None:
        super().__init__(metric.positions, metric.width)
        self.value, self.read0, self.grad = value, read, grad

    def from_read(self, read: Tensor) -> Tensor:
        rows = read.shape[0]
        delta = read.float() - _tile(self.read0, rows, read.device)
        return _tile(self.value, rows, read.device) + (delta * _tile(self.grad, rows, read.device)).sum((1, 2))


def linearized(metric: ReadMetric, logits: Tensor) -> LinearizedMetric:
    """The first-order expansion of ``metric`` around ``logits`` (the clean run's), per example.

    Activation patching through it gives ``grad M(z_clean) . (z_clean - z_patched)`` per
    component: what attribution patching would give with the exact change of the logits. Its
    agreement with activation patching through ``metric`` measures how linear the metric is.

    Example:
        >>> z0 = torch.zeros(1, 1, 3)
        >>> lin = linearized(SetProbDiff(padded([[0]]), padded([[1]]), torch.tensor([0])), z0)
        >>> z = torch.tensor([[[1.0, 0.0, 0.0]]])
        >>> round(float(lin(z)), 4)  # dP0/dz0 - dP1/dz0 = 1/3 - 1/9 - (-1/9) = 1/3
        0.3333
    """
    with torch.no_grad():
        read = metric.gather(logits).detach().float()
    leaf = read.clone().requires_grad_(True)
    evaluator = MetricEvaluator(read.shape[0], metric=metric.from_read)
    with layer_coefficients(lambda: leaf, TensorSites(lambda out: [leaf], "the logits {}".format), evaluator) as result:
        grad = result.coefficients[0].detach()
        value = result.values.detach()
    return LinearizedMetric(metric, value, read, grad)


METRICS = ("logit-diff", "prob-diff", "logprob")
"""Metric names of task files (``--metric``)."""

__all__ = ["METRICS", "ReadMetric", "SetLogitDiff", "SetProbDiff", "DigitYearProbDiff", "AnswerLogProb",
           "LinearizedMetric", "linearized", "padded"]
