"""Figure-3-style plot: faithfulness and completeness against circuit size."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

COLORS = {"relp": "tab:red", "atp": "tab:blue", "ig": "tab:green"}


def plot_faithfulness(curves: Dict[str, Dict[str, object]], path: Path, title: str = "") -> Path:
    """Faint lines per setting, bold line the mean across settings, one colour per method.

    Example:
        >>> import tempfile, pathlib
        >>> from captum_relp.circuits.faithfulness import CircuitCurve
        >>> curve = CircuitCurve([1, 2], [0.5, 0.1], [0.2, 0.9], [0.8, 0.1])
        >>> out = plot_faithfulness({"a": {"relp": curve}}, pathlib.Path(tempfile.mkdtemp()) / "f.png")
        >>> out.exists()
        True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    methods = sorted({m for by in curves.values() for m in by})
    for ax, key, label in ((axes[0], "faithfulness", "faithfulness"), (axes[1], "completeness", "completeness")):
        for method in methods:
            color = COLORS.get(method, None)
            series = [(np.array(by[method].n_nodes), np.array(getattr(by[method], key)))
                      for by in curves.values() if method in by]
            for x, y in series:
                ax.plot(x, y, color=color, alpha=0.3, linewidth=1)
            common = sorted(set.intersection(*[set(x.tolist()) for x, _ in series]))
            mean = [np.nanmean([y[list(x).index(n)] for x, y in series]) for n in common]
            ax.plot(common, mean, color=color, linewidth=2.5, label=method.upper() if method != "relp" else "RelP")
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit")
        ax.set_ylabel(label)
        ax.axhline(1.0 if key == "faithfulness" else 0.0, color="grey", linestyle=":", linewidth=1)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
