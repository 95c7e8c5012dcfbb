"""Matplotlib figures for edge experiments: faithfulness curves and top-k edge circuits."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from torch import Tensor

from .evaluate import FaithfulnessCurve, top_edges
from .graph import ComponentGraph

INPUT_COLOURS = {"q": "tab:blue", "k": "tab:green", "v": "tab:orange", "mlp": "tab:purple", "logits": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_faithfulness_curves(curves: Dict[str, FaithfulnessCurve], title: str = "", path: Optional[Path] = None):
    """Faithfulness ``f(C)`` against circuit size (fraction of edges, symlog axis), one line per method.

    Examples::

        >>> from captum_relp.edges import FaithfulnessCurve
        >>> c = FaithfulnessCurve([0.0, 0.5, 1.0], [0, 5, 10], [0.0, 0.8, 1.0], 0.65, 0.35)
        >>> len(plot_faithfulness_curves({"relp": c}).axes)
        1
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for method, curve in curves.items():
        ax.plot(curve.fractions, curve.faithfulness, marker="o", markersize=3,
                label=f"{method} (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.set_xlabel("circuit size (fraction of edges)")
    ax.set_ylabel("faithfulness f(C)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def _position(graph: ComponentGraph, name: str) -> Tuple[float, float]:
    width = graph.n_heads
    if name == "input":
        return (width - 1) / 2, 0.0
    if name == "logits":
        return (width - 1) / 2, 2.0 * graph.n_layers + 1
    if name.startswith("m"):
        return -1.0, 2.0 * int(name[1:]) + 2  # MLPs in a column left of the heads
    layer, head = name[1:].split(".h")
    return float(head), 2.0 * int(layer) + 1


def _input_kind(name: str) -> str:
    if "<" in name:
        return name.split("<")[1].rstrip(">")
    return "logits" if name == "logits" else "mlp"


def plot_edge_circuit(scores: Tensor, graph: ComponentGraph, k: int = 20, title: str = "",
                      path: Optional[Path] = None):
    """Draw the ``k`` edges with the largest ``|score|`` over the graph's nodes (layers bottom to top).

    Line width is proportional to ``|score|``; colour gives the input read (q, k, v, MLP,
    logits); dashed lines are negative scores.

    Examples::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> g = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=9)))
        >>> fig = plot_edge_circuit(torch.rand(g.edge_mask.shape), g, k=3)
        >>> len(fig.axes[0].lines) >= 3
        True
    """
    plt = _pyplot()
    keep = top_edges(scores, graph, k)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * graph.n_heads, 1.5 + 0.9 * graph.n_layers), constrained_layout=True)
    largest = float(scores[keep].abs().max()) if keep.any() else 1.0
    for u, v in keep.nonzero().tolist():
        value = float(scores[u, v])
        start, end = _position(graph, graph.upstream[u]), _position(graph, graph.node_of_input(v))
        kind = _input_kind(graph.downstream[v])
        ax.plot([start[0], end[0]], [start[1], end[1]], color=INPUT_COLOURS[kind],
                lw=0.5 + 4 * abs(value) / (largest or 1.0), ls="-" if value >= 0 else "--", alpha=0.8)
    names = graph.upstream + ["logits"]
    for name in names:
        x, y = _position(graph, name)
        ax.scatter([x], [y], s=250, color="white", edgecolors="black", zorder=3)
        ax.annotate(name, (x, y), ha="center", va="center", fontsize=6, zorder=4)
    for kind, colour in INPUT_COLOURS.items():
        ax.plot([], [], color=colour, label=kind)
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 1.0))
    ax.set_axis_off()
    ax.set_title(title or f"top {k} edges")
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


__all__ = ["plot_faithfulness_curves", "plot_edge_circuit", "INPUT_COLOURS"]
