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
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._hooks import hooks_removed
from ._read_positions import read_positions

ROW_ALIGN = 8
"""Gathered rows are padded to a multiple of this before the unembedding (BLAS row blocks)."""


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


def head_rows(hidden: Tensor) -> Tuple[Tensor, int]:
    """``(n, d)`` rows padded to whole :data:`ROW_ALIGN` blocks, and ``n``."""
    count = hidden.shape[0]
    pad = -count % ROW_ALIGN
    if pad:  # whole row blocks: each row's logits do not depend on the number of rows
        hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
    return hidden, count


@contextmanager
def plain_metric_logits(forward_func: Any, evaluator: Any, head: Optional[nn.Module],
                        offset: int) -> Iterator[bool]:
    """For a plain callable metric: logits only at the positions it reads (``logit_positions``
    or found on a probe, :mod:`captum_relp._read_positions`), handed to it as ``(rows, T', V)``
    (``T' = T``, or the suffix from its first read position when the probes show it gives the
    same values there) whose other positions repeat the single read position or are NaN. Full
    logits when the positions are unknown.

    Positions found on a probe are checked in every real run (:func:`agrees_with_full_logits`):
    a metric that chooses its positions from the logit values reads other positions on real
    logits than on the probes, and then gets the full logits, in this run and every later one.
    Without gradients (activation patching) such a metric gets the full logits directly: the
    check would cost the full unembedding, and the saving is in the backward pass."""
    if head is None or evaluator.metric is None or not isinstance(getattr(head, "weight", None), Tensor):
        yield False
        return
    probed = getattr(evaluator, "logit_positions", None) is None
    state: dict = {}

    def on_model(module, args, kwargs):
        state["skip"] = bool(kwargs.get("logits_to_keep"))

    def on_head(module, args):
        hidden = args[0]
        if state.get("inner") or hidden.dim() != 3 or state.get("skip") or not hidden.shape[0]:
            return None
        if probed and (offset or not torch.is_grad_enabled() or evaluator.__dict__.get("value_dependent")):
            return None  # a suffix run (its positions could not be checked against the full logits), no
            #              backward to save (the check would cost the full head), or shown once to differ
            #              from the full logits: full logits
        weight = head.weight
        found = read_positions(evaluator, offset + hidden.shape[1], weight.shape[0], weight.dtype, weight.device)
        if found is None or found[1] < offset:  # a suffix run shows the metric no earlier position
            return None
        positions, begin = found
        local = [p - begin for p in positions]  # positions in the logits the metric is shown
        rows, index = head_rows(hidden[:, [p - offset for p in positions]].reshape(-1, hidden.shape[2]))
        state["layout"] = (hidden.shape[0], offset + hidden.shape[1] - begin, local, index)
        state["hidden"] = hidden if probed and offset == 0 else None
        return (rows,) + tuple(args[1:])

    def after_head(module, args, output):
        if state.get("inner"):
            return None
        layout, hidden = state.pop("layout", None), state.pop("hidden", None)
        if layout is None or not isinstance(output, Tensor) or not output.shape[0]:
            return None
        shown = shown_logits(output, *layout)
        if hidden is None:
            return shown
        state["inner"] = True
        try:
            full = head(hidden)
        finally:
            state["inner"] = False
        if agrees_with_full_logits(evaluator, shown, full):
            return shown
        evaluator.__dict__["value_dependent"] = True
        return full

    with hooks_removed() as handles:
        handles += [forward_func.register_forward_pre_hook(on_model, with_kwargs=True),  # type: ignore[union-attr]
                    head.register_forward_pre_hook(on_head), head.register_forward_hook(after_head)]
        yield True


__all__ = ["FULL_LOGITS_RTOL", "ROW_ALIGN", "agrees_with_full_logits", "head_rows", "plain_metric_logits",
           "shown_logits"]
