"""Figure-2-style heatmaps: AP | AtP | RelP, layers x positions, per component type."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

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
    import matplotlib

    matplotlib.use("Agg", force=False)
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
