"""The paper's figures (and two more) drawn from a results table, one PNG per function.

    plot_average_vs_rank   Figure 2: mean of group means vs homogeneous rank, one line per k, with
                           horizontal lines for heterogeneous selections, all-full experts and the public model
    plot_peak_ranks        Figure 3: log2 peak rank per group, a box over experts with each expert's point
    plot_group_vs_rank     Figure 4: one panel per group, group mean vs rank, one line per expert
    plot_heatmap           expert x rank table of the mean of group means (2-expert mixtures)
    plot_frontier          mean of group means vs total parameters for every mixture, with the Pareto frontier

Each takes the DataFrame of `data.load_results` (Figure 3: the table of `peaks.peak_ranks`), writes the
PNG atomically and returns its path; `return_fig=True` returns `(path, figure)` so callers and tests can
inspect what was drawn. matplotlib is driven through its object API with the Agg canvas: no pyplot state,
no display needed, nothing left open between calls.

One y convention everywhere, chosen from the whole table passed in: when every metric is higher-is-better
the raw `score` is plotted (x100 as a percentage when all scores are fractions); when any metric is
lower-is-better (bpb, perplexity) `utility` is plotted and the axis says which metrics were negated.
Averages are means of group means; a mixture missing some groups is drawn hollow (or starred) and a
footnote says so, since its average is not comparable with the others.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import FlexmoreError
from .data import FULL, LOWER_IS_BETTER, group_means

DPI = 150
RANK_AXIS_LABEL = "expert rank (log2 scale; full = full-size expert)"
_HET_STYLES = ["--", "-.", (0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (8, 3)), (0, (3, 1))]
_KIND_MARKERS = {"public": "*", "homogeneous": "o", "heterogeneous": "D", "pair": "s"}


# ---------------------------------------------------------------------------------------------- plumbing

def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FlexmoreError("plots need matplotlib, which is not installed: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def _new_figure(figsize):
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas attached to this figure only; the global backend is untouched
    return fig


def _save(fig, out, return_fig: bool):
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise FlexmoreError(f"{out}: plots are written as PNG; give a path ending in .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return (out, fig) if return_fig else out


def _require_columns(df: pd.DataFrame, columns, what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise FlexmoreError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FlexmoreError(f"{what}: the table lacks column(s) {', '.join(missing)}")


def _rows(df: pd.DataFrame, kinds, what: str, message: str) -> pd.DataFrame:
    _require_columns(df, ["kind", "group", "score", "utility", "metric"], what)
    rows = df[df["kind"].isin(kinds)]
    if rows.empty:
        present = ", ".join(sorted(map(str, df["kind"].unique()))) or "none"
        raise FlexmoreError(f"{message} (kinds present: {present})")
    return rows


@dataclass(frozen=True)
class _Scale:
    """Which column is plotted, how it is scaled, and how the axis says it."""

    column: str
    factor: float
    unit: str          # "%", or "" for raw values
    negated: tuple     # lower-is-better metrics plotted negated
    fmt: str

    def label(self, what: str = "average score") -> str:
        if self.negated:
            return f"{what} (higher is better; {', '.join(self.negated)} negated)"
        return f"{what} (%)" if self.unit == "%" else what

    def group_label(self, metrics) -> str:
        """A per-group axis label naming the group's metrics."""
        names = [f"−{m}" if m in LOWER_IS_BETTER else m for m in metrics]
        text = ", ".join(names)
        if self.negated:
            return f"{text} (higher is better)"
        return f"{text} (%)" if self.unit == "%" else text


def _scale(df: pd.DataFrame) -> _Scale:
    lower = tuple(sorted({m for m in df["metric"].dropna().unique() if m in LOWER_IS_BETTER}))
    if lower:
        return _Scale("utility", 1.0, "", lower, "{:.3f}")
    if df["score"].between(0.0, 1.0).all():
        return _Scale("score", 100.0, "%", (), "{:.1f}")
    return _Scale("score", 1.0, "", (), "{:.3g}")


def _averages(rows: pd.DataFrame, by: list[str], scale: _Scale) -> pd.DataFrame:
    """Mean of group means per `by`, scaled; `complete` is False where some of the rows' groups are missing."""
    per_group = group_means(rows, by)
    out = per_group.groupby(by, dropna=False, as_index=False).agg(
        value=(scale.column, "mean"), n_groups=("group", "nunique"))
    out["value"] = out["value"] * scale.factor
    out["complete"] = out["n_groups"] == rows["group"].nunique()
    return out


def _incomplete_note(fig, averages: pd.DataFrame, n_groups: int, marker_text: str) -> None:
    n = int((~averages["complete"]).sum())
    if n:
        fig.text(0.0, -0.01, f"{marker_text}: {n} mixture(s) averaged over fewer than the {n_groups} groups "
                             f"(incomplete results; not comparable)", fontsize=7, color="dimgray",
                 ha="left", va="top")


def _colours(names, cmap: str) -> dict:
    from matplotlib import colormaps

    names = sorted(set(names), key=str)
    palette = colormaps[cmap if len(names) <= 10 else "tab20"]
    count = getattr(palette, "N", 10)
    return {name: palette(i % count) for i, name in enumerate(names)}


def _k_colours(df: pd.DataFrame) -> dict:
    return _colours([int(k) for k in df["k"].dropna().unique()], "Dark2")


def _expert_colours(experts) -> dict:
    return _colours([e for e in experts if isinstance(e, str)], "tab10")


@dataclass(frozen=True)
class _RankAxis:
    """x positions log2(rank); 'full' one step right of the largest swept rank."""

    ticks: list
    labels: list
    full_x: float

    @classmethod
    def of(cls, ranks) -> "_RankAxis":
        ranks = {int(r) for r in ranks if not pd.isna(r)}
        swept = sorted(r for r in ranks if r != FULL)
        if swept:
            lo, hi = math.floor(math.log2(swept[0])), math.ceil(math.log2(swept[-1]))
            ticks = list(range(lo, hi + 1))
            labels = [str(2 ** t) for t in ticks]
            full_x = hi + 1
        else:
            ticks, labels, full_x = [], [], 0
        if FULL in ranks:
            ticks.append(full_x)
            labels.append("full")
        return cls(ticks, labels, full_x)

    def x(self, rank) -> float:
        rank = int(rank)
        return float(self.full_x) if rank == FULL else math.log2(rank)

    def apply(self, ax, *, max_labels: int = 16, label: bool = True) -> None:
        labels = list(self.labels)
        if len(labels) > max_labels:  # keep every other power of two (and always 'full') readable
            labels = [t if i % 2 == 0 or t == "full" else "" for i, t in enumerate(labels)]
        ax.set_xticks(self.ticks, labels)
        if len(self.ticks) > 8:
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        if self.ticks:
            ax.set_xlim(min(self.ticks) - 0.4, max(self.ticks) + 0.4)
        if label:
            ax.set_xlabel(RANK_AXIS_LABEL)


def _legend_outside(ax, **kwargs):
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
                     framealpha=0.9, **kwargs)


def _group_order(groups) -> list:
    """Groups in order of first appearance, 'Avg' first."""
    order = list(dict.fromkeys(map(str, groups)))
    return sorted(order, key=lambda g: g != "Avg")


# ---------------------------------------------------------------------------------------------- Figure 2

def plot_average_vs_rank(df: pd.DataFrame, out, *, return_fig: bool = False):
    """Figure 2: mean of group means of homogeneous mixtures vs rank, one line per k, with horizontal
    lines for each heterogeneous selection (per spec and k), the all-full mixture of each k and the
    public model alone."""
    what = "average-vs-rank plot"
    hom = _rows(df, ["homogeneous"], what, "no homogeneous results to plot (rows of kind 'homogeneous')")
    plotted = df[df["kind"].isin(["homogeneous", "heterogeneous", "public"])]
    scale = _scale(df)
    k_colour = _k_colours(df)
    n_groups = plotted["group"].nunique()
    fig = _new_figure((9.5, 5.2))
    ax = fig.add_subplot()

    avg = _averages(hom, ["k", "rank"], scale)
    avg = avg.assign(k=avg["k"].astype("Int64"))
    axis = _RankAxis.of(avg["rank"])
    for k, sub in avg.groupby("k", sort=True):
        sub = sub.assign(x=[axis.x(r) for r in sub["rank"]]).sort_values("x")
        colour = k_colour[int(k)]
        ax.plot(sub["x"], sub["value"], marker="o", markersize=4, color=colour, lw=1.6,
                label=f"k = {k} homogeneous")
        partial = sub[~sub["complete"]]
        if not partial.empty:
            ax.scatter(partial["x"], partial["value"], s=30, facecolor="white", edgecolor=colour, zorder=3)
        full = sub[sub["rank"] == FULL]
        if not full.empty:
            ax.axhline(full["value"].iloc[0], color=colour, ls=":", lw=1.2,
                       label=f"k = {k} all experts full-size")

    het = df[df["kind"] == "heterogeneous"]
    het_avg = _averages(het, ["k", "rank_label"], scale) if not het.empty else avg.iloc[0:0]
    if not het.empty:
        styles = {s: _HET_STYLES[i % len(_HET_STYLES)]
                  for i, s in enumerate(sorted(het_avg["rank_label"].unique(), key=str))}
        for row in het_avg.sort_values(["k", "rank_label"]).itertuples():
            ax.axhline(row.value, color=k_colour[int(row.k)], ls=styles[row.rank_label], lw=1.4,
                       label=f"k = {row.k} heterogeneous: {row.rank_label}")

    public = df[df["kind"] == "public"]
    if not public.empty:
        value = _averages(public, ["kind"], scale)["value"].iloc[0]
        ax.axhline(value, color="black", ls="-", lw=1.0, alpha=0.8, label="public model alone")

    axis.apply(ax)
    ax.set_ylabel(scale.label("average score, mean of group means"))
    ax.set_title("Average score vs homogeneous expert rank")
    ax.grid(True, alpha=0.3)
    _legend_outside(ax, title="mixture")
    _incomplete_note(fig, pd.concat([avg, het_avg]), n_groups, "hollow markers")
    return _save(fig, out, return_fig)


# ---------------------------------------------------------------------------------------------- Figure 3

def plot_peak_ranks(peaks: pd.DataFrame, out, *, return_fig: bool = False):
    """Figure 3: per group, a box of the log2 peak rank across experts, each expert a jittered point."""
    from matplotlib.ticker import FuncFormatter

    what = "peak-rank plot"
    _require_columns(peaks, ["expert", "group", "log2_peak"], what)
    values = pd.to_numeric(peaks["log2_peak"], errors="coerce")
    table = peaks.assign(log2_peak=values)[np.isfinite(values.astype(float))]
    if table.empty:
        raise FlexmoreError("no peak ranks to plot (the table has no finite log2_peak values)")
    groups = _group_order(table["group"])
    expert_colour = _expert_colours(table["expert"].astype(str))
    fig = _new_figure((max(5.5, 1.1 * len(groups) + 3.0), 4.8))
    ax = fig.add_subplot()

    data = [table.loc[table["group"].astype(str) == g, "log2_peak"].astype(float).to_numpy() for g in groups]
    ax.boxplot(data, positions=range(len(groups)), widths=0.55, showfliers=False, patch_artist=True,
               boxprops={"facecolor": "#e8e8e8", "edgecolor": "dimgray"},
               medianprops={"color": "black", "lw": 2}, whiskerprops={"color": "dimgray"},
               capprops={"color": "dimgray"})
    positions = {g: i for i, g in enumerate(groups)}
    names = sorted(expert_colour)
    # each expert keeps its own horizontal offset in every box, so experts with equal peaks never overlap
    offsets = dict(zip(names, np.linspace(-0.2, 0.2, len(names)) if len(names) > 1 else [0.0]))
    for expert, sub in table.groupby(table["expert"].astype(str), sort=True):
        x = np.array([positions[str(g)] for g in sub["group"]]) + offsets[expert]
        ax.scatter(x, sub["log2_peak"].astype(float), s=28, color=expert_colour[expert], edgecolor="white",
                   linewidth=0.5, zorder=3, label=expert)
    for i, d in enumerate(data):
        ax.annotate(f"median {np.median(d):g}", (i, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)

    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel("benchmark group")
    ax.set_ylabel("peak rank, log2 (0 = rank 1)")
    values = table["log2_peak"].astype(float)
    full_at = set()  # where peaks.peak_ranks put "full" (rank 0) on the log2 axis, if the table says
    if "peak_rank" in table.columns:
        full_at = {round(float(v), 6) for v in table.loc[pd.to_numeric(table["peak_rank"]) == FULL, "log2_peak"]}
    lo, hi = math.floor(values.min()), math.ceil(values.max())
    ticks = sorted(set(range(lo, hi + 1, 1 if hi - lo <= 18 else 2)) | {v for v in full_at if v.is_integer()})
    ax.set_yticks(ticks)
    right = ax.secondary_yaxis("right")
    right.set_yticks(ticks)
    right.yaxis.set_major_formatter(FuncFormatter(
        lambda v, _: "full" if round(float(v), 6) in full_at else f"{2 ** v:g}" if float(v).is_integer() else ""))
    right.set_ylabel("peak rank")
    ax.set_title("Rank at which each expert scores best, per group", pad=14)
    ax.grid(True, axis="y", alpha=0.3)
    # a figure legend: constrained layout keeps it clear of the right-hand rank axis
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", title="expert", fontsize=8)
    return _save(fig, out, return_fig)


# ---------------------------------------------------------------------------------------------- Figure 4

def plot_group_vs_rank(df: pd.DataFrame, out, *, return_fig: bool = False):
    """Figure 4: one panel per group of the 2-expert (public + one) mixtures, group mean vs rank, a line per expert."""
    pair = _rows(df, ["pair"], "group-vs-rank plot", "no pair results to plot (rows of kind 'pair')")
    scale = _scale(df)
    groups = _group_order(pair["group"])
    expert_colour = _expert_colours(pair["expert"])
    gm = group_means(pair, ["expert", "rank"])
    gm["value"] = gm[scale.column] * scale.factor
    axis = _RankAxis.of(gm["rank"])
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = _new_figure((4.3 * ncols + 1.6, 3.3 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)

    for ax, group in zip(axes.flat, groups):
        sub = gm[gm["group"] == group]
        for expert, line in sub.groupby("expert", sort=True):
            line = line.assign(x=[axis.x(r) for r in line["rank"]]).sort_values("x")
            ax.plot(line["x"], line["value"], marker="o", markersize=3, lw=1.3, color=expert_colour[expert],
                    label=expert)
        metrics = sorted(pair.loc[pair["group"] == group, "metric"].dropna().unique())
        ax.set_title(group)
        ax.set_ylabel(scale.group_label(metrics), fontsize=8)
        axis.apply(ax, max_labels=9, label=False)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax in axes.flat[:len(groups)]:  # sharex hides inner labels; a hidden cell below would leave none
        ax.tick_params(axis="x", labelbottom=True)

    handles, labels = axes.flat[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes.flat[1:len(groups)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="outside right upper", title="expert", fontsize=8)
    fig.supxlabel(RANK_AXIS_LABEL, fontsize=10)
    fig.suptitle("Per-group score vs rank of one expert (public + that expert, 2 active)")
    return _save(fig, out, return_fig)


# ---------------------------------------------------------------------------------------------- heatmap

def plot_heatmap(df: pd.DataFrame, out, *, return_fig: bool = False):
    """Expert x rank heatmap of the mean of group means of the 2-expert mixtures, values in the cells."""
    pair = _rows(df, ["pair"], "heatmap", "no pair results for the heatmap (rows of kind 'pair')")
    scale = _scale(df)
    avg = _averages(pair, ["expert", "rank"], scale)
    experts = sorted(avg["expert"].unique(), key=str)
    ranks = sorted({int(r) for r in avg["rank"]}, key=lambda r: (r == FULL, r))
    table = np.full((len(experts), len(ranks)), np.nan)
    complete = np.ones_like(table, dtype=bool)
    for row in avg.itertuples():
        i, j = experts.index(row.expert), ranks.index(int(row.rank))
        table[i, j], complete[i, j] = row.value, row.complete

    fig = _new_figure((max(6.0, 0.62 * len(ranks) + 3.0), max(3.0, 0.5 * len(experts) + 1.8)))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(table), aspect="auto", cmap="viridis")
    lo, hi = np.nanmin(table), np.nanmax(table)
    for (i, j), value in np.ndenumerate(table):
        if np.isnan(value):
            continue
        bright = hi > lo and (value - lo) / (hi - lo) > 0.6
        text = scale.fmt.format(value) + ("" if complete[i, j] else "*")
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if bright else "white")
    colourbar = fig.colorbar(image, ax=ax)
    colourbar.set_label(scale.label("average score, mean of group means"))
    ax.set_xticks(range(len(ranks)), ["full" if r == FULL else str(r) for r in ranks])
    if len(ranks) > 8:
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.set_yticks(range(len(experts)), experts)
    ax.set_xlabel("expert rank (full = full-size expert)")
    ax.set_ylabel("expert (with the public model)")
    ax.set_title("Average score of public + one expert, by expert and rank")
    _incomplete_note(fig, avg, pair["group"].nunique(), "*")
    return _save(fig, out, return_fig)


# ---------------------------------------------------------------------------------------------- frontier

def pareto_front(parameters, scores) -> np.ndarray:
    """Indices of the points no other point dominates (no more parameters and no lower score, one strictly),
    sorted by parameters."""
    p, s = np.asarray(parameters, dtype=float), np.asarray(scores, dtype=float)
    keep = [i for i in range(len(p))
            if not np.any((p <= p[i]) & (s >= s[i]) & ((p < p[i]) | (s > s[i])))]
    return np.array(sorted(keep, key=lambda i: (p[i], -s[i])), dtype=int)


def _mixture_label(row) -> str:
    if row.kind == "public":
        return "public"
    if row.kind == "homogeneous":
        return f"hom r={row.rank_label} k={row.k}"
    if row.kind == "heterogeneous":
        return f"het {row.rank_label} k={row.k}"
    return f"{row.expert} r={row.rank_label}"


def _parameter_unit(largest: float) -> tuple[float, str, str]:
    for size, name, suffix in ((1e9, "billions", "B"), (1e6, "millions", "M"), (1e3, "thousands", "k")):
        if largest >= size:
            return size, name, suffix
    return 1.0, "", ""


def plot_frontier(df: pd.DataFrame, out, *, include_pairs: bool = False, annotate_all: int = 25,
                  return_fig: bool = False):
    """Mean of group means vs total parameters (log axis) for every mixture, with the Pareto frontier
    (the upper-left envelope: nothing smaller scores higher). Frontier points are numbered and named in
    the legend; the other points are named beside them when there are at most `annotate_all` in all."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    kinds = ["public", "homogeneous", "heterogeneous"] + (["pair"] if include_pairs else [])
    rows = _rows(df, kinds, "frontier plot", f"no mixtures to plot (rows of kind {', '.join(kinds)})")
    _require_columns(df, ["parameters", "k", "rank_label", "expert"], "frontier plot")
    with_params = rows[rows["parameters"].notna()]
    if with_params.empty:
        raise FlexmoreError("no parameter counts: the frontier needs the 'parameters' column filled in")
    scale = _scale(df)
    points = _averages(with_params, ["kind", "expert", "rank_label", "k", "parameters"], scale)
    points["parameters"] = points["parameters"].astype(float)
    front = pareto_front(points["parameters"], points["value"])
    k_colour = _k_colours(df)
    unit, unit_name, suffix = _parameter_unit(points["parameters"].max())

    fig = _new_figure((9.5, 5.6))
    ax = fig.add_subplot()
    for (kind, k), sub in points.groupby(["kind", "k"], sort=True):
        colour = "black" if kind == "public" else k_colour.get(int(k), "gray")
        ax.scatter(sub["parameters"], sub["value"], marker=_KIND_MARKERS[kind], s=70 if kind == "public" else 34,
                   color=colour, edgecolors=["white" if c else "red" for c in sub["complete"]], linewidths=0.8,
                   alpha=0.85, zorder=3, gid=f"{kind} k={k}")
    fp = points.iloc[front]
    (frontier,) = ax.plot(fp["parameters"], fp["value"], drawstyle="steps-post", color="firebrick", lw=1.2, marker="o",
            markersize=11, markerfacecolor="none", markeredgecolor="firebrick", zorder=2,
            label="Pareto frontier (nothing smaller scores higher)")
    # frontier points get a number on the plot and their name in the legend: names would collide there
    key = []
    for n, row in enumerate(fp.itertuples(), 1):
        ax.annotate(str(n), (row.parameters, row.value), xytext=(6, -9), textcoords="offset points",
                    fontsize=7, fontweight="bold", color="firebrick")
        key.append(Line2D([], [], ls="none", label=f"{n}: {_mixture_label(row)} "
                                                   f"({row.parameters / unit:.3g}{suffix}, {scale.fmt.format(row.value)})"))
    if len(points) <= annotate_all:
        for row in points.drop(index=fp.index).itertuples():
            ax.annotate(_mixture_label(row), (row.parameters, row.value), xytext=(5, 4),
                        textcoords="offset points", fontsize=6.5, color="dimgray")

    ax.set_xscale("log")
    span = math.log10(points["parameters"].max() / points["parameters"].min()) if len(points) else 0.0
    subs = tuple(range(1, 10)) if span < 1.5 else (1.0, 2.0, 5.0) if span < 3 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / unit:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = points["parameters"].min(), points["parameters"].max()
    room = (hi / lo) ** 0.15 if len(points) <= annotate_all else 1.0  # names beside the rightmost points
    ax.set_xlim(lo / 1.15, hi * 1.35 * room)
    ax.set_xlabel(f"total parameters ({unit_name}, log scale)" if unit_name else "total parameters (log scale)")
    ax.set_ylabel(scale.label("average score, mean of group means"))
    ax.set_title("Score vs size of every mixture")
    ax.grid(True, which="both", alpha=0.25)

    proxies = [Line2D([], [], ls="none", marker=_KIND_MARKERS[kind], color="gray", label=kind)
               for kind in kinds if kind in set(points["kind"])]
    proxies += [Line2D([], [], ls="none", marker="o", color=c, label=f"k = {k}")
                for k, c in k_colour.items() if k in set(points.loc[points["kind"] != "public", "k"].astype(int))]
    proxies.append(frontier)
    proxies += key
    _legend_outside(ax, handles=proxies)
    omitted = len(rows.drop_duplicates(["kind", "expert", "rank_label", "k"])) - len(
        with_params.drop_duplicates(["kind", "expert", "rank_label", "k"]))
    notes = []
    if omitted:
        notes.append(f"{omitted} mixture(s) without a parameter count omitted")
    if not points["complete"].all():
        notes.append(f"red outline: averaged over fewer than the {with_params['group'].nunique()} groups")
    if notes:
        fig.text(0.0, -0.01, "; ".join(notes), fontsize=7, color="dimgray", ha="left", va="top")
    return _save(fig, out, return_fig)
