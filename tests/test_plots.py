"""Plots: each function writes one readable PNG whose content matches the results table it was given."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from flexmore.analysis import plots  # noqa: E402
from flexmore.analysis.data import load_results  # noqa: E402
from flexmore.errors import FlexmoreError  # noqa: E402

EXPERTS = ["math", "code", "news", "reddit"]
GROUPS = {"MC9": ["arc_easy", "piqa"], "GEN5": ["squad", "coqa", "drop"], "BBH": ["bbh_dates"]}
RANKS = [1, 2, 4, 8, 16, 32, 64, 0]  # 0 = full
KS = [2, 4, 5]
SPECS = {"best-all": (2_900_000, 0.02), "best-mc9": (6_000_000, -0.2)}  # parameters, score offset


def _x(rank: int) -> float:
    return 7.0 if rank == 0 else math.log2(rank)


def _params(rank: int) -> int:
    return 1_000_000 + 4 * (30_000 * rank if rank else 4_000_000)


def _records() -> list[dict]:
    """A small sweep: pair and homogeneous curves with interior peaks, two heterogeneous specs, the public model."""
    out = []

    def add(kind, score_of, **fields):
        for group, tasks in GROUPS.items():
            for t, task in enumerate(tasks):
                score = min(0.95, max(0.05, score_of(group) + 0.013 * t))
                out.append({"kind": kind, "task": task, "group": group, "metric": "acc", "score": score, **fields})

    peaks = {"MC9": 2.0, "GEN5": 4.0, "BBH": 6.0}
    for e, expert in enumerate(EXPERTS):
        for rank in RANKS:
            add("pair", lambda g, e=e, r=rank: 0.35 + 0.04 * e - 0.006 * (_x(r) - peaks[g] - e * 0.5) ** 2,
                expert=expert, rank="full" if rank == 0 else rank, k=2, parameters=_params(rank) // 2,
                experts=["public", expert])
    for k in KS:
        for rank in RANKS:
            add("homogeneous", lambda g, k=k, r=rank: 0.42 + 0.02 * k - 0.008 * (_x(r) - 5) ** 2,
                rank="full" if rank == 0 else rank, k=k, parameters=_params(rank), experts=["public"] + EXPERTS)
        for spec, (parameters, offset) in SPECS.items():
            add("heterogeneous", lambda g, k=k, o=offset: 0.5 + 0.02 * k + o, rank_label=spec, k=k,
                parameters=parameters)
    add("public", lambda g: 0.3, k=1, parameters=1_000_000, experts=["public"])
    return out


def _mean_of_group_means(records) -> float:
    by_group: dict[str, list[float]] = {}
    for r in records:
        by_group.setdefault(r["group"], []).append(r["score"])
    return sum(sum(v) / len(v) for v in by_group.values()) / len(by_group)


def _write(tmp_path, records, name="results.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_results(path)


@pytest.fixture()
def records():
    return _records()


@pytest.fixture()
def df(tmp_path, records):
    return _write(tmp_path, records)


def _assert_png(path, min_width=500, min_height=300):
    assert path.is_file() and path.suffix == ".png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] >= min_height and pixels.shape[1] >= min_width
    assert pixels.std() > 0.01  # not a blank canvas
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def _tick_labels(ax):
    return [t.get_text() for t in ax.get_xticklabels()]


def test_average_vs_rank_draws_one_curve_per_k_and_a_line_per_selection(tmp_path, df, records):
    path, fig = plots.plot_average_vs_rank(df, tmp_path / "fig2.png", return_fig=True)
    _assert_png(path)
    ax = fig.axes[0]
    assert ax.get_xlabel() and "higher" not in ax.get_ylabel() and "%" in ax.get_ylabel() and ax.get_title()
    labels = _tick_labels(ax)
    assert labels == ["1", "2", "4", "8", "16", "32", "64", "full"]
    assert dict(zip(labels, ax.get_xticks()))["full"] == 7  # one step right of 64 = 2^6
    lines = {line.get_label(): line for line in ax.get_lines()}
    curves = [name for name in lines if name.endswith("homogeneous")]
    assert sorted(curves) == [f"k = {k} homogeneous" for k in KS]
    assert sum("heterogeneous:" in name for name in lines) == len(KS) * len(SPECS)
    assert sum("all experts full-size" in name for name in lines) == len(KS)
    assert "public model alone" in lines
    assert len(ax.get_legend().get_texts()) == len(lines)
    # the curve's values are the mean of group means (x100), placed at log2(rank)
    curve = lines["k = 4 homogeneous"]
    expected = [100 * _mean_of_group_means([r for r in records if r["kind"] == "homogeneous" and r["k"] == 4
                                            and r["rank"] == ("full" if rank == 0 else rank)]) for rank in RANKS]
    np.testing.assert_allclose(curve.get_xdata(), [_x(r) for r in RANKS])
    np.testing.assert_allclose(curve.get_ydata(), expected)
    het = lines["k = 2 heterogeneous: best-mc9"]
    assert het.get_ydata()[0] == pytest.approx(
        100 * _mean_of_group_means([r for r in records if r.get("rank_label") == "best-mc9" and r["k"] == 2]))


def test_peak_ranks_box_per_group_and_a_point_per_expert(tmp_path):
    rows = [{"expert": e, "group": g, "log2_peak": float((i * 3 + j) % 9)}
            for i, e in enumerate(EXPERTS) for j, g in enumerate(["MC9", "GEN5", "BBH", "Avg"])]
    for r in rows:  # as peaks.peak_ranks writes them: full-size (rank 0) one step above the largest rank, 2^7
        r["peak_rank"] = 0 if r["log2_peak"] == 8 else int(2 ** r["log2_peak"])
    rows.append({"expert": "math", "group": "MC9", "log2_peak": float("nan")})  # no peak: skipped, not plotted
    peaks = pd.DataFrame(rows)
    path, fig = plots.plot_peak_ranks(peaks, tmp_path / "fig3.png", return_fig=True)
    _assert_png(path, min_width=400)
    ax = fig.axes[0]
    assert _tick_labels(ax) == ["Avg", "MC9", "GEN5", "BBH"]  # Avg first, then the table's order
    assert ax.get_xlabel() and "log2" in ax.get_ylabel()
    assert len(ax.patches) == 4  # one box per group
    fig.canvas.draw()
    (rank_axis,) = ax.child_axes  # the right-hand axis names the ranks themselves
    right = {t.get_text() for t in rank_axis.get_yticklabels()}
    assert {"1", "4", "16", "full"} <= right and "256" not in right
    points = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert sorted(points) == sorted(EXPERTS)
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == sorted(EXPERTS)
    for expert, offsets in points.items():
        expected = sorted(r["log2_peak"] for r in rows[:-1] if r["expert"] == expert)
        assert sorted(offsets[:, 1]) == expected
        assert np.all(np.abs(offsets[:, 0] - np.round(offsets[:, 0])) <= 0.2 + 1e-9)  # jitter stays inside its box
    xs = [c.get_offsets()[0, 0] % 1 for c in ax.collections]  # experts keep apart even where their peaks tie
    assert len(set(np.round(xs, 6))) == len(EXPERTS)


def test_group_vs_rank_panel_per_group_line_per_expert(tmp_path, df, records):
    path, fig = plots.plot_group_vs_rank(df, tmp_path / "fig4.png", return_fig=True)
    _assert_png(path)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == list(GROUPS)
    for ax in panels:
        assert sorted(line.get_label() for line in ax.get_lines()) == sorted(EXPERTS)
        assert "full" in _tick_labels(ax) and "64" in _tick_labels(ax) and "acc" in ax.get_ylabel()
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == sorted(EXPERTS)
    line = next(line for line in panels[1].get_lines() if line.get_label() == "code")
    expected = [100 * np.mean([r["score"] for r in records if r["kind"] == "pair" and r["expert"] == "code"
                               and r["group"] == "GEN5" and r["rank"] == ("full" if rank == 0 else rank)])
                for rank in RANKS]
    np.testing.assert_allclose(line.get_ydata(), expected)


def test_heatmap_cells_are_the_pair_averages(tmp_path, df, records):
    path, fig = plots.plot_heatmap(df, tmp_path / "heat.png", return_fig=True)
    _assert_png(path)
    ax, colourbar = fig.axes
    assert colourbar.get_ylabel() and ax.get_xlabel() and ax.get_ylabel()
    assert _tick_labels(ax)[-1] == "full" and _tick_labels(ax)[:2] == ["1", "2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == sorted(EXPERTS)
    table = ax.get_images()[0].get_array()
    assert table.shape == (len(EXPERTS), len(RANKS))
    for i, expert in enumerate(sorted(EXPERTS)):
        for j, rank in enumerate(RANKS):
            cell = [r for r in records if r["kind"] == "pair" and r["expert"] == expert
                    and r["rank"] == ("full" if rank == 0 else rank)]
            assert table[i, j] == pytest.approx(100 * _mean_of_group_means(cell))
    assert len(ax.texts) == table.size  # every cell annotated


def test_frontier_marks_exactly_the_non_dominated_mixtures(tmp_path, df, records):
    path, fig = plots.plot_frontier(df, tmp_path / "frontier.png", return_fig=True)
    _assert_png(path)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "millions" in ax.get_xlabel() and ax.get_ylabel()
    mixtures: dict[tuple, list] = {}
    for r in records:
        if r["kind"] != "pair":
            key = (r["kind"], r.get("rank_label") or r.get("rank"), r["k"], r["parameters"])
            mixtures.setdefault(key, []).append(r)
    points = {key: 100 * _mean_of_group_means(rs) for key, rs in mixtures.items()}
    expected = sorted((key[3], score) for key, score in points.items()
                      if not any(p2 <= key[3] and s2 >= score and (p2 < key[3] or s2 > score)
                                 for (_, _, _, p2), s2 in points.items()))
    assert 3 < len(expected) < len(points)  # the data has a real frontier and real dominated points
    (frontier,) = [line for line in ax.get_lines() if line.get_label().startswith("Pareto frontier")]
    drawn = sorted(zip(frontier.get_xdata(), frontier.get_ydata()))
    assert [p for p, _ in drawn] == [p for p, _ in expected]
    np.testing.assert_allclose([s for _, s in drawn], [s for _, s in expected])
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(points)  # every mixture drawn once
    assert ax.get_legend() is not None
    numbers = sorted(int(t.get_text()) for t in ax.texts if t.get_text().isdigit())
    assert numbers == list(range(1, len(expected) + 1))  # frontier points numbered, named in the legend
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(n.startswith("1: public") for n in names) and any(n.startswith("2: hom r=1 k=5") for n in names)
    # with pairs included there are more points, and still a valid frontier
    _, fig = plots.plot_frontier(df, tmp_path / "frontier_pairs.png", include_pairs=True, return_fig=True)
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == len(points) + len(EXPERTS) * len(RANKS)


def test_pareto_front_keeps_ties_and_drops_dominated():
    front = plots.pareto_front([1, 2, 2, 3, 4, 4], [0.1, 0.3, 0.2, 0.3, 0.5, 0.5])
    assert front.tolist() == [0, 1, 4, 5]


def test_lower_is_better_metrics_are_plotted_as_negated_utility(tmp_path, records):
    for r in records:
        if r["group"] == "BBH":
            r["metric"], r["score"] = "bpb", 2.0 - r["score"]
    df = _write(tmp_path, records)
    _, fig = plots.plot_average_vs_rank(df, tmp_path / "bpb.png", return_fig=True)
    label = fig.axes[0].get_ylabel()
    assert "higher is better" in label and "bpb negated" in label
    _, fig = plots.plot_group_vs_rank(df, tmp_path / "bpb4.png", return_fig=True)
    bbh = next(ax for ax in fig.axes if ax.get_title() == "BBH")
    assert "−bpb" in bbh.get_ylabel()
    assert max(max(line.get_ydata()) for line in bbh.get_lines()) < 0  # utility, not the raw bpb


def test_incomplete_mixtures_are_flagged(tmp_path, records):
    records = [r for r in records if not (r["kind"] == "homogeneous" and r["k"] == 2 and r["rank"] == 8
                                          and r["group"] == "BBH")]
    _, fig = plots.plot_average_vs_rank(_write(tmp_path, records), tmp_path / "partial.png", return_fig=True)
    assert any("fewer than the 3 groups" in t.get_text() for t in fig.texts)


def test_missing_rows_give_clear_errors(tmp_path, df):
    pairs_only = df[df["kind"] == "pair"]
    with pytest.raises(FlexmoreError, match="no homogeneous results"):
        plots.plot_average_vs_rank(pairs_only, tmp_path / "a.png")
    with pytest.raises(FlexmoreError, match="no pair results"):
        plots.plot_group_vs_rank(df[df["kind"] != "pair"], tmp_path / "b.png")
    with pytest.raises(FlexmoreError, match="no pair results"):
        plots.plot_heatmap(df[df["kind"] != "pair"], tmp_path / "c.png")
    with pytest.raises(FlexmoreError, match="no parameter counts"):
        plots.plot_frontier(df.assign(parameters=pd.NA), tmp_path / "d.png")
    with pytest.raises(FlexmoreError, match="no mixtures"):
        plots.plot_frontier(pairs_only, tmp_path / "e.png")
    with pytest.raises(FlexmoreError, match="log2_peak"):
        plots.plot_peak_ranks(pd.DataFrame({"expert": ["math"], "group": ["MC9"]}), tmp_path / "f.png")
    with pytest.raises(FlexmoreError, match="no peak ranks"):
        plots.plot_peak_ranks(pd.DataFrame({"expert": ["m"], "group": ["MC9"], "log2_peak": [None]}),
                              tmp_path / "g.png")
    with pytest.raises(FlexmoreError, match="PNG"):
        plots.plot_heatmap(df, tmp_path / "h.pdf")
    assert not list(tmp_path.glob("*.png"))  # nothing written by a failed call
