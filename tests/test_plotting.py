"""What the figures show: sign colours, sizes that follow the model, axes that follow the data."""
from __future__ import annotations

import numpy as np
import pytest

from captum_relp.circuits.faithfulness import CircuitCurve
from captum_relp.plotting import plot_faithfulness, plot_patching_heatmaps

plt = pytest.importorskip("matplotlib.pyplot")


def _cell_rgb(fig, value):
    image = fig.axes[0].images[0]
    return np.array(image.to_rgba(np.array([[value]]))[0, 0, :3])


def _map(n_layers, n_positions=4):
    values = np.zeros((n_layers, n_positions))
    values[0, 0], values[-1, -1] = 2.0, -2.0
    return values


def test_default_colours_follow_captum_positive_green_negative_red():
    fig = plot_patching_heatmaps({"AP": _map(3), "RelP": _map(3)}, "resid")
    red, green, blue = _cell_rgb(fig, 2.0)  # a positive cell
    assert green > red and green > blue
    red, green, blue = _cell_rgb(fig, -2.0)  # a negative cell
    assert red > green and red > blue
    assert np.allclose(_cell_rgb(fig, 0.0), 1.0, atol=0.01)  # white at zero
    assert "green: positive" in fig._supxlabel.get_text()  # the note says so
    plt.close(fig)


def test_red_blue_keeps_the_earlier_map():
    fig = plot_patching_heatmaps({"AP": _map(3)}, "resid", colors="red-blue")
    red, green, blue = _cell_rgb(fig, 2.0)
    assert red > blue and red > green
    red, green, blue = _cell_rgb(fig, -2.0)
    assert blue > red
    plt.close(fig)


def test_unknown_colours_are_refused():
    with pytest.raises(ValueError, match="colors="):
        plot_patching_heatmaps({"AP": _map(3)}, "resid", colors="rainbow")


def test_figure_height_grows_with_the_layer_count():
    heights = {}
    for layers in (2, 12, 30):
        fig = plot_patching_heatmaps({m: _map(layers) for m in ("AP", "AtP", "RelP", "RelP+AH")}, "resid",
                                     position_labels=["S1", "IO", "S2", "END"])
        heights[layers] = fig.get_figheight()
        axes_height = fig.axes[0].get_position().height * fig.get_figheight()
        assert axes_height / layers >= 0.25  # at least a quarter inch per layer: every row stays legible
        plt.close(fig)
    assert heights[2] < heights[12] < heights[30]


def test_faithfulness_axis_follows_the_reliable_settings(tmp_path):
    sizes = [1, 10, 100, 1000]
    solid = CircuitCurve(sizes, [0.1] * 4, [0.1, 0.4, 0.8, 1.1], [0.9, 0.5, 0.2, 0.1], 1.0, 0.0, 0.01)
    noisy = CircuitCurve(sizes, [0.1] * 4, [-90.0, 300.0, 600.0, 50.0], [80.0, 700.0, 400.0, 30.0],
                         0.013, 0.0129, 0.002)
    assert solid.reliable and not noisy.reliable
    calls = []
    original = plt.Axes.set_ylim

    def record(ax, *args, **kwargs):
        calls.append(args)
        return original(ax, *args, **kwargs)

    plt.Axes.set_ylim = record
    try:
        plot_faithfulness({"within": {"RelP": solid}, "across": {"RelP": noisy}}, tmp_path / "f.png")
    finally:
        plt.Axes.set_ylim = original
    low, high = calls[0]  # the faithfulness panel
    assert -0.5 < low < 0 and 1.1 < high < 1.5  # the noisy setting's hundreds do not set the axis


def test_faithfulness_axes_end_where_the_curves_are_flat(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from captum_relp.circuits.faithfulness import CircuitCurve
    from captum_relp.plotting import plot_faithfulness

    nodes = [1, 2, 5, 10, 20, 50, 100, 400, 800]
    flat = CircuitCurve(nodes, [0.1] * 9, [0.1, 0.4, 0.8, 0.95, 1.0, 1.0, 1.0, 1.0, 1.0],
                        [0.9, 0.5, 0.2, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0])
    kept = {}
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.setdefault("fig", fig))
    plot_faithfulness({"a": {"RelP": flat}}, tmp_path / "f.png")
    right = [ax.get_xlim()[1] for ax in kept["fig"].axes[:2]]
    assert all(abs(r - 2 * 20 * 1.15) < 1e-9 for r in right), right  # twice the size where both curves settle (20), not 800
    moving = CircuitCurve(nodes, [0.1] * 9, [0.1 * i for i in range(9)], [0.9 - 0.1 * i for i in range(9)])
    kept.clear()
    plot_faithfulness({"a": {"RelP": moving}}, tmp_path / "g.png")
    assert all(ax.get_xlim()[1] > 800 for ax in kept["fig"].axes[:2])
