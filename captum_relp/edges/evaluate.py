r"""MIB-style evaluation of edge scores: faithfulness curves, CPR, CMD and PCC.

A circuit of size ``k`` keeps the ``k`` edges with the largest ``|score|``; every
other edge is patched with its corrupt value (exact edge patching, see
:func:`~captum_relp.edges.graph_forward`). Faithfulness

.. math:: f(C) = \frac{m(C) - m(\emptyset)}{m(M) - m(\emptyset)},

with :math:`m` the metric averaged over prompts, :math:`m(M)` the clean run and
:math:`m(\emptyset)` the run with every edge patched (the corrupt run).
Sizes are fractions of all edges, :data:`DEFAULT_FRACTIONS` (MIB's grid plus
0.3/0.7/0.9), ``k = round(fraction * n_edges)``. CPR is the area under
:math:`f` and CMD the area under :math:`|1 - f|`, both by the trapezoid rule
over the fraction axis in ``[0, 1]`` (higher CPR and lower CMD are better).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .._hooks import frozen_model
from ..metrics import MetricEvaluator
from .graph import ComponentGraph
from .patching import graph_forward

DEFAULT_FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


@dataclass
class FaithfulnessCurve:
    """Faithfulness of top-``|score|`` circuits at several sizes.

    Attributes:
        fractions: circuit sizes as fractions of all edges.
        n_edges: circuit sizes in edges.
        faithfulness: ``f(C)`` per size.
        cpr: area under ``f`` (trapezoid over fractions).
        cmd: area under ``|1 - f|``.
        m_full: metric of the full model (clean run), mean over prompts.
        m_empty: metric of the empty circuit (every edge patched: the corrupt run).

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

    def as_dict(self) -> Dict[str, object]:
        """JSON-friendly dictionary."""
        return {"fractions": self.fractions, "n_edges": self.n_edges,
                "faithfulness": self.faithfulness, "cpr": self.cpr, "cmd": self.cmd,
                "m_full": self.m_full, "m_empty": self.m_empty}


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid-rule area under ``values`` over ``fractions``.

    Examples::

        >>> area([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])
        0.75
    """
    x = torch.tensor(list(fractions), dtype=torch.float64)
    y = torch.tensor(list(values), dtype=torch.float64)
    return float(torch.trapezoid(y, x))


def top_edges(scores: Tensor, graph: ComponentGraph, k: int) -> Tensor:
    """Bool ``(U, V)`` mask of the ``k`` edges with the largest ``|score|``.

    Examples::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> g = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=9)))
        >>> s = torch.zeros(g.edge_mask.shape); s[0, 3] = -5.0
        >>> top_edges(s, g, 1).nonzero().tolist()
        [[0, 3]]
    """
    edge_mask = graph.edge_mask.to(scores.device)
    magnitude = scores.abs().double().masked_fill(~edge_mask, -1.0).flatten()
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(magnitude, min(k, graph.n_edges)).indices] = True
    return keep.reshape(edge_mask.shape) & edge_mask


def faithfulness_curve(
    model: nn.Module,
    graph: ComponentGraph,
    scores: Tensor,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Callable[[Tensor], Tensor],
    attention_mask: Optional[Tensor] = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> FaithfulnessCurve:
    """Faithfulness of top-``|score|`` circuits; CPR and CMD.

    Args:
        model (nn.Module): the model.
        graph (ComponentGraph): its graph.
        scores (Tensor): ``(U, V)`` edge scores (``EdgeScores.scores``).
        clean_ids, corrupt_ids (Tensor): ``(B, T)`` prompts.
        metric (callable): ``metric(logits) -> Tensor[B]``.
        attention_mask (Tensor, optional): ``(B, T)``.
        fractions (sequence of float): sizes in ``[0, 1]``, increasing, starting at 0 and ending at 1.

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
    """
    fractions = [float(f) for f in fractions]
    if fractions[0] != 0.0 or fractions[-1] != 1.0 or sorted(fractions) != fractions:
        raise ValueError(f"fractions must increase from 0 to 1, got {fractions}")
    values, sizes = [], []
    evaluate = MetricEvaluator(clean_ids.shape[0], metric=metric)  # one finite value per prompt
    with frozen_model(model), torch.no_grad():
        corrupt = graph_forward(model, graph, corrupt_ids, attention_mask)
        clean = graph_forward(model, graph, clean_ids, attention_mask)
        m_empty = evaluate(corrupt.logits).double().mean().item()
        m_full = evaluate(clean.logits).double().mean().item()
        scale = m_full - m_empty
        for fraction in fractions:
            k = int(round(fraction * graph.n_edges))
            if k == graph.n_edges:
                value = m_full
            elif k == 0:
                value = m_empty
            else:
                patch = (graph.edge_mask & ~top_edges(scores, graph, k)).to(clean.outputs.dtype)
                run = graph_forward(model, graph, clean_ids, attention_mask, patch=patch,
                                    corrupt_outputs=corrupt.outputs)
                value = evaluate(run.logits).double().mean().item()
            values.append((value - m_empty) / scale if scale != 0 else float("nan"))
            sizes.append(k)
    return FaithfulnessCurve(fractions, sizes, values, area(fractions, values),
                             area(fractions, [abs(1 - v) for v in values]), m_full, m_empty)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two vectors (``nan`` if one is constant).

    Examples::

        >>> round(pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])), 4)
        0.9934
    """
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denominator) if denominator > 0 else float("nan")


__all__ = ["DEFAULT_FRACTIONS", "FaithfulnessCurve", "area", "top_edges", "faithfulness_curve", "pearson"]
