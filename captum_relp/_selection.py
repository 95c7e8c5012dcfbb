"""Choosing the largest scores among the finite ones.

A ``nan`` score marks an entry a method did not score (e.g. an edge outside
``exact_edge_scores(edges=...)``), an infinite one a broken run: neither may be chosen as
a top entry. The helpers here choose among the finite scores only, and raise a
``ValueError`` that says how many entries are unscored when too few are finite.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def finite_among(values: Tensor, eligible: Optional[Tensor] = None) -> Tensor:
    """Bool mask (``values``' shape): finite entries, restricted to ``eligible`` when given.

    Example:
        >>> finite_among(torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([True, True, False])).tolist()
        [True, False, False]
    """
    finite = torch.isfinite(values)
    return finite if eligible is None else finite & eligible.to(values.device)


def check_finite_count(finite: Tensor, k: int, what: str, total: Optional[int] = None) -> None:
    """Raise a ``ValueError`` if fewer than ``k`` entries are finite.

    Args:
        finite (Tensor): bool mask of the entries with a finite score (:func:`finite_among`).
        k (int): how many entries are to be chosen.
        what (str): the plural noun of the entries (``"edges"``, ``"nodes"``).
        total (int, optional): how many entries there are (default: ``finite.numel()``).

    Example:
        >>> check_finite_count(torch.tensor([True, False, True]), 3, "edges")
        Traceback (most recent call last):
        ...
        ValueError: cannot choose the top 3 edges: 1 of the 3 edges are unscored (nan) or infinite, and only the 2 finite ones can be chosen; choose at most 2, or score every one
    """
    total = finite.numel() if total is None else total
    n_finite = int(finite.sum())
    if k > n_finite:
        raise ValueError(
            f"cannot choose the top {k} {what}: {total - n_finite} of the {total} {what} are unscored (nan) or "
            f"infinite, and only the {n_finite} finite ones can be chosen; choose at most {n_finite}, "
            "or score every one")


def top_finite(values: Tensor, k: int, what: str, eligible: Optional[Tensor] = None) -> Tensor:
    """Flat indices of the ``k`` largest finite entries of ``values``, largest first.

    Ties keep the earlier entry. Entries outside ``eligible`` are never chosen and not counted.

    Args:
        values (Tensor): scores, any shape (flattened).
        k (int): how many to choose.
        what (str): the plural noun of the entries, for the error message.
        eligible (Tensor, optional): bool mask of the entries that may be chosen.

    Returns:
        Tensor: ``(k,)`` long indices into ``values.flatten()``.

    Raises:
        ValueError: if fewer than ``k`` eligible entries are finite (the message says how many
            are unscored).

    Example:
        >>> top_finite(torch.tensor([float("nan"), 1.0, 3.0, 2.0]), 2, "edges").tolist()
        [2, 3]
    """
    flat = values.flatten()
    eligible = None if eligible is None else eligible.flatten()
    finite = finite_among(flat, eligible)
    check_finite_count(finite, k, what, flat.numel() if eligible is None else int(eligible.sum()))
    masked = flat.double().masked_fill(~finite, float("-inf"))
    return torch.sort(masked, descending=True, stable=True).indices[:max(k, 0)]


__all__ = ["finite_among", "check_finite_count", "top_finite"]
