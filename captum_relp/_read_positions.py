"""Which logit positions a plain metric reads: given (``logit_positions=``) or found on a probe.

A plain callable such as ``lambda logits: logits[:, -1, 5] - logits[:, -1, 7]`` reads one
position of the ``(B, T, V)`` logits, but nothing declares it. :func:`read_positions`
finds the positions by evaluating the metric on cheap probes: ``(B, T, V)`` views of a
``(T,)`` tensor of distinct finite values (one value per position, expanded over rows and
vocabulary, so a probe costs ``T`` numbers). Marking a group of positions with NaN and
comparing the metric's values bitwise with the unmarked probe tells whether the metric
reads any of them; groups that change are split until single positions remain
(``O(k log T)`` evaluations for ``k`` read positions). The result is then verified: with
every other position set to NaN, +inf, -inf and to other finite values, the metric must
return exactly the same values. Anything else (the metric raises on a probe, returns
non-finite values, changes under a verification probe, reads every position, reads none,
or needs more than ``PROBES_PER_LEVEL * (log2(T) + 1)`` evaluations) gives ``None``: the full logits are
computed. Positions the metric chooses from the logit *values* cannot be found this way, so
positions found here are checked against the full logits in every real run
(:mod:`captum_relp._plain_logits`); a metric that fails the check gets the full logits.

An explicit ``logit_positions`` is checked with the same verification probes and raises a
``ValueError`` naming the argument when the metric reads elsewhere.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

PROBES_PER_LEVEL = 8
"""A search takes at most ``PROBES_PER_LEVEL * (log2(T) + 1)`` evaluations, else full logits."""


def normalize_positions(positions: Any, length: int) -> Tuple[int, ...]:
    """``logit_positions`` as sorted distinct indices in ``[0, length)``.

    Raises:
        ValueError: naming ``logit_positions`` for non-integers or out-of-range indices.

    Example:
        >>> normalize_positions([-1, 3, 3], 8)
        (3, 7)
    """
    values = positions.tolist() if isinstance(positions, Tensor) else positions
    values = [values] if isinstance(values, int) else list(values)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"logit_positions must be a non-empty list of int positions, got {positions!r}")
    bad = [v for v in values if not -length <= v < length]
    if bad:
        raise ValueError(f"logit_positions {bad} are outside a sequence of {length} positions "
                         f"(valid: {-length} ... {length - 1})")
    return tuple(sorted({v % length for v in values}))

FILLS = (math.nan, math.inf, -math.inf, -3.5, 1e4)
"""Values put at the positions a metric must not read, when checking that it does not."""


def _probe(values: Tensor, rows: int, vocab: int) -> Tensor:
    return values.view(1, -1, 1).expand(rows, values.shape[0], vocab)


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


class _Prober:
    """Evaluates ``metric`` on probes of ``rows x length x vocab``; ``None`` when it raises."""

    def __init__(self, metric: Callable, rows: int, length: int, vocab: int, dtype, device) -> None:
        self.metric, self.rows, self.vocab, self.calls = metric, rows, vocab, 0
        self.base = torch.linspace(0.25, 0.75, length, dtype=dtype, device=device)
        self.reference = self(self.base)

    def __call__(self, values: Tensor) -> Optional[Tensor]:
        self.calls += 1
        try:
            with torch.no_grad():
                out = self.metric(_probe(values, self.rows, self.vocab))
        except Exception:  # noqa: BLE001  (a probe the metric cannot take: no conclusion)
            return None
        if not isinstance(out, Tensor) or out.shape != (self.rows,):
            return None
        return out.detach().clone()

    def marked(self, positions: Sequence[int], fill: float) -> Tensor:
        values = self.base.clone()
        values[list(positions)] = fill
        return values

    def unchanged(self, positions: Sequence[int], fill: float) -> bool:
        out = self(self.marked(positions, fill))
        return out is not None and _same(out, self.reference)

    def same_on_suffix(self, positions: Sequence[int]) -> bool:
        """The metric gives the same values on the last ``T - min(positions)`` positions alone."""
        others = sorted(set(range(self.base.shape[0])) - set(positions))
        start = min(positions)
        probes = [self.base] + [self.marked(others, fill) for fill in FILLS if others]
        probes += [self.marked([p], fill) for p in positions for fill in (math.nan, 1e4)]
        for values in probes:
            full, suffix = self(values), self(values[start:])
            if full is None or suffix is None or not _same(full, suffix):
                return False
        return True

    def verified(self, positions: Sequence[int]) -> bool:
        """The metric's values do not move when every position outside ``positions`` changes."""
        others = sorted(set(range(self.base.shape[0])) - set(positions))
        if not others:
            return True
        return all(self.unchanged(others, fill) for fill in FILLS)


def search_positions(metric: Callable, rows: int, length: int, vocab: int, dtype=torch.float32,
                     device=None) -> Optional[Tuple[int, ...]]:
    """The positions ``metric`` reads, found on probes (module docstring); ``None``: unknown.

    Example:
        >>> search_positions(lambda logits: logits[:, -1, 2] - logits[:, 3, 1], 2, 8, 5)
        (3, 7)
        >>> search_positions(lambda logits: logits.mean((1, 2)), 2, 8, 5) is None  # every position
        True
    """
    prober = _Prober(metric, rows, length, vocab, dtype, device)
    if prober.reference is None or not bool(torch.isfinite(prober.reference).all()):
        return None
    read: List[int] = []
    groups, limit = [list(range(length))], PROBES_PER_LEVEL * (math.ceil(math.log2(max(length, 2))) + 1)
    while groups:
        group = groups.pop()
        if prober.calls > limit:
            return None
        if prober.unchanged(group, math.nan):
            continue
        if len(group) == 1:
            read.append(group[0])
        else:
            groups += [group[: len(group) // 2], group[len(group) // 2:]]
    if not read or len(read) == length or not prober.verified(read):
        return None
    return tuple(sorted(read))


def check_positions(metric: Callable, positions: Tuple[int, ...], rows: int, length: int, vocab: int,
                    dtype=torch.float32, device=None, given: Any = None) -> None:
    """Raise a ``ValueError`` naming ``logit_positions`` when ``metric`` reads other positions.

    Example:
        >>> check_positions(lambda logits: logits[:, 2, 0], (1,), 2, 4, 3)
        Traceback (most recent call last):
        ...
        ValueError: logit_positions=(1,) but the metric reads other positions of the (2, 4, 3) logits: its values change when positions outside logit_positions change (pass the positions it reads, or leave logit_positions out)
    """
    prober = _Prober(metric, rows, length, vocab, dtype, device)
    if prober.reference is not None and prober.verified(positions):
        return
    raise ValueError(
        f"logit_positions={positions if given is None else given!r} but the metric reads other positions of the "
        f"{(rows, length, vocab)} logits: its values change when positions outside logit_positions "
        "change (pass the positions it reads, or leave logit_positions out)"
    )


def read_positions(evaluator: Any, length: int, vocab: int, dtype,
                   device) -> Optional[Tuple[Tuple[int, ...], int]]:
    """The positions a plain metric of ``evaluator`` reads at sequence length ``length``, and
    the first position it must be shown, cached on the evaluator; ``None``: unknown.

    The positions are its ``logit_positions`` (checked) or :func:`search_positions`. When the
    metric gives bitwise the same values on the logits from its first read position on (it
    indexes from the end, as ``logits[:, -1]`` does; checked on the probes), only that suffix is
    shown to it, so its backward pass allocates ``(rows, T - start, V)`` instead of
    ``(rows, T, V)``; otherwise ``start`` is 0.

    Example:
        >>> from captum_relp.metrics import MetricEvaluator
        >>> read_positions(MetricEvaluator(2, metric=lambda l: l[:, -1, 0]), 6, 3, torch.float32, None)
        ((5,), 5)
        >>> read_positions(MetricEvaluator(2, metric=lambda l: l[:, 4, 0]), 6, 3, torch.float32, None)
        ((4,), 0)
    """
    cache: Dict[int, Any] = evaluator.__dict__.setdefault("_read_positions", {})
    if length not in cache:
        rows, explicit = evaluator.batch_size, getattr(evaluator, "logit_positions", None)
        if explicit is not None:
            positions: Optional[Tuple[int, ...]] = normalize_positions(explicit, length)
            check_positions(evaluator.metric, positions, rows, length, vocab, dtype, device, explicit)
        else:
            positions = search_positions(evaluator.metric, rows, length, vocab, dtype, device)
        if positions is None:
            cache[length] = None
        else:
            prober = _Prober(evaluator.metric, rows, length, vocab, dtype, device)
            cache[length] = (positions, positions[0] if prober.same_on_suffix(positions) else 0)
    return cache[length]
