"""Every figure of the package.

* :func:`plot_patching_heatmaps` — Figure-2-style heatmaps (AP | AtP | RelP, layers x positions).
* :func:`plot_faithfulness` — Figure-3-style faithfulness/completeness against circuit size.

Library code never switches the matplotlib backend: figures are drawn with
``matplotlib.pyplot`` under whatever backend the caller uses (inline in notebooks;
set ``MPLBACKEND=Agg`` for headless scripts).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np


def plot_patching_heatmaps(
    maps: Dict[str, np.ndarray],
    title: str,
    path: Optional[Path] = None,
    position_labels: Optional[Sequence[str]] = None,
):
    """One heatmap per method (shared, symmetric colour scale), layers on the y axis.

    Args:
        maps: ``{method: array (layers, positions)}``, e.g. ``{"AP": ..., "AtP": ..., "RelP": ...}``.
        title: figure title (e.g. the component type).
        path: where to save a PNG; the figure is returned either way.
        position_labels: tick labels for the positions (e.g. the prompt's tokens).

    Example:
        >>> import numpy as np
        >>> fig = plot_patching_heatmaps({"AP": np.eye(2), "RelP": np.eye(2)}, "mlp")
        >>> len(fig.axes)
        3
    """
    import matplotlib.pyplot as plt

    limit = max(float(np.nanmax(np.abs(m))) for m in maps.values()) or 1.0
    n_layers, n_positions = next(iter(maps.values())).shape
    fig, axes = plt.subplots(
        1, len(maps), figsize=(1.5 + (0.6 + 0.2 * n_positions) * len(maps), 1.9 + 0.3 * n_layers),
        squeeze=False, constrained_layout=True,
    )
    image = None
    for ax, (method, values) in zip(axes[0], maps.items()):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_title(method)
        ax.set_yticks(range(n_layers))
        ax.set_ylabel("layer")
        if position_labels is not None:
            ax.set_xticks(range(len(position_labels)))
            ax.set_xticklabels(position_labels, rotation=90, fontsize=7)
        else:
            ax.set_xlabel("position")
    fig.suptitle(title)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, pad=0.01, label="patching effect")
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


METHOD_COLORS = {"AP": "black", "AtP": "tab:blue", "RelP": "tab:red", "RelP+AH": "tab:purple",
                 "IG": "tab:green"}
"""One colour per method name, in every figure."""


def plot_faithfulness(curves: Mapping[str, Mapping[str, object]], path: Path, title: str = "") -> Path:
    """Faint lines per setting, bold line the mean across settings, one colour per method.

    Args:
        curves: ``{setting: {method: CircuitCurve}}`` with method names from
            :data:`captum_relp.attr.METHODS` (``RelP``, ``AtP``, ``IG`` ...).
        path: where the PNG is written.
        title: figure title.

    Example:
        >>> import tempfile, pathlib
        >>> from captum_relp.circuits.faithfulness import CircuitCurve
        >>> curve = CircuitCurve([1, 2], [0.5, 0.1], [0.2, 0.9], [0.8, 0.1])
        >>> out = plot_faithfulness({"a": {"RelP": curve}}, pathlib.Path(tempfile.mkdtemp()) / "f.png")
        >>> out.exists()
        True
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    methods = sorted({m for by in curves.values() for m in by})
    for ax, key, label in ((axes[0], "faithfulness", "faithfulness"), (axes[1], "completeness", "completeness")):
        for method in methods:
            color = METHOD_COLORS.get(method, None)
            series = [(np.array(by[method].n_nodes), np.array(getattr(by[method], key)))
                      for by in curves.values() if method in by]
            for x, y in series:
                ax.plot(x, y, color=color, alpha=0.3, linewidth=1)
            common = sorted(set.intersection(*[set(x.tolist()) for x, _ in series]))
            mean = [np.nanmean([y[list(x).index(n)] for x, y in series]) for n in common]
            ax.plot(common, mean, color=color, linewidth=2.5, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit")
        ax.set_ylabel(label)
        ax.axhline(1.0 if key == "faithfulness" else 0.0, color="grey", linestyle=":", linewidth=1)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
