r"""Edge scores for every edge of a component graph at attribution-patching cost.

For an edge :math:`u \to v` the score estimates the effect of patching it,
:math:`m(x_{clean}) - m(x_{clean} \mid u \to v \text{ patched})`, by

.. math:: s(u \to v) = \sum_t (a_u(x_{clean}) - a_u(x_{corrupt}))_t \cdot \rho(x_v)_t,

averaged over prompts, where :math:`a_u` is the output of node ``u`` and
:math:`\rho(x_v)` the coefficient of ``v``'s input: the LRP propagation coefficient
for RelP (rules ``relp``, ``relp-ah``) or the gradient for EAP. The product is
computed as one contraction of the ``(B, T, U, d)`` node differences with the
``(B, T, V, d)`` input coefficients, so no per-edge activation is materialised:
one clean forward, one corrupt forward and one backward pass score all edges.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch
from torch import Tensor, nn

from .._coefficients import TensorSites, layer_coefficients
from .._hooks import frozen_model
from ..calibration.calibrated_rules import CalibratedRules, explicit_ruleset
from ..integrations.distributed import DataParallelSweep
from ..metrics import MetricEvaluator
from ..rules import RuleSet, resolve_rules
from .graph import ComponentGraph, edge_subset
from .patching import graph_forward

METHODS = ("relp", "relp-ah", "relp-ah-qk", "relp-ah+qk", "eap", "eap-ig", "exact")
_RULES = {"relp": "relp", "relp-ah": "relp-ah", "relp-ah-qk": "relp-ah", "relp-ah+qk": "relp-ah", "eap": "none"}
Metric = Callable[[Tensor], Tensor]


@dataclass
class EdgeScores:
    """Scores of all edges of a graph.

    Attributes:
        method: one of :data:`METHODS` (``relp``, ``relp-ah``, ``relp-ah-qk``, ``relp-ah+qk``,
            ``eap``, ``eap-ig``, ``exact``).
        scores: ``(U, V)`` scores (``(T, U, V)`` per position), mean over prompts;
            zero where ``graph.edge_mask`` has no edge.
        n_forward: forward passes over the prompt batch (``exact``: batched runs of
            several patched copies count once each).
        n_backward: backward passes.
        seconds: wall time.
        scored: ``(U, V)`` bool, the edges that have a score, or ``None`` for every edge of
            the graph. :func:`exact_edge_scores` with ``edges=`` scores a subset: the other
            edges hold ``nan`` (not zero, which would read as "no effect"), and
            ``captum_relp.edges.pearson`` refuses them; select with :meth:`scored_vector`.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> graph = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))
        >>> result = EdgeScores("eap", torch.ones(graph.edge_mask.shape), 2, 1, 0.0)
        >>> int(result.edge_vector(graph).numel()) == graph.n_edges
        True
    """

    method: str
    scores: Tensor
    n_forward: int
    n_backward: int
    seconds: float
    scored: Optional[Tensor] = None

    def edge_vector(self, graph: ComponentGraph) -> Tensor:
        """Scores of the edges in ``graph.edges()`` order (summed over positions; ``nan`` where not scored)."""
        scores = self.scores.sum(0) if self.scores.dim() == 3 else self.scores
        return scores[graph.edge_mask.to(scores.device)]

    def scored_vector(self, graph: ComponentGraph) -> Tensor:
        """``(n_edges,)`` bool in ``graph.edges()`` order: True where the edge has a score.

        Example:
            >>> import torch
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> from captum_relp.edges import build_graph, exact_edge_scores
            >>> from captum_relp.metrics import LogitDiff
            >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)).eval()
            >>> g = build_graph(model)
            >>> clean, corrupt = torch.randint(20, (2, 4)), torch.randint(20, (2, 4))
            >>> some = exact_edge_scores(model, g, clean, corrupt, LogitDiff(1, 2), edges=torch.tensor([0, 5]))
            >>> some.scored_vector(g).nonzero().flatten().tolist()
            [0, 5]
        """
        if self.scored is None:
            return torch.ones(graph.n_edges, dtype=torch.bool)
        return self.scored.cpu()[graph.edge_mask.cpu()]


def _contract(delta: Tensor, coefficients: Tensor, per_position: bool) -> Tensor:
    equation = "btud,btvd->tuv" if per_position else "btud,btvd->uv"
    return torch.einsum(equation, delta, coefficients) / delta.shape[0]


def _coefficients(model, graph, ids, metric, attention_mask, ruleset: Optional[RuleSet], strict: bool = True,
                  input_embeds: Optional[Tensor] = None, qk_local: bool = False):
    """Node outputs and the downstream-input coefficients ``(B, T, V, d)`` of one pass
    (``qk_local``: ``graph_forward(ah="qk-local")``)."""
    ah = "qk-local" if qk_local else ruleset is not None and ruleset.attention is not None
    with layer_coefficients(
        lambda: graph_forward(model, graph, ids, attention_mask, input_embeds=input_embeds, ah=ah),
        TensorSites(lambda run: run.inputs, "downstream input block {} of the component graph".format),
        MetricEvaluator(ids.shape[0], metric=metric), ruleset, model=model, strict=strict,
    ) as result:
        return result.output.outputs.detach(), torch.cat(result.coefficients, dim=2)


def _masked(scores: Tensor, graph: ComponentGraph) -> Tensor:
    return scores * graph.edge_mask.to(scores.device, scores.dtype)


def edge_scores(
    model: nn.Module,
    graph: ComponentGraph,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Metric,
    attention_mask: Optional[Tensor] = None,
    method: str = "relp",
    rules: Union[str, RuleSet, CalibratedRules, None] = None,
    per_position: bool = False,
    n_steps: int = 5,
    strict: bool = True,
    ig_grid: str = "right",
) -> EdgeScores:
    r"""Score every edge with RelP, RelP-AH (also with q/k edges), EAP or EAP-IG-inputs.

    Args:
        model (nn.Module): a supported Hugging Face causal LM.
        graph (ComponentGraph): ``build_graph(model)``.
        clean_ids (Tensor): ``(B, T)`` clean prompts.
        corrupt_ids (Tensor): ``(B, T)`` corrupt prompts, aligned with ``clean_ids``.
        metric (callable): ``metric(logits) -> Tensor[B]``, e.g. ``IOIBatch.metric()``.
        attention_mask (Tensor, optional): ``(B, T)`` mask shared by both runs.
        method (str): ``"relp"`` (rules ``relp``), ``"relp-ah"``, ``"relp-ah-qk"``,
            ``"relp-ah+qk"``, ``"eap"`` (gradients) or ``"eap-ig"`` (integrated gradients over
            the input embeddings between corrupt and clean, ``n_steps`` Riemann steps, see
            ``ig_grid``). ``relp-ah`` gives query and key edges zero scores (the AH-rule holds
            the attention pattern constant). ``relp-ah-qk`` scores them in the same single
            pass: each head's query and key inputs get the local pattern gradient, driven by
            the RelP-AH coefficient of the head's output, and the residual stream keeps
            RelP-AH's coefficients (``graph_forward(ah="qk-local")``); all non-q/k edges
            score as with ``relp-ah``. ``relp-ah+qk`` takes the q/k edges from a second,
            full ``relp`` pass (two backward passes; equal to ``relp-ah-qk`` in the last
            layer, where no later attention pattern exists).
            Use :func:`exact_edge_scores` for exact patching.
        rules (str, RuleSet or CalibratedRules, optional): overrides the rule set of
            ``relp``/``relp-ah``/``relp-ah-qk`` (``"none"`` gives EAP). With
            :class:`~captum_relp.CalibratedRules` (calibrated per component kind), the edges
            out of each upstream node use the rule set chosen for its kind (the input
            embeddings: ``resid``), one forward and backward pass per distinct rule set.
        per_position (bool): return ``(T, U, V)`` scores instead of summing positions.
        n_steps (int): integration steps of ``eap-ig``.
        strict (bool): as in :func:`~captum_relp.rules.apply_rules`.
        ig_grid (str): ``eap-ig``'s interpolation points ``alpha = k / n_steps``:
            ``"right"`` ``k = 1 .. n_steps`` (the paper's, and EAP-IG's before 2025) or
            ``"left"`` ``k = 0 .. n_steps - 1`` (current EAP-IG and the version MIB pins).

    Returns:
        EdgeScores: scores and pass counts (2 forwards, 1 backward except ``eap-ig``:
        ``n_steps + 1`` forwards (``"left"``: ``n_steps + 2``, the clean run is extra),
        ``n_steps`` backwards).

    Examples::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph, edge_scores
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)).eval()
        >>> clean, corrupt = torch.randint(50, (2, 5)), torch.randint(50, (2, 5))
        >>> metric = lambda logits: logits[:, -1, 1] - logits[:, -1, 2]
        >>> result = edge_scores(model, build_graph(model), clean, corrupt, metric, method="relp")
        >>> result.scores.shape, result.n_forward, result.n_backward
        (torch.Size([11, 27]), 2, 1)
    """
    if method not in METHODS or method == "exact":
        raise ValueError(f"method must be one of {METHODS[:-1]} (exact: exact_edge_scores), got {method!r}")
    start = time.perf_counter()
    with frozen_model(model):
        with torch.no_grad():
            corrupt = graph_forward(model, graph, corrupt_ids, attention_mask).outputs
        if method == "eap-ig":
            scores, forwards, backwards = _integrated(model, graph, clean_ids, metric, attention_mask,
                                                      corrupt, per_position, _ig_alphas(n_steps, ig_grid))
        elif method == "relp-ah+qk":
            if rules is not None:
                raise ValueError("relp-ah+qk combines the relp and relp-ah presets: rules= does not apply")
            scores, forwards, backwards = _two_pass_qk(model, graph, clean_ids, metric, attention_mask, corrupt,
                                                       per_position, strict)
        elif isinstance(rules, CalibratedRules):
            if method != "relp":
                raise ValueError(f"calibrated rules score edges with method='relp', got {method!r}")
            scores, backwards = _calibrated(model, graph, clean_ids, metric, attention_mask, corrupt, rules,
                                            per_position, strict)
            forwards = backwards
        else:
            ruleset = resolve_rules(rules if rules is not None else _RULES[method])
            outputs, coefficients = _coefficients(model, graph, clean_ids, metric, attention_mask,
                                                  ruleset, strict, qk_local=method == "relp-ah-qk")
            scores, forwards, backwards = _contract(outputs - corrupt, coefficients, per_position), 1, 1
    scores = _masked(_pad_masked(scores, attention_mask, per_position), graph)
    return EdgeScores(method, scores.detach(), forwards + 1, backwards, time.perf_counter() - start)


def _pad_masked(scores: Tensor, attention_mask: Optional[Tensor], per_position: bool) -> Tensor:
    if attention_mask is None or not per_position:
        return scores
    real = attention_mask.any(0).to(scores.dtype)
    return scores * real[:, None, None]


def upstream_kinds(graph: ComponentGraph) -> List[str]:
    """The calibration group of each upstream node: ``resid`` (the input embeddings), ``attn``, ``mlp``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> upstream_kinds(build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))))
        ['resid', 'attn', 'attn', 'mlp']
    """
    return ["resid" if n == "input" else "mlp" if n.startswith("m") else "attn" for n in graph.upstream]


def _calibrated(model, graph, clean_ids, metric, attention_mask, corrupt, rules: CalibratedRules,
                per_position: bool, strict: bool):
    """Edges out of each upstream node get the coefficients of the rule set calibrated for its kind.

    With these coefficients, the edges out of a node sum to that node's calibrated RelP
    score. One rules-applied forward and backward pass per distinct chosen rule set.
    """
    if not rules.auto_groups:
        raise ValueError("edge scores need rules calibrated per component kind (resid/attn/mlp), "
                         "not with explicit groups")
    rules.check_model(model)
    rows: dict = {}
    for u, kind in enumerate(upstream_kinds(graph)):
        rules.rules_for(kind)  # raises for a kind that was not calibrated
        rows.setdefault(rules.choices[kind], []).append(u)
    scores = None
    for name, upstream in rows.items():
        outputs, coefficients = _coefficients(model, graph, clean_ids, metric, attention_mask,
                                              explicit_ruleset(rules.candidates[name]), strict)
        part = _contract(outputs - corrupt, coefficients, per_position)
        scores = torch.zeros_like(part) if scores is None else scores
        scores[..., upstream, :] = part[..., upstream, :]
    return scores, len(rows)


def qk_columns(graph: ComponentGraph) -> Tensor:
    """``(V,)`` bool: True at the query and key inputs of ``graph.downstream``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> qk_columns(build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2)))).tolist()
        [True, True, True, True, False, False, False, False]
    """
    return torch.tensor([name.endswith(("<q>", "<k>")) for name in graph.downstream])


def _two_pass_qk(model, graph, clean_ids, metric, attention_mask, corrupt, per_position, strict):
    """``relp-ah+qk``: q/k columns from a ``relp`` pass, all others from a ``relp-ah`` pass."""
    parts = []
    for preset in ("relp-ah", "relp"):
        outputs, coefficients = _coefficients(model, graph, clean_ids, metric, attention_mask,
                                              resolve_rules(preset), strict)
        parts.append(_contract(outputs - corrupt, coefficients, per_position))
    columns = qk_columns(graph).to(parts[0].device)
    return torch.where(columns, parts[1], parts[0]), 2, 2


IG_GRIDS = ("right", "left")


def _ig_alphas(n_steps: int, grid: str) -> List[float]:
    """EAP-IG's interpolation points, largest first (``"right"``: the clean run comes first)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if grid not in IG_GRIDS:
        raise ValueError(f"ig_grid must be one of {IG_GRIDS}, got {grid!r}")
    first = n_steps if grid == "right" else n_steps - 1
    return [k / n_steps for k in range(first, first - n_steps, -1)]


def _integrated(model, graph, clean_ids, metric, attention_mask, corrupt, per_position, alphas: List[float]):
    corrupt_embeds = corrupt[:, :, 0]
    clean_outputs, forwards = None, len(alphas)
    if alphas[0] != 1.0:  # the left grid never runs the clean prompts: one more forward for their outputs
        with torch.no_grad():
            clean_outputs = graph_forward(model, graph, clean_ids, attention_mask).outputs
        forwards += 1
    total: Optional[Tensor] = None
    for alpha in alphas:
        embeds = None
        if alpha != 1.0:
            clean_embeds = clean_outputs[:, :, 0]
            embeds = corrupt_embeds + alpha * (clean_embeds - corrupt_embeds)
        outputs, grads = _coefficients(model, graph, clean_ids, metric, attention_mask, None, input_embeds=embeds)
        if clean_outputs is None:
            clean_outputs = outputs
        total = grads if total is None else total + grads
    return _contract(clean_outputs - corrupt, total / len(alphas), per_position), forwards, len(alphas)


def exact_edge_scores(
    model: nn.Module,
    graph: ComponentGraph,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Metric,
    attention_mask: Optional[Tensor] = None,
    max_rows: int = 512,
    sweep: Optional[DataParallelSweep] = None,
    edges: Optional[Tensor] = None,
) -> EdgeScores:
    r"""Exact edge patching: ``m(clean) - m(clean with edge u -> v patched)`` per edge.

    One patched run per edge (several edges share a forward pass as stacked copies
    of the batch, at most ``max_rows`` rows); ``edges`` restricts the runs to a subset.

    Args:
        model, graph, clean_ids, corrupt_ids, metric, attention_mask: as in :func:`edge_scores`;
            ``metric`` is called on each ``B``-row copy of the batch.
        max_rows (int): rows per forward pass.
        sweep (DataParallelSweep, optional): under ``torchrun``, this rank runs the groups of
            edges ``rank, rank + world_size, ...`` and every rank gets all scores (identical to
            one process: the same groups, gathered in order); ``n_forward`` counts all ranks.
            With ``edges``, the groups are formed over the subset and sharded the same way.
        edges (Tensor, optional): the edges to score, either a ``(U, V)`` bool mask (True only
            where ``graph.edge_mask`` is) or a 1-D integer tensor of positions in
            ``graph.edges()`` (duplicates are scored once). Default: every edge.

    Returns:
        EdgeScores: ``(U, V)`` exact effects, mean over prompts; with ``edges``, the other edges
        of the graph are ``nan`` and ``EdgeScores.scored`` is the subset's mask.

    Raises:
        ValueError: if ``edges`` has another shape or dtype, selects no edge, or names an edge
            that is not in ``graph`` (a position outside ``0 .. n_edges - 1``).

    Examples::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph, exact_edge_scores
        >>> from captum_relp.metrics import LogitDiff
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)).eval()
        >>> g = build_graph(model)
        >>> clean, corrupt = torch.randint(20, (2, 4)), torch.randint(20, (2, 4))
        >>> exact_edge_scores(model, g, clean, corrupt, LogitDiff(1, 2)).scores.shape
        torch.Size([4, 8])
        >>> some = exact_edge_scores(model, g, clean, corrupt, LogitDiff(1, 2), edges=torch.tensor([0, 5]))
        >>> some.n_forward, int(some.scored.sum()), int(some.scores.isnan().sum())  # 2 + one group
        (3, 2, 11)
    """
    start = time.perf_counter()
    subset = None if edges is None else edge_subset(graph, edges)
    edges = graph.edges() if subset is None else [(int(u), int(v)) for u, v in subset.nonzero().tolist()]
    batch = clean_ids.shape[0]
    group = max(1, max_rows // batch)
    scores = torch.zeros(graph.edge_mask.shape, dtype=torch.float64)
    if subset is not None:
        scores[graph.edge_mask & ~subset] = float("nan")
    forwards = 0
    evaluate = MetricEvaluator(batch, metric=metric)  # one value per prompt, finite, per tiled copy
    with frozen_model(model), torch.no_grad():
        corrupt = graph_forward(model, graph, corrupt_ids, attention_mask).outputs
        clean_metric = evaluate(graph_forward(model, graph, clean_ids, attention_mask).logits).double().mean()
        forwards += 2
        firsts = list(range(0, len(edges), group))
        sweep = sweep or DataParallelSweep(0, 1)
        mine = []
        for first in sweep.shard(firsts):  # under torchrun: this rank's groups of edges
            chunk = edges[first:first + group]
            k = len(chunk)
            patch = corrupt.new_zeros(k, batch, *graph.edge_mask.shape)
            for index, (u, v) in enumerate(chunk):
                patch[index, :, u, v] = 1.0
            mask = None if attention_mask is None else attention_mask.repeat(k, 1)
            run = graph_forward(model, graph, clean_ids.repeat(k, 1), mask,
                                patch=patch.reshape(k * batch, *graph.edge_mask.shape),
                                corrupt_outputs=corrupt)
            mine.append(evaluate(run.logits).double().reshape(k, batch).mean(1).cpu())
        for first, patched in zip(firsts, sweep.gather(mine, len(firsts))):
            for index, (u, v) in enumerate(edges[first:first + group]):
                scores[u, v] = clean_metric - patched[index]
        forwards += len(firsts)
    return EdgeScores("exact", scores.to(corrupt.dtype), forwards, 0, time.perf_counter() - start, scored=subset)


__all__ = ["METHODS", "IG_GRIDS", "qk_columns", "EdgeScores", "edge_scores", "exact_edge_scores"]
