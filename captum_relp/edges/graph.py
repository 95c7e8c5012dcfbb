"""The component graph of a decoder-only transformer, as EAP-IG and MIB define it.

Nodes that *write* to the residual stream (upstream nodes): the input embeddings,
every attention head, every MLP. Inputs that *read* from it (downstream inputs):
the query, key and value input of every attention head (key and value per
key/value head under grouped-query attention, or per query head when the graph
is *ungrouped*, as EAP-IG and MIB build it), every MLP input, and the logits.
An edge joins an upstream node to every downstream input that runs after it.
The residual stream entering a downstream input is the sum of the outputs of
its upstream nodes, so patching any set of edges is an exact intervention (see
:mod:`captum_relp.edges.patching`).

Bias terms of attention output projections are split evenly over the heads of
their layer; they cancel in every clean-minus-corrupt difference. A node's output is
what it adds to the residual stream: on post-normed ("sandwich") blocks (Gemma-2,
Gemma-3, OLMo-2) the MLP's output after its post-norm, and a head's share of the
attention post-norm's output (the head's term times the norm's elementwise factor).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from torch import Tensor, nn

from ..families import FAMILY_TABLE

FAMILIES = {model_type: family.edges for model_type, family in FAMILY_TABLE.items() if family.edges}
"""``{model_type: EdgeParts}`` of the families with edge-graph parts in the family table."""


@dataclass
class ComponentGraph:
    """Nodes, downstream inputs and edges of a transformer's component graph.

    Upstream nodes are ordered ``input, a0.h0 .. a0.h{H-1}, m0, a1.h0, ..., m{L-1}``;
    downstream inputs ``a0.h0<q> .. a0.h{H-1}<q>, a0.h0<k> .., a0.h0<v> .., m0, ...,
    logits`` (``<k>``/``<v>`` per key/value head, or per query head when ``ungrouped``).

    Attributes:
        family: the model type (an entry of the family table with edge-graph parts).
        n_layers, n_heads, n_kv_heads: the model's shape.
        ungrouped: one key and one value input per *query* head (EAP-IG / MIB), each
            projected with its group's key/value weights; otherwise one per key/value head.
            The same as grouped when ``n_kv_heads == n_heads``.
        parallel: True when attention and MLP of a layer read the same residual
            stream (GPT-NeoX ``use_parallel_residual``); then ``a{l}.h* -> m{l}`` are no edges.
        upstream: names of the upstream nodes.
        downstream: names of the downstream inputs.
        edge_mask: ``(len(upstream), len(downstream))`` bool tensor, True where an edge exists.

    Examples::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> g = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)))
        >>> len(g.upstream), len(g.downstream), g.n_edges
        (11, 27, 110)
    """

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool
    upstream: List[str] = field(default_factory=list)
    downstream: List[str] = field(default_factory=list)
    edge_mask: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))
    ungrouped: bool = False

    @property
    def n_edges(self) -> int:
        """Number of edges."""
        return int(self.edge_mask.sum())

    @property
    def n_kv_inputs(self) -> int:
        """The number of key inputs per layer, and of value inputs (``H`` when ``ungrouped``, else ``H_kv``)."""
        return _kv_inputs(self.n_heads, self.n_kv_heads, self.ungrouped)

    @property
    def slots_per_layer(self) -> int:
        """Downstream inputs per layer: ``H`` queries, ``2 * n_kv_inputs`` keys/values, one MLP."""
        return self.n_heads + 2 * self.n_kv_inputs + 1

    def head_node(self, layer: int, head: int) -> int:
        """Upstream index of head ``head`` of layer ``layer``."""
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_node(self, layer: int) -> int:
        """Upstream index of the MLP of layer ``layer``."""
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def attn_slots(self, layer: int) -> slice:
        """Downstream indices of layer ``layer``'s q, k and v inputs."""
        start = layer * self.slots_per_layer
        return slice(start, start + self.n_heads + 2 * self.n_kv_inputs)

    def mlp_slot(self, layer: int) -> int:
        """Downstream index of layer ``layer``'s MLP input."""
        return (layer + 1) * self.slots_per_layer - 1

    @property
    def logits_slot(self) -> int:
        """Downstream index of the logits input."""
        return len(self.downstream) - 1

    def edges(self) -> List[Tuple[int, int]]:
        """All edges as ``(upstream index, downstream index)``, row-major.

        Examples::

            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> from captum_relp.edges import build_graph
            >>> g = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=9)))
            >>> g.edge_name(*g.edges()[0])
            'input->a0.h0<q>'
        """
        return [(int(u), int(v)) for u, v in self.edge_mask.nonzero().tolist()]

    def edge_name(self, u: int, v: int) -> str:
        """``'<upstream>-><downstream>'``, e.g. ``'a0.h1->a1.h0<k>'``."""
        return f"{self.upstream[u]}->{self.downstream[v]}"

    def node_of_input(self, v: int) -> str:
        """The node a downstream input belongs to: ``'a1.h0<k>'`` -> ``'a1.h0'``."""
        name = self.downstream[v]
        return name.split("<")[0]


def _kv_inputs(n_heads: int, n_kv_heads: int, ungrouped: bool) -> int:
    """Key/value inputs per layer: ungrouped graphs read one per query head (EAP-IG, MIB)."""
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads do not split into {n_kv_heads} key/value groups")
    return n_heads if ungrouped else n_kv_heads


def _build(family: str, n_layers: int, n_heads: int, n_kv_heads: int, parallel: bool,
           ungrouped: bool = False) -> ComponentGraph:
    kv_inputs = _kv_inputs(n_heads, n_kv_heads, ungrouped)
    upstream = ["input"]
    downstream: List[str] = []
    for layer in range(n_layers):
        upstream += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
        downstream += [f"a{layer}.h{h}<q>" for h in range(n_heads)]
        downstream += [f"a{layer}.h{h}<k>" for h in range(kv_inputs)]
        downstream += [f"a{layer}.h{h}<v>" for h in range(kv_inputs)]
        downstream.append(f"m{layer}")
    downstream.append("logits")
    graph = ComponentGraph(family, n_layers, n_heads, n_kv_heads, parallel, upstream, downstream,
                           ungrouped=ungrouped)
    mask = torch.zeros(len(upstream), len(downstream), dtype=torch.bool)
    mask[0, :] = True
    for layer in range(n_layers):
        written = graph.mlp_node(layer - 1) + 1 if layer else 1  # nodes of earlier layers
        mask[:written, graph.attn_slots(layer)] = True
        mask[:written, graph.mlp_slot(layer)] = True
        if not parallel:
            heads = slice(graph.head_node(layer, 0), graph.mlp_node(layer))
            mask[heads, graph.mlp_slot(layer)] = True
    mask[:, graph.logits_slot] = True
    graph.edge_mask = mask
    return graph


def build_graph(model: nn.Module, ungroup_kv: bool = False) -> ComponentGraph:
    """The component graph of a Hugging Face causal language model.

    Supported: the families with edge-graph parts in the family table (:data:`FAMILIES`: every
    decoder of the table; the encoders, and configurations that normalise the residual stream
    itself, raise a ``ValueError`` saying why).

    Args:
        model (nn.Module): a causal LM of one of :data:`FAMILIES`.
        ungroup_kv (bool): one key and one value input per query head (EAP-IG / MIB,
            ``convention="mib"``) instead of one per key/value head. Changes nothing
            without grouped-query attention.

    Returns:
        ComponentGraph: the graph; ``graph.n_edges`` edges.

    Examples::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from captum_relp.edges import build_graph
        >>> cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                   num_key_value_heads=2, intermediate_size=64, vocab_size=50)
        >>> g = build_graph(LlamaForCausalLM(cfg))
        >>> g.downstream[4:8]
        ['a0.h0<k>', 'a0.h1<k>', 'a0.h0<v>', 'a0.h1<v>']
        >>> build_graph(LlamaForCausalLM(cfg), ungroup_kv=True).downstream[4:8]
        ['a0.h0<k>', 'a0.h1<k>', 'a0.h2<k>', 'a0.h3<k>']
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        why = FAMILY_TABLE[model_type].no_edges if model_type in FAMILY_TABLE else ""
        raise ValueError(
            f"edge graphs support model types {sorted(FAMILIES)}, got {model_type!r} "
            f"({type(model).__name__}): " + (why or "its family has no edge-graph parts in the family table")
        )
    family = FAMILY_TABLE[model_type]
    reason = family.edges.refuse(config) if family.edges.refuse else ""
    if reason:
        raise ValueError(f"{model_type}: no edge graph for this configuration: {reason}")
    return _build(model_type, config.num_hidden_layers, family.num_heads(config), family.num_kv_heads(config),
                  family.is_parallel(config), ungroup_kv)


def edge_subset(graph: ComponentGraph, edges: Tensor) -> Tensor:
    """The ``(U, V)`` bool mask of a subset of ``graph``'s edges (``edges=`` of :func:`~captum_relp.edges.exact_edge_scores`).

    Args:
        graph (ComponentGraph): the graph.
        edges (Tensor): a ``(U, V)`` bool mask, or a 1-D integer tensor of positions in ``graph.edges()``.

    Returns:
        Tensor: ``(U, V)`` bool on the CPU, True only at edges of the graph.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> import torch
        >>> from captum_relp.edges import build_graph
        >>> from captum_relp.edges.graph import edge_subset
        >>> g = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2)))
        >>> [g.edge_name(u, v) for u, v in edge_subset(g, torch.tensor([1, 0])).nonzero().tolist()]
        ['input->a0.h0<q>', 'input->a0.h1<q>']
    """
    if not isinstance(edges, Tensor):
        raise ValueError(f"edges must be a Tensor (a bool mask or edge positions), got {type(edges).__name__}")
    edge_mask = graph.edge_mask.cpu()
    edges = edges.cpu()
    if edges.dtype == torch.bool:
        if edges.shape != edge_mask.shape:
            raise ValueError(f"edges: a bool mask must have the graph's shape {tuple(edge_mask.shape)} "
                             f"(upstream, downstream), got {tuple(edges.shape)}")
        outside = edges & ~edge_mask
        if outside.any():
            u, v = outside.nonzero()[0].tolist()
            raise ValueError(f"edges: {int(outside.sum())} selected entries are not edges of the graph, "
                             f"e.g. {graph.edge_name(u, v)} (upstream {u}, downstream {v})")
        subset = edges.clone()
    elif not edges.is_floating_point() and not edges.is_complex():
        if edges.dim() != 1:
            raise ValueError(f"edges: positions in graph.edges() must be a 1-D tensor, got shape {tuple(edges.shape)}")
        bad = (edges < 0) | (edges >= graph.n_edges)
        if bad.any():
            raise ValueError(f"edges: position {int(edges[bad][0])} is not an edge of the graph "
                             f"(positions run 0 .. {graph.n_edges - 1})")
        flat = torch.zeros(graph.n_edges, dtype=torch.bool)
        flat[edges.long()] = True
        subset = torch.zeros_like(edge_mask)
        subset[edge_mask] = flat
    else:
        raise ValueError(f"edges must be a bool mask or an integer tensor of edge positions, got dtype {edges.dtype}")
    if not subset.any():
        raise ValueError("edges selects no edge")
    return subset


__all__ = ["ComponentGraph", "build_graph", "edge_subset", "FAMILIES"]
