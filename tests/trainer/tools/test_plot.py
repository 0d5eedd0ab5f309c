"""A run's plot.png says which method trained, and shows the GRAO term shares (of the value, and of the gradient
when evaluations measured it) only for the grao methods."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("matplotlib")

from grao.tools.plot import _pyplot, metrics_figure  # noqa: E402


def lines(with_terms: bool) -> list[dict]:
    out = []
    for step in range(1, 5):
        line = {"step": step, "reward/samples": 0.1 * step, "reward/reference": 1.0, "loss": 2.0 / step}
        if with_terms:
            line.update({"objective/exploration": 0.3, "objective/imitation": -0.5, "objective/alignment": 0.2})
        out.append(line)
    return out


@pytest.mark.parametrize("method,with_terms,panel", [("grao", True, "share of |objective|"), ("grpo", False, "loss")])
def test_the_figure_is_titled_and_paneled_by_method(method, with_terms, panel):
    plt = _pyplot()
    fig = metrics_figure(plt, lines(with_terms), [{"step": 4, "eval/reward": 0.5}], method)
    top, bottom = fig.axes
    assert top.get_title().startswith(f"{method} training")
    assert bottom.get_ylabel() == panel
    drawn = [line.get_label() for line in bottom.get_lines()]
    assert drawn == (["exploration", "imitation", "alignment"] if with_terms else ["loss"])
    assert all(not math.isnan(y) for line in bottom.get_lines() for y in line.get_ydata())
    plt.close(fig)


def test_grao_gradient_shares_are_drawn_under_the_value_shares_at_each_evaluation():
    plt = _pyplot()
    shares = {"exploration": 0.2, "imitation": 0.5, "alignment": 0.3}
    evals = [{"step": s, "eval/reward": 0.1, **{f"terms/grad_share/{t}": v for t, v in shares.items()}} for s in (0, 4)]
    fig = metrics_figure(plt, lines(True), evals, "grao")
    _, values, gradients = fig.axes
    assert values.get_ylabel() == "share of |objective|"
    assert gradients.get_ylabel().startswith("share of gradient norm")
    drawn = {line.get_label(): line for line in gradients.get_lines()}
    assert list(drawn) == ["exploration", "imitation", "alignment"]
    for term, line in drawn.items():
        assert list(line.get_xdata()) == [0, 4] and list(line.get_ydata()) == [shares[term]] * 2
        assert line.get_marker() == "o"
    plt.close(fig)


@pytest.mark.parametrize("seeds", [1, 2])
def test_compare_curves_mark_each_evaluation_and_draw_a_band_only_over_seeds(seeds):
    from grao.tools.plot import compare_curves_figure

    plt = _pyplot()
    curve = [[0, 0.1], [5, 0.4], [10, 0.6]]
    fig = compare_curves_figure(plt, {"grao": [[[s, r + 0.1 * i] for s, r in curve] for i in range(seeds)]})
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    assert line.get_marker() == "o" and list(line.get_xdata()) == [0, 5, 10]
    assert len(ax.collections) == (1 if seeds > 1 else 0)  # the min-max band
    assert ("band = min to max" in ax.get_title()) == (seeds > 1)
    plt.close(fig)
