"""Connected circuits: MIB's dangling-edge pruning and its greedy selection from the logits.

A circuit is a bool ``(U, V)`` mask over ``graph.edge_mask``. A node (head, MLP) is *in* the
circuit when at least one kept edge leaves it and at least one kept edge enters one of its
inputs (the ``input`` node needs no incoming edge). :func:`prune_circuit` removes, until
nothing changes, every edge whose upstream node or downstream node is not in the circuit
(the logits are always in): what remains is connected, every edge on a path from
``input`` to ``logits``. Pruning never changes what the circuit computes under edge
patching: a node whose inputs are all patched outputs its corrupt value, which is what
patching its outgoing edges feeds forward anyway, and a node whose outgoing edges are all
patched is read by nobody.

:func:`greedy_circuit` is MIB's optional ``apply_greedy``: starting from the logits, it
repeatedly keeps the best-scoring edge into a node already in the circuit, so every
kept edge reaches the logits; then it prunes.
"""
from __future__ import annotations

import heapq
from typing import List

import torch
from torch import Tensor

from .._selection import check_finite_count, finite_among
from .graph import ComponentGraph


def _readers(graph: ComponentGraph) -> Tensor:
    """Bool ``(U, V)``: downstream input ``v`` is read by upstream node ``u`` (its own input).

    A grouped key/value input is read by every query head of its group.
    """
    index = {name: i for i, name in enumerate(graph.upstream)}
    readers = torch.zeros(len(graph.upstream), len(graph.downstream), dtype=torch.bool)
    group = graph.n_heads // graph.n_kv_inputs
    for v, name in enumerate(graph.downstream):
        if name == "logits":
            continue
        node = graph.node_of_input(v)
        if name.endswith(("<k>", "<v>")) and group > 1:
            layer, head = node[1:].split(".h")
            for h in range(int(head) * group, (int(head) + 1) * group):
                readers[index[f"a{layer}.h{h}"], v] = True
        else:
            readers[index[node], v] = True
    return readers


def prune_circuit(keep: Tensor, graph: ComponentGraph) -> Tensor:
    """Remove dangling edges until the circuit is connected (MIB's ``Graph.prune``).

    Args:
        keep (Tensor): bool ``(U, V)`` circuit.
        graph (ComponentGraph): its graph.

    Returns:
        Tensor: the pruned circuit (a subset of ``keep``).

    Examples::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> g = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=9)))
        >>> keep = torch.zeros(g.edge_mask.shape, dtype=torch.bool)
        >>> keep[g.upstream.index("a0.h0"), g.logits_slot] = True  # a0.h0 reads nothing kept: dangling
        >>> int(prune_circuit(keep, g).sum())
        0
        >>> keep[0, g.downstream.index("a0.h0<v>")] = True  # input -> a0.h0<v> -> ... -> logits
        >>> int(prune_circuit(keep, g).sum())
        2
    """
    readers = _readers(graph).to(keep.device).float()
    keep = keep & graph.edge_mask.to(keep.device)
    while True:
        has_out = keep.any(1)
        has_in = (readers @ keep.any(0).float()) > 0
        has_in[0] = True  # the input node
        alive = has_out & has_in
        live_inputs = (alive.float() @ readers) > 0
        live_inputs[graph.logits_slot] = True
        pruned = keep & alive[:, None] & live_inputs[None, :]
        if torch.equal(pruned, keep):
            return pruned
        keep = pruned


def greedy_circuit(scores: Tensor, graph: ComponentGraph, k: int, absolute: bool = True) -> Tensor:
    """MIB's greedy selection of ``k`` edges from the logits backwards, then :func:`prune_circuit`.

    Args:
        scores (Tensor): ``(U, V)`` edge scores.
        graph (ComponentGraph): their graph.
        k (int): edges to select (before pruning).
        absolute (bool): rank by ``|score|`` (else by signed score).

    Returns:
        Tensor: bool ``(U, V)`` connected circuit of at most ``k`` edges, all of them with a
        finite score (an edge a method did not score, ``nan``, is never selected).

    Raises:
        ValueError: if ``k`` exceeds the number of edges, or the number of edges with a finite
            score (the message says how many edges are unscored).

    Examples::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> g = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=9)))
        >>> s = torch.zeros(g.edge_mask.shape); s[0, g.downstream.index("a0.h1<q>")] = 9.0
        >>> s[g.upstream.index("a0.h1"), g.logits_slot] = 1.0
        >>> [g.edge_name(u, v) for u, v in greedy_circuit(s, g, 2).nonzero().tolist()]
        ['input->a0.h1<q>', 'a0.h1->logits']
    """
    if k > graph.n_edges:
        raise ValueError(f"k ({k}) is larger than the number of edges ({graph.n_edges})")
    values = (scores.abs() if absolute else scores).double().cpu()
    edge_mask = graph.edge_mask & finite_among(values)
    check_finite_count(edge_mask[graph.edge_mask], k, "edges")
    readers = _readers(graph)
    keep = torch.zeros(edge_mask.shape, dtype=torch.bool)
    heap: List = []
    queued = set()

    def push_inputs_of(slots: List[int]) -> None:
        for v in slots:
            for u in edge_mask[:, v].nonzero().flatten().tolist():
                if (u, v) not in queued:
                    queued.add((u, v))
                    heapq.heappush(heap, (-float(values[u, v]), u, v))

    push_inputs_of([graph.logits_slot])
    in_circuit = set()
    while k > 0 and heap:
        _, u, v = heapq.heappop(heap)
        keep[u, v] = True
        k -= 1
        if u not in in_circuit:
            in_circuit.add(u)
            push_inputs_of(readers[u].nonzero().flatten().tolist())
    return prune_circuit(keep, graph).to(scores.device)


__all__ = ["prune_circuit", "greedy_circuit"]
