"""The scores calibration chooses from: AP and every candidate's RelP scores, by group."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..rules import RuleSet
from ._schema import model_signature
from ._select import GroupData, group_data


@dataclass
class CandidateScores:
    """AP and every candidate's RelP scores on the calibration pairs, by group (one row per pair).

    Computed once by :func:`~captum_relp.calibration.score_candidates` (or built from scores
    measured elsewhere with :meth:`from_layer_scores`);
    :func:`~captum_relp.calibration.choose_rules` picks the rules from it, so a study of the
    calibration size can choose on subsets (:meth:`rows`) without rerunning AP.
    """

    candidates: List[RuleSet]
    groups: List[str]
    auto_groups: bool
    data: Dict[str, GroupData]
    tolerance: float
    model: Optional[Dict[str, Any]] = None
    cost: Dict[str, Any] = field(default_factory=dict)
    """How the candidates were scored (``scoring``: ``"shared"`` for one forward pass and one backward
    pass per candidate) and the seconds AP and the candidates took."""

    @property
    def n_examples(self) -> int:
        """Number of calibration pairs."""
        return int(next(iter(self.data.values())).reference.shape[0])

    def rows(self, index: Any) -> "CandidateScores":
        """The scores of the calibration pairs ``index`` only."""
        index = torch.as_tensor(index)
        return replace(self, data={g: d.rows(index) for g, d in self.data.items()})

    @classmethod
    def from_layer_scores(cls, candidates: Sequence[RuleSet], reference: Sequence[Any],
                          scores: Dict[str, Sequence[Any]], groups: Sequence[str], *, tolerance: float = 0.0,
                          model: Optional[nn.Module] = None, auto_groups: bool = False) -> "CandidateScores":
        """Scores measured elsewhere (e.g. saved per-pair scores), to choose rules from.

        The result is what :func:`~captum_relp.calibration.score_candidates` returns, for
        :func:`~captum_relp.calibration.choose_rules`.

        Args:
            candidates: the candidate rule sets (distinct names), in order.
            reference: AP's scores, one ``(n_examples, ...)`` tensor or array per layer.
            scores: ``{candidate name: one tensor or array per layer}``, each of the shape of
                that layer's ``reference``; every candidate needs its scores.
            groups: the group of every layer, e.g. ``resid``/``attn``/``mlp``.
            tolerance: AP effects of at most this size are rounding (no effect).
            model: the scored model: its signature is recorded, and the chosen rules refuse a
                model with other module types.
            auto_groups: the groups are the layers' component kinds
                (:func:`~captum_relp.calibration.infer_groups`), so the chosen rules map layers to
                groups by kind rather than by position.

        Returns:
            CandidateScores

        Example:
            >>> import torch
            >>> from captum_relp import RuleSet
            >>> from captum_relp.calibration import choose_rules
            >>> ap = [torch.arange(1., 21.).reshape(10, 2)]
            >>> noisy = [ap[0] + torch.randn(10, 2)]
            >>> candidates = [RuleSet("gradient", categories=()), RuleSet("exact")]
            >>> scores = CandidateScores.from_layer_scores(candidates, ap, {"gradient": noisy, "exact": ap},
            ...                                            ["mlp"])
            >>> scores.n_examples, choose_rules(scores, default="gradient", n_bootstrap=200).choices
            (10, {'mlp': 'exact'})
        """
        candidates = list(candidates)
        names = [c.name for c in candidates]
        if not candidates or len(set(names)) != len(names):
            raise ValueError(f"candidates must be a non-empty list of RuleSets with distinct names, got {names}")
        reference = [torch.as_tensor(r) for r in reference]
        shapes = [tuple(r.shape) for r in reference]
        if not reference or len(groups) != len(reference):
            raise ValueError(f"groups has {len(groups)} labels for {len(reference)} layers of reference "
                             "(one label per layer, at least one layer)")
        if any(len(shape) == 0 for shape in shapes) or len({shape[0] for shape in shapes}) != 1:
            raise ValueError(f"reference layers must share their first dimension (the pairs), got shapes {shapes}")
        if sorted(scores) != sorted(names):
            raise ValueError(f"scores must hold exactly the candidates {names}, got {list(scores)}")
        per_candidate = {name: [torch.as_tensor(s) for s in scores[name]] for name in names}
        for name, layers in per_candidate.items():
            if [tuple(s.shape) for s in layers] != shapes:
                raise ValueError(f"scores[{name!r}] has layers of shapes {[tuple(s.shape) for s in layers]}, "
                                 f"the reference {shapes}")
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
        groups = [str(g) for g in groups]
        return cls(candidates, groups, bool(auto_groups), group_data(reference, per_candidate, groups),
                   float(tolerance), model_signature(model))
