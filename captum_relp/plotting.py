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
               "in metric units (logit difference)")
"""The sign and unit of a patching effect, printed under every heatmap (with what each colour means)."""

SIGN_COLORS = {"captum": ("green", "red"), "red-blue": ("red", "blue")}
"""The ``colors=`` choices of :func:`plot_patching_heatmaps`: ``(positive, negative)`` colour names.

``"captum"`` (the default) follows Captum's visualisation (positive green, negative red, white at
zero); ``"red-blue"`` is the map of earlier versions (matplotlib's ``RdBu_r``: positive red)."""


def sign_colormap(colors: str = "captum"):
    """The diverging colormap of ``colors`` (a key of :data:`SIGN_COLORS`): white at zero.

    Example:
        >>> cmap = sign_colormap("captum")
        >>> [round(float(c), 2) for c in cmap(1.0)[:3]], [round(float(c), 2) for c in cmap(0.0)[:3]]
        ([0.0, 0.5, 0.0], [1.0, 0.0, 0.0])
    """
    from matplotlib import colormaps
    from matplotlib.colors import LinearSegmentedColormap

    if colors == "red-blue":
        return colormaps["RdBu_r"]
    if colors not in SIGN_COLORS:
        raise ValueError(f"colors={colors!r}: expected one of {', '.join(map(repr, SIGN_COLORS))}")
    positive, negative = SIGN_COLORS[colors]
    return LinearSegmentedColormap.from_list("RdWhGn", [negative, "white", positive])


def plot_patching_heatmaps(
    maps: Dict[str, np.ndarray],
    title: str,
    path: Optional[Path] = None,
    position_labels: Optional[Sequence[str]] = None,
    model_name: Optional[str] = None,
    n_prompts: Optional[int] = None,
    xlabel: str = "position",
    note: Optional[str] = EFFECT_NOTE,
    colors: str = "captum",
):
    """One heatmap per method (shared, symmetric colour scale), layers on the y axis.

    Each layer gets the same height whatever the model's depth (the figure grows with the layer
    count); panels taller than wide (deep models, few positions) sit side by side in one row,
    others two per row.

    Args:
        maps: ``{method: array (layers, positions)}``, e.g. ``{"AP": ..., "AtP": ..., "RelP": ...}``.
        title: figure title (e.g. the component type); the model name and N are added.
        path: where to save a PNG; the figure is returned either way.
        position_labels: tick labels for the positions (e.g. token roles or tokens).
        model_name: shown in the title.
        n_prompts: number of prompts averaged, shown in the title.
        xlabel: x-axis label (``"token role"`` for role-aligned maps).
        note: text under the figure (default: the sign and unit of the effect); what the
            colours mean is added to it.
        colors: ``"captum"`` (default; Captum's convention: positive green, negative red) or
            ``"red-blue"`` (positive red, negative blue, the map of earlier versions).

    Example:
        >>> import numpy as np
        >>> fig = plot_patching_heatmaps({"AP": np.eye(2), "RelP": np.eye(2)}, "mlp", model_name="m",
        ...                              n_prompts=2)
        >>> len(fig.axes), fig._suptitle.get_text()
        (3, 'mlp \u2014 m, mean of N=2 prompts')
        >>> fig.axes[0].images[0].get_cmap().name
        'RdWhGn'
    """
    import matplotlib.pyplot as plt

    cmap = sign_colormap(colors)
    limit = max(float(np.nanmax(np.abs(m))) for m in maps.values()) or 1.0
    n_layers, n_positions = next(iter(maps.values())).shape
    # panels taller than wide go side by side (up to 4), others two per row: each stays readable
    ncols = min(len(maps), 4 if n_layers > n_positions else 2)
    nrows = -(-len(maps) // ncols)
    panel_width = 1.2 + 0.32 * n_positions
    panel_height = 1.9 + LAYER_HEIGHT * n_layers
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.8 + panel_width * ncols, 1.2 + panel_height * nrows),
                             squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(maps):]:
        ax.remove()
    image = None
    for ax, (method, values) in zip(axes.flat, maps.items()):
        image = ax.imshow(values, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
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
        positive, negative = SIGN_COLORS[colors]
        note = (f"{note}; {positive}: positive (patching it lowers the metric), {negative}: negative"
                if note == EFFECT_NOTE else note)
        width = max(40, int(fig.get_figwidth() * 13))
        fig.supxlabel(textwrap.fill(note, width), fontsize=8, color="0.3")
    return _saved(fig, path, 150)


LAYER_HEIGHT = 0.32
"""Inches per layer in :func:`plot_patching_heatmaps` (a 30-layer panel is about 11.5 inches tall)."""


def _saved(fig, path: Optional[Path], dpi: int):
    """Write ``fig`` to ``path`` and close it (when a path is given); returns ``fig``."""
    if path is not None:
        import matplotlib.pyplot as plt

        fig.savefig(path, dpi=dpi)
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
    shown = [s for s in curves if s not in noisy] or list(curves)  # what the means and the axes follow
    for ax, key in ((axes[0], "faithfulness"), (axes[1], "completeness")):
        for method in methods:
            color = METHOD_COLORS.get(method, None)
            series = [(setting, np.array(by[method].n_nodes), np.array(getattr(by[method], key)))
                      for setting, by in curves.items() if method in by]
            for setting, x, y in series:
                ax.plot(x, y, color=color, alpha=0.45, linewidth=1, linestyle=styles[setting],
                        marker="o" if setting in noisy else None, markersize=3, markerfacecolor="none")
            series = [item for item in series if item[0] in shown] or series
            common = sorted(set.intersection(*[set(x.tolist()) for _, x, _ in series]))
            mean = [np.nanmean([y[list(x).index(n)] for _, x, y in series]) for n in common]
            ax.plot(common, mean, color=color, linewidth=2.5, label=f"{method} (mean)")
        ax.set_ylim(*ratio_limits([getattr(curve, key) for s in shown for curve in curves[s].values()]))
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit", fontsize=10)
        ax.set_ylabel(key, fontsize=10)
        ax.tick_params(labelsize=9)
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title({"faithfulness": "faithfulness: circuit kept, rest mean-ablated (1 = full model)",
                      "completeness": "completeness: circuit ablated (0 = nothing left)"}[key], fontsize=10)
    settled = settled_at([(np.array(c.n_nodes), np.array(getattr(c, key))) for s in shown
                          for c in curves[s].values() for key in ("faithfulness", "completeness")])
    if settled is not None:  # past this every curve is flat: both panels end at twice that size
        every = [n for s in shown for c in curves[s].values() for n in c.n_nodes]
        for ax in axes:
            ax.set_xlim(min(every) / 1.15, min(max(every), 2 * settled) * 1.15)
    handles, _ = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="0.4", linestyle=styles[s], marker="o" if s in noisy else None,
                       markerfacecolor="none", label=s + (" (noisy denominator)" if s in noisy else ""))
                for s in curves]
    title_text = "bold: mean; faint: setting"
    if noisy and len(shown) < len(curves):
        title_text = ("bold: mean of the settings\nwith a reliable denominator;\nfaint: setting (noisy ones\n"
                      "may leave the axes)")
    fig.legend(handles=handles, loc="outside right center", fontsize=9, title=title_text,
               title_fontsize=9)
    fig.suptitle(title, fontsize=12)
    _saved(fig, path, 150)
    return Path(path)


def settled_at(series, tolerance: float = 0.02) -> Optional[float]:
    """The smallest x from which every ``(x, y)`` curve stays within ``tolerance`` of its last value.

    The faithfulness figures end their x-axis at twice this size: beyond it the curves are flat.
    ``None`` when no curve has a finite value.

    Example:
        >>> import numpy as np
        >>> x = np.array([1, 2, 5, 10, 100, 800])
        >>> settled_at([(x, np.array([0.1, 0.5, 0.9, 0.99, 1.0, 1.0]))])
        10
        >>> settled_at([(x, np.array([0.1, 0.5, 0.9, 0.99, 1.0, 0.7]))])  # still moving at the end
        800
    """
    reach = []
    for x, y in series:
        finite = np.isfinite(y)
        if not finite.any():
            continue
        x, y = np.asarray(x)[finite], np.asarray(y)[finite]
        moving = np.nonzero(np.abs(y - y[-1]) > tolerance)[0]
        reach.append(x[0] if not len(moving) else x[min(moving[-1] + 1, len(x) - 1)])
    return max(reach).item() if reach else None


def ratio_limits(values, margin: float = 0.08) -> Tuple[float, float]:
    """y limits for ratio curves: the range of ``values`` with 0 and 1 included, plus a margin.

    :func:`plot_faithfulness` passes the curves of the settings whose denominator is reliable,
    so a noisy setting (ratios of a near-zero effect, in the hundreds) does not squash them.

    Example:
        >>> [round(v, 2) for v in ratio_limits([[0.2, 0.9], [0.1, 1.25]])]
        [-0.1, 1.35]
    """
    finite = [float(v) for curve in values for v in curve if np.isfinite(v)] + [0.0, 1.0]
    low, high = min(finite), max(finite)
    pad = margin * (high - low)
    return low - pad, high + pad


EDGE_METHOD_NAMES = {"relp": "RelP", "relp-ah": "RelP+AH", "eap": "AtP", "eap-ig": "IG", "exact": "AP"}
"""Edge methods and the node-level method whose colour they share (EAP is AtP on edges, exact
edge patching is AP on edges)."""


EDGE_METHOD_LABELS = {"relp": "RelP", "relp-ah": "RelP+AH", "relp-ah-qk": "RelP+AH, local q/k",
                      "relp-ah+qk": "RelP+AH, q/k from RelP", "eap": "EAP", "eap-ig": "EAP-IG",
                      "exact": "exact patching"}
"""How figures and prose name each edge ``--method`` identifier."""


def method_color(method: str) -> str:
    """The colour of ``method`` (node-level name or edge method), the same in every figure.

    Examples::

        >>> method_color("relp") == method_color("RelP"), method_color("eap") == method_color("AtP")
        (True, True)
    """
    return METHOD_COLORS.get(EDGE_METHOD_NAMES.get(method, method), _OTHER_COLORS.get(method, "tab:gray"))


_OTHER_COLORS = {"relp-ah-qk": "tab:orange", "relp-ah+qk": "tab:brown"}  # edge methods without a node-level twin


def plot_faithfulness_curves(curves: Dict[str, FaithfulnessCurve], title: str = "", path: Optional[Path] = None):
    """Faithfulness ``f(C)`` against circuit size (fraction of edges, symlog axis), one colour per method.

    Solid: circuits of the largest ``|score|`` (CMD's, and CPR's under the library convention);
    dotted: circuits of the largest signed score, when CPR uses them (``convention="mib"``).

    Examples::

        >>> from captum_relp.edges import FaithfulnessCurve
        >>> c = FaithfulnessCurve([0.0, 0.5, 1.0], [0, 5, 10], [0.0, 0.8, 1.0], 0.65, 0.35)
        >>> len(plot_faithfulness_curves({"relp": c}).axes)
        1
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for method, curve in curves.items():
        color = method_color(method)
        ax.plot(curve.fractions, curve.faithfulness, marker="o", markersize=3, color=color,
                label=f"{EDGE_METHOD_LABELS.get(method, method)} (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})")
        signed = curve.faithfulness_cpr
        if signed is not None and signed != curve.faithfulness:
            ax.plot(curve.fractions, signed, ls=":", marker="^", markersize=3, color=color)
    if any(c.faithfulness_cpr not in (None, c.faithfulness) for c in curves.values()):
        ax.plot([], [], color="0.3", ls=":", marker="^", markersize=3, label="dotted: top signed score (CPR)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.set_xlabel("circuit size (fraction of edges)")
    ax.set_ylabel("faithfulness f(C)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _saved(fig, path, 120)


_ATTACH = {"q": -0.13, "k": 0.0, "v": 0.13}  # where an edge meets a head: q left, k centre, v right


def _position(graph: ComponentGraph, name: str) -> Tuple[float, float]:
    width = graph.n_heads
    if name == "input":
        return (width - 1) / 2, 0.0
    if name == "logits":
        return (width - 1) / 2, 2.0 * graph.n_layers + 1
    if name.startswith("m"):
        return -1.2, 2.0 * int(name[1:]) + 2  # MLPs in a column left of the heads
    layer, head = name[1:].split(".h")
    return float(head), 2.0 * int(layer) + 1


def _input_kind(name: str) -> str:
    if "<" in name:
        return name.split("<")[1].rstrip(">")
    return "logits" if name == "logits" else "mlp"


def _input_position(graph: ComponentGraph, v: int) -> Tuple[float, float]:
    """Where an edge into downstream input ``v`` ends (a grouped key/value input: centre of its group)."""
    x, y = _position(graph, graph.node_of_input(v))
    kind = _input_kind(graph.downstream[v])
    group = graph.n_heads // graph.n_kv_inputs
    if kind in ("k", "v") and group > 1:
        return x * group + (group - 1) / 2, y
    return x + _ATTACH.get(kind, 0.0), y


def plot_edge_circuit(scores: Tensor, graph: ComponentGraph, k: int = 20, title: str = "",
                      path: Optional[Path] = None, method: Optional[str] = None):
    """Draw the connected circuit of ``k`` edges that MIB's greedy search picks from ``scores``.

    Every edge has the colour of ``method`` (:func:`method_color`); solid lines are positive
    scores, dashed lines negative; line width is proportional to ``|score|`` (legend). Lines
    are opaque and drawn weakest first. An edge into an attention head meets it at the
    left (q), centre (k) or right (v) of its box.

    Examples::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> g = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=9)))
        >>> fig = plot_edge_circuit(torch.rand(g.edge_mask.shape), g, k=g.n_edges, method="relp")
        >>> len(fig.axes[0].lines) == g.n_edges  # every edge (the whole graph is connected)
        True
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .edges.connected import greedy_circuit

    keep = greedy_circuit(scores.detach().cpu(), graph, min(k, graph.n_edges))
    color = method_color(method) if method else "black"
    fig, ax = plt.subplots(figsize=(2.6 + 1.25 * graph.n_heads, 1.6 + 0.95 * graph.n_layers),
                           constrained_layout=True)
    values = scores.detach().cpu().double()
    largest = float(values[keep].abs().max()) if keep.any() else 1.0
    largest = largest or 1.0

    def width(value: float) -> float:
        return 0.6 + 4.4 * abs(value) / largest

    edges = sorted(keep.nonzero().tolist(), key=lambda e: abs(float(values[e[0], e[1]])))
    for u, v in edges:
        value = float(values[u, v])
        x0, y0 = _position(graph, graph.upstream[u])
        x1, y1 = _input_position(graph, v)
        ax.plot([x0, x1], [y0 + 0.17, y1 - 0.17], color=color, lw=width(value),
                ls="-" if value >= 0 else (0, (3, 2)), solid_capstyle="butt", zorder=2)
    used = {graph.upstream[u] for u, _ in edges} | {graph.node_of_input(v) for _, v in edges}
    for name in graph.upstream + ["logits"]:
        x, y = _position(graph, name)
        ax.text(x, y, name, ha="center", va="center", fontsize=7, zorder=4,
                color="black" if name in used else "0.6",
                bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="black" if name in used else "0.75", lw=0.8))
    handles = [Line2D([], [], color=color, lw=2, ls="-", label="positive score"),
               Line2D([], [], color=color, lw=2, ls=(0, (3, 2)), label="negative score")]
    handles += [Line2D([], [], color=color, lw=width(largest * f), label=f"|score| {largest * f:.3g}")
                for f in (1.0, 0.5, 0.1)]
    handles.append(Line2D([], [], color="none", label="into a head: q left, k centre, v right"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
              title=EDGE_METHOD_LABELS.get(method, method) if method else None, title_fontsize=8)
    ax.set_xlim(-1.8, graph.n_heads - 0.4)
    ax.set_ylim(-0.6, 2.0 * graph.n_layers + 1.6)
    ax.set_axis_off()
    ax.set_title(title or f"top {k} edges", fontsize=9)
    return _saved(fig, path, 130)
