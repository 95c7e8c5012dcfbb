r"""Evaluation of edge scores as circuits: faithfulness curves, CPR, CMD and PCC.

A circuit of size ``k`` keeps ``k`` edges chosen by score; every other edge is patched
with its corrupt value (exact edge patching, see :func:`~captum_relp.edges.graph_forward`).
Faithfulness

.. math:: f(C) = \frac{m(C) - m(\emptyset)}{m(M) - m(\emptyset)},

with :math:`m` the metric averaged over prompts, :math:`m(M)` the clean run and
:math:`m(\emptyset)` the run with every edge patched (the corrupt run). CPR is the area
under :math:`f` and CMD the area under :math:`|1 - f|`, by the trapezoid rule over the
fraction axis (higher CPR and lower CMD are better). Which sizes, how ``k`` is rounded and
whether CPR's circuits rank edges by signed score or by ``|score|`` is the *convention*
(:mod:`captum_relp.edges.conventions`): ``"library"`` (default) or ``"mib"``, MIB's
``evaluate_area_under_curve``. Circuits are pruned to connected graphs before they are
run (:func:`~captum_relp.edges.prune_circuit`, which does not change ``f``); ``greedy=True``
selects them with MIB's greedy search from the logits instead of by global top-k.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._hooks import frozen_model
from .._selection import top_finite
from ..metrics import MetricEvaluator
from .connected import greedy_circuit, prune_circuit
from .conventions import DEFAULT_FRACTIONS, EdgeConvention, get_convention
from .graph import ComponentGraph
from .patching import graph_forward


@dataclass
class FaithfulnessCurve:
    """Faithfulness of circuits at several sizes; CPR and CMD.

    Attributes:
        fractions: circuit sizes as fractions of all edges.
        n_edges: circuit sizes in edges (before pruning).
        faithfulness: ``f(C)`` per size, circuits of the largest ``|score|`` (CMD's curve).
        cpr: area under CPR's curve (``faithfulness_cpr``).
        cmd: area under ``|1 - f|`` of ``faithfulness``.
        m_full: metric of the full model (clean run), mean over prompts.
        m_empty: metric of the empty circuit (every edge patched: the corrupt run).
        faithfulness_cpr: the curve CPR integrates: ``faithfulness`` itself, or under
            ``convention="mib"`` the curve of the largest *signed* scores.
        n_connected: edges left in each ``|score|`` circuit after pruning: the number of edges
            MIB's ``evaluate_graph`` runs for that circuit. It is not the ``weighted_edge_counts``
            that MIB reports, which can differ at the smallest sizes (0.5-2% of the edges) by a
            few edges, because MIB's top-k selection marks nodes before pruning.
        convention: the name of the convention that built the curve.
        prompt_metrics: per-prompt metric values (``full``, ``empty``: ``(B,)``; ``abs``,
            ``cpr``: ``(sizes, B)``) for resampling, see :meth:`resample`; not in :meth:`as_dict`.

    Example:
        >>> curve = FaithfulnessCurve([0.0, 0.5, 1.0], [0, 5, 10], [0.0, 0.8, 1.0], 0.65, 0.35)
        >>> curve.as_dict()["cpr"]
        0.65
    """

    fractions: List[float]
    n_edges: List[int]
    faithfulness: List[float]
    cpr: float
    cmd: float
    m_full: float = float("nan")
    m_empty: float = float("nan")
    faithfulness_cpr: Optional[List[float]] = None
    n_connected: Optional[List[int]] = None
    convention: str = "library"
    prompt_metrics: Dict[str, Tensor] = field(default_factory=dict, repr=False)

    def as_dict(self) -> Dict[str, object]:
        """JSON-friendly dictionary."""
        return {"convention": self.convention, "fractions": self.fractions, "n_edges": self.n_edges,
                "n_connected": self.n_connected, "faithfulness": self.faithfulness,
                "faithfulness_cpr": self.faithfulness_cpr if self.faithfulness_cpr is not None
                else self.faithfulness, "cpr": self.cpr, "cmd": self.cmd,
                "m_full": self.m_full, "m_empty": self.m_empty}

    def resample(self, index: Tensor) -> Dict[str, float]:
        """CPR and CMD recomputed on the evaluation prompts ``index`` (a bootstrap resample).

        Example:
            >>> import torch
            >>> c = FaithfulnessCurve([0.0, 1.0], [0, 4], [0.0, 1.0], 0.5, 0.5, prompt_metrics={
            ...     "full": torch.tensor([2.0, 4.0]), "empty": torch.zeros(2),
            ...     "abs": torch.tensor([[0.0, 0.0], [2.0, 4.0]]), "cpr": torch.tensor([[0.0, 0.0], [2.0, 4.0]])})
            >>> c.resample(torch.tensor([1, 1]))
            {'cpr': 0.5, 'cmd': 0.5}
        """
        metrics = self.prompt_metrics
        full, empty = metrics["full"][index].mean(), metrics["empty"][index].mean()
        scale = full - empty
        f_abs = ((metrics["abs"][:, index].mean(1) - empty) / scale).tolist()
        f_cpr = ((metrics["cpr"][:, index].mean(1) - empty) / scale).tolist()
        return {"cpr": area(self.fractions, f_cpr), "cmd": area(self.fractions, [abs(1 - v) for v in f_abs])}


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid-rule area under ``values`` over ``fractions``.

    Examples::

        >>> area([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])
        0.75
    """
    x = torch.tensor(list(fractions), dtype=torch.float64)
    y = torch.tensor(list(values), dtype=torch.float64)
    return float(torch.trapezoid(y, x))


def top_edges(scores: Tensor, graph: ComponentGraph, k: int, absolute: bool = True) -> Tensor:
    """Bool ``(U, V)`` mask of the ``k`` edges with the largest ``|score|`` (``absolute=False``:
    the largest signed score). Ties keep the earlier edge of ``graph.edges()``.

    Only edges with a finite score are chosen: a ``nan`` edge (one a method did not score,
    e.g. outside ``exact_edge_scores(edges=...)``) is never a top edge. ``k`` larger than the
    graph means every edge.

    Raises:
        ValueError: if ``k`` exceeds the number of edges with a finite score; the message
            says how many edges are unscored.

    Examples::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> g = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=9)))
        >>> s = torch.zeros(g.edge_mask.shape); s[0, 3] = -5.0; s[0, 4] = 1.0
        >>> top_edges(s, g, 1).nonzero().tolist(), top_edges(s, g, 1, absolute=False).nonzero().tolist()
        ([[0, 3]], [[0, 4]])
        >>> s[0, 3] = float("nan")  # not scored: never chosen
        >>> top_edges(s, g, 1).nonzero().tolist()
        [[0, 4]]
    """
    edge_mask = graph.edge_mask.to(scores.device)
    values = scores.abs() if absolute else scores
    keep = torch.zeros(edge_mask.numel(), dtype=torch.bool, device=scores.device)
    keep[top_finite(values, min(max(k, 0), graph.n_edges), "edges", eligible=edge_mask)] = True
    return keep.reshape(edge_mask.shape) & edge_mask


def _circuit(scores: Tensor, graph: ComponentGraph, k: int, absolute: bool, greedy: bool) -> Tensor:
    if greedy:
        return greedy_circuit(scores, graph, k, absolute)
    return prune_circuit(top_edges(scores, graph, k, absolute), graph)


def _check_fractions(fractions: Sequence[float]) -> List[float]:
    fractions = [float(f) for f in fractions]
    if (any(f != f for f in fractions) or len(fractions) < 2 or sorted(set(fractions)) != fractions or fractions[0] < 0.0
            or fractions[-1] != 1.0):
        raise ValueError(f"fractions must increase strictly within [0, 1] and end at 1, got {fractions}")
    return fractions


def faithfulness_curve(
    model: nn.Module,
    graph: ComponentGraph,
    scores: Tensor,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Callable[[Tensor], Tensor],
    attention_mask: Optional[Tensor] = None,
    fractions: Optional[Sequence[float]] = None,
    convention: Union[str, EdgeConvention] = "library",
    greedy: bool = False,
) -> FaithfulnessCurve:
    """Faithfulness of circuits chosen by ``scores``; CPR and CMD.

    Args:
        model (nn.Module): the model.
        graph (ComponentGraph): its graph (``build_graph(model, ungroup_kv=True)`` for ``"mib"``
            on grouped-query models).
        scores (Tensor): ``(U, V)`` edge scores (``EdgeScores.scores``).
        clean_ids, corrupt_ids (Tensor): ``(B, T)`` prompts.
        metric (callable): ``metric(logits) -> Tensor[B]``.
        attention_mask (Tensor, optional): ``(B, T)``.
        fractions (sequence of float, optional): sizes, increasing in ``[0, 1]`` and ending at 1;
            default: the convention's.
        convention (str or EdgeConvention): ``"library"`` or ``"mib"`` (sizes, rounding, signed CPR).
        greedy (bool): MIB's greedy connected selection instead of global top-k.

    Returns:
        FaithfulnessCurve: ``f`` per size, CPR and CMD.

    Examples::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph, faithfulness_curve
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)).eval()
        >>> g = build_graph(model)
        >>> clean, corrupt = torch.randint(20, (3, 4)), torch.randint(20, (3, 4))
        >>> metric = lambda logits: logits[:, -1, 1] - logits[:, -1, 2]
        >>> curve = faithfulness_curve(model, g, torch.rand(g.edge_mask.shape), clean, corrupt, metric)
        >>> abs(round(curve.faithfulness[0], 6)), round(curve.faithfulness[-1], 6)
        (0.0, 1.0)
        >>> faithfulness_curve(model, g, torch.rand(g.edge_mask.shape), clean, corrupt, metric,
        ...                    convention="mib").n_edges[-4:]  # int(p * 13) at p = .1, .2, .5, 1
        [1, 2, 6, 13]
    """
    if scores.isnan().any():
        raise ValueError("scores has nan entries (edges without a score, e.g. exact_edge_scores(edges=...)): "
                         "circuits need a score for every edge")
    convention = get_convention(convention)
    fractions = _check_fractions(convention.fractions if fractions is None else fractions)
    cache: Dict[bytes, Tensor] = {}
    evaluate = MetricEvaluator(clean_ids.shape[0], metric=metric)  # one finite value per prompt
    with frozen_model(model), torch.no_grad():
        corrupt = graph_forward(model, graph, corrupt_ids, attention_mask)
        clean = graph_forward(model, graph, clean_ids, attention_mask)
        empty = evaluate(corrupt.logits).double()
        full = evaluate(clean.logits).double()

        def run(keep: Tensor) -> Tensor:  # per-prompt metric of a circuit (runs shared between curves)
            key = keep.cpu().numpy().tobytes()
            if key not in cache:
                if bool(keep.sum() == 0):
                    cache[key] = empty
                elif torch.equal(keep, graph.edge_mask.to(keep.device)):
                    cache[key] = full
                else:
                    patch = (graph.edge_mask.to(keep.device) & ~keep).to(clean.outputs.dtype)
                    patched = graph_forward(model, graph, clean_ids, attention_mask, patch=patch,
                                            corrupt_outputs=corrupt.outputs)
                    cache[key] = evaluate(patched.logits).double()
            return cache[key]

        sizes = [convention.circuit_size(fraction, graph.n_edges) for fraction in fractions]
        circuits = [_circuit(scores, graph, k, True, greedy) for k in sizes]
        by_abs = torch.stack([run(keep) for keep in circuits])
        by_cpr = by_abs
        if convention.cpr_signed:
            by_cpr = torch.stack([run(_circuit(scores, graph, k, False, greedy)) for k in sizes])
    metrics = {"full": full.cpu(), "empty": empty.cpu(), "abs": by_abs.cpu(), "cpr": by_cpr.cpu()}
    m_full, m_empty = full.mean().item(), empty.mean().item()
    scale = m_full - m_empty
    values = ((by_abs.mean(1) - m_empty) / scale).tolist() if scale != 0 else [float("nan")] * len(sizes)
    values_cpr = ((by_cpr.mean(1) - m_empty) / scale).tolist() if scale != 0 else values
    return FaithfulnessCurve(fractions, sizes, values, area(fractions, values_cpr),
                             area(fractions, [abs(1 - v) for v in values]), m_full, m_empty,
                             faithfulness_cpr=values_cpr, n_connected=[int(c.sum()) for c in circuits],
                             convention=convention.name, prompt_metrics=metrics)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two vectors (``nan`` if one is constant).

    Raises:
        ValueError: if an entry is ``nan``, e.g. an edge that ``exact_edge_scores(edges=...)``
            did not score: correlate the scored edges only (``EdgeScores.scored_vector``).

    Examples::

        >>> round(pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])), 4)
        0.9934
    """
    a, b = a.double().flatten(), b.double().flatten()
    if a.isnan().any() or b.isnan().any():
        raise ValueError("pearson got nan entries (edges without a score?): select the scored edges first, "
                         "e.g. vector[result.scored_vector(graph)]")
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denominator) if denominator > 0 else float("nan")


__all__ = ["DEFAULT_FRACTIONS", "FaithfulnessCurve", "area", "top_edges", "faithfulness_curve", "pearson"]
