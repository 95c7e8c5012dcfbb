"""Every figure of the package.

* :func:`plot_patching_heatmaps` — Figure-2-style heatmaps (AP | AtP | RelP, layers x positions).
* :func:`plot_faithfulness` — Figure-3-style faithfulness/completeness against circuit size.
* :func:`plot_faithfulness_curves`, :func:`plot_edge_circuit` — edge circuits (:mod:`captum_relp.edges`).

Library code never switches the matplotlib backend: figures are drawn with
``matplotlib.pyplot`` under whatever backend the caller uses (inline in notebooks;
set ``MPLBACKEND=Agg`` for headless scripts).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch import Tensor

if TYPE_CHECKING:  # annotations only: plotting does not import the edge machinery
    from .edges.evaluate import FaithfulnessCurve
    from .edges.graph import ComponentGraph


EFFECT_NOTE = ("effect = m(clean) \u2212 m(clean with this activation patched from the corrupted run), "
               "in metric units (logit difference); red: patching it lowers the metric")
"""The sign and unit of a patching effect, printed under every heatmap."""


def plot_patching_heatmaps(
    maps: Dict[str, np.ndarray],
    title: str,
    path: Optional[Path] = None,
    position_labels: Optional[Sequence[str]] = None,
    model_name: Optional[str] = None,
    n_prompts: Optional[int] = None,
    xlabel: str = "position",
    note: Optional[str] = EFFECT_NOTE,
):
    """One heatmap per method (shared, symmetric colour scale), layers on the y axis, two per row.

    Args:
        maps: ``{method: array (layers, positions)}``, e.g. ``{"AP": ..., "AtP": ..., "RelP": ...}``.
        title: figure title (e.g. the component type); the model name and N are added.
        path: where to save a PNG; the figure is returned either way.
        position_labels: tick labels for the positions (e.g. token roles or tokens).
        model_name: shown in the title.
        n_prompts: number of prompts averaged, shown in the title.
        xlabel: x-axis label (``"token role"`` for role-aligned maps).
        note: text under the figure (default: the sign and unit of the effect).

    Example:
        >>> import numpy as np
        >>> fig = plot_patching_heatmaps({"AP": np.eye(2), "RelP": np.eye(2)}, "mlp", model_name="m",
        ...                              n_prompts=2)
        >>> len(fig.axes), fig._suptitle.get_text()
        (3, 'mlp \u2014 m, mean of N=2 prompts')
    """
    import matplotlib.pyplot as plt

    limit = max(float(np.nanmax(np.abs(m))) for m in maps.values()) or 1.0
    n_layers, n_positions = next(iter(maps.values())).shape
    ncols = min(len(maps), 2)  # two panels per row: each stays readable at page width
    nrows = -(-len(maps) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(1.8 + (1.2 + 0.32 * n_positions) * ncols, 1.2 + (1.9 + 0.32 * n_layers) * nrows),
        squeeze=False, constrained_layout=True,
    )
    for ax in axes.flat[len(maps):]:
        ax.remove()
    image = None
    for ax, (method, values) in zip(axes.flat, maps.items()):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_title(method, fontsize=11)
        ax.set_yticks(range(n_layers))
        ax.set_ylabel("layer", fontsize=10)
        ax.set_xlabel(xlabel, fontsize=10)
        ax.tick_params(labelsize=9)
        if position_labels is not None:
            ax.set_xticks(range(len(position_labels)))
            ax.set_xticklabels(position_labels, rotation=90, fontsize=9)
    details = [d for d in (model_name, f"mean of N={n_prompts} prompts" if n_prompts else None) if d]
    fig.suptitle(title + (" \u2014 " + ", ".join(details) if details else ""), fontsize=12)
    fig.colorbar(image, ax=axes.flat[:len(maps)], shrink=0.9, pad=0.01).set_label("patching effect", fontsize=10)
    if note:
        width = max(40, int(fig.get_figwidth() * 13))
        fig.supxlabel(textwrap.fill(note, width), fontsize=8, color="0.3")
    if path is not None:
        fig.savefig(path, dpi=150)
        plt.close(fig)
    return fig


METHOD_COLORS = {"AP": "black", "AtP": "tab:blue", "RelP": "tab:red", "RelP+AH": "tab:purple",
                 "IG": "tab:green"}
"""One colour per method name, in every figure."""


SETTING_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))
"""Line styles of the faint per-setting lines (one per setting, in order)."""


def plot_faithfulness(curves: Mapping[str, Mapping[str, object]], path: Path, title: str = "") -> Path:
    """Faint lines per setting, bold line the mean across settings, one colour per method.

    Each setting has its own line style (legend on the right); a setting whose
    denominator ``m(M) - m(empty)`` is small against its noise (see
    :attr:`~captum_relp.circuits.faithfulness.CircuitCurve.reliable`) is drawn with
    hollow markers and flagged "noisy denominator" in the legend: its ratios can
    overshoot 1 or go far below 0.

    Args:
        curves: ``{setting: {method: CircuitCurve}}`` with method names from
            :data:`captum_relp.attr.METHODS` (``RelP``, ``AtP``, ``IG`` ...).
        path: where the PNG is written.
        title: figure title (e.g. ``"tiny-gpt2-ioi: SVA feature circuits"``).

    Example:
        >>> import tempfile, pathlib
        >>> from captum_relp.circuits.faithfulness import CircuitCurve
        >>> curve = CircuitCurve([1, 2], [0.5, 0.1], [0.2, 0.9], [0.8, 0.1])
        >>> out = plot_faithfulness({"a": {"RelP": curve}}, pathlib.Path(tempfile.mkdtemp()) / "f.png")
        >>> out.exists()
        True
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    present = {m for by in curves.values() for m in by}
    methods = [m for m in METHOD_COLORS if m in present] + sorted(present - set(METHOD_COLORS))
    styles = dict(zip(curves, SETTING_STYLES * (len(curves) // len(SETTING_STYLES) + 1)))
    noisy = {s for s, by in curves.items() if not all(getattr(c, "reliable", True) for c in by.values())}
    for ax, key in ((axes[0], "faithfulness"), (axes[1], "completeness")):
        for method in methods:
            color = METHOD_COLORS.get(method, None)
            series = [(setting, np.array(by[method].n_nodes), np.array(getattr(by[method], key)))
                      for setting, by in curves.items() if method in by]
            for setting, x, y in series:
                ax.plot(x, y, color=color, alpha=0.45, linewidth=1, linestyle=styles[setting],
                        marker="o" if setting in noisy else None, markersize=3, markerfacecolor="none")
            common = sorted(set.intersection(*[set(x.tolist()) for _, x, _ in series]))
            mean = [np.nanmean([y[list(x).index(n)] for _, x, y in series]) for n in common]
            ax.plot(common, mean, color=color, linewidth=2.5, label=f"{method} (mean)")
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit", fontsize=10)
        ax.set_ylabel(key, fontsize=10)
        ax.tick_params(labelsize=9)
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title({"faithfulness": "faithfulness: circuit kept, rest mean-ablated (1 = full model)",
                      "completeness": "completeness: circuit ablated (0 = nothing left)"}[key], fontsize=10)
    handles, _ = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="0.4", linestyle=styles[s], marker="o" if s in noisy else None,
                       markerfacecolor="none", label=s + (" (noisy denominator)" if s in noisy else ""))
                for s in curves]
    fig.legend(handles=handles, loc="outside right center", fontsize=9, title="bold: mean; faint: setting",
               title_fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)


EDGE_INPUT_COLOURS = {"q": "tab:blue", "k": "tab:green", "v": "tab:orange", "mlp": "tab:purple", "logits": "tab:red"}


def plot_faithfulness_curves(curves: Dict[str, FaithfulnessCurve], title: str = "", path: Optional[Path] = None):
    """Faithfulness ``f(C)`` against circuit size (fraction of edges, symlog axis), one line per method.

    Examples::

        >>> from captum_relp.edges import FaithfulnessCurve
        >>> c = FaithfulnessCurve([0.0, 0.5, 1.0], [0, 5, 10], [0.0, 0.8, 1.0], 0.65, 0.35)
        >>> len(plot_faithfulness_curves({"relp": c}).axes)
        1
    """
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

    from .edges.evaluate import top_edges

    keep = top_edges(scores, graph, k)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * graph.n_heads, 1.5 + 0.9 * graph.n_layers), constrained_layout=True)
    largest = float(scores[keep].abs().max()) if keep.any() else 1.0
    for u, v in keep.nonzero().tolist():
        value = float(scores[u, v])
        start, end = _position(graph, graph.upstream[u]), _position(graph, graph.node_of_input(v))
        kind = _input_kind(graph.downstream[v])
        ax.plot([start[0], end[0]], [start[1], end[1]], color=EDGE_INPUT_COLOURS[kind],
                lw=0.5 + 4 * abs(value) / (largest or 1.0), ls="-" if value >= 0 else "--", alpha=0.8)
    names = graph.upstream + ["logits"]
    for name in names:
        x, y = _position(graph, name)
        ax.scatter([x], [y], s=250, color="white", edgecolors="black", zorder=3)
        ax.annotate(name, (x, y), ha="center", va="center", fontsize=6, zorder=4)
    for kind, colour in EDGE_INPUT_COLOURS.items():
        ax.plot([], [], color=colour, label=kind)
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 1.0))
    ax.set_axis_off()
    ax.set_title(title or f"top {k} edges")
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
