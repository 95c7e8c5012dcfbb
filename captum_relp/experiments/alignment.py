"""Align token positions of prompts with different layouts by the role each token plays.

Prompts of different templates put the same word at different positions (the IOI
templates have 15 or 16 tokens), so averaging scores position by position mixes, say,
the subject of one prompt with the ``and`` of another. :class:`RoleLayout` maps every
real position of every prompt to a role (``S1``, ``IO``, ``S2``, ``END`` ...) and
averages each role over the prompts that have it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np


@dataclass
class RoleLayout:
    """The union of the prompts' role sequences and where each prompt's tokens go.

    Attributes:
        roles: role keys in sentence order (e.g. ``["<bos>", "START:0", "START:1", "S1", ...]``).
        labels: one tick label per role: the role for slots (``S1``, ``IO``, ``END``), the
            token texts seen in that role for fixed words (``Then/When/After``, ``./,``).
        index: ``(N, T)`` int array, the role index of each position, ``-1`` at padding.

    Example:
        >>> layout = RoleLayout.from_roles([["A", "x", "B"], ["A", "B"]],
        ...                                [["a", " then", " b"], ["a", " b"]])
        >>> layout.roles, layout.index.tolist()
        (['A', 'x', 'B'], [[0, 1, 2], [0, 2, -1]])
        >>> layout.average(np.array([[[1.0, 5.0, 2.0]], [[3.0, 4.0, 0.0]]])).tolist()
        [[2.0, 5.0, 3.0]]
    """

    roles: List[str]
    labels: List[str]
    index: np.ndarray

    @classmethod
    def from_roles(cls, roles: Sequence[Sequence[str]], tokens: Sequence[Sequence[str]]) -> "RoleLayout":
        """Build the layout from each prompt's roles and token texts (same lengths).

        Raises:
            ValueError: if a prompt repeats a role, or two prompts order roles differently.
        """
        order: List[str] = []
        texts: Dict[str, List[str]] = {}
        for row_roles, row_tokens in zip(roles, tokens):
            if len(set(row_roles)) != len(row_roles):
                raise ValueError(f"a prompt repeats a role: {list(row_roles)}")
            at = 0
            for role, token in zip(row_roles, row_tokens):
                if role in order:
                    if order.index(role) < at:
                        raise ValueError(f"prompts order the roles differently at {role!r}")
                    at = order.index(role) + 1
                else:
                    order.insert(at, role)
                    at += 1
                word = token.strip() or repr(token)
                if word not in texts.setdefault(role, []):
                    texts[role].append(word)
        index = np.full((len(roles), max(len(r) for r in roles)), -1, dtype=int)
        for row, row_roles in enumerate(roles):
            index[row, : len(row_roles)] = [order.index(role) for role in row_roles]
        labels = [role if role[0].isupper() and ":" not in role else "/".join(texts[role]) for role in order]
        return cls(order, labels, index)

    def counts(self) -> List[int]:
        """How many prompts have each role."""
        return [int((self.index == r).any(1).sum()) for r in range(len(self.roles))]

    def average(self, values: np.ndarray) -> np.ndarray:
        """``(N, ..., T)`` per-prompt values -> ``(..., roles)``: each role's mean over the prompts with it."""
        values = np.asarray(values, float)
        out = np.zeros(values.shape[1:-1] + (len(self.roles),))
        for role in range(len(self.roles)):
            rows, positions = np.nonzero(self.index == role)
            if len(rows):
                out[..., role] = values[rows, ..., positions].mean(0)
        return out

    def to_json(self) -> Dict[str, object]:
        """Roles, labels, prompt counts per role and each prompt's role index (for ``ioi_results.json``)."""
        return {"roles": self.roles, "labels": self.labels, "prompts_per_role": self.counts(),
                "position_role_index": self.index.tolist()}


__all__ = ["RoleLayout"]
