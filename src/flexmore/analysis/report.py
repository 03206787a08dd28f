"""`flexmore report`: the study's results as report.md + figures + report.json, a miniature of the paper.

Every section is computed from the results table alone; a section whose rows are missing (no
heterogeneous selections yet, too few ranks for a regression) says so instead of failing the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .. import __version__
from ..checkpoint import atomic_dir
from ..errors import FlexmoreError
from .data import LOWER_IS_BETTER, average_over_groups, load_results


def _fmt_params(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)) or n is pd.NA:
        return "-"
    n = int(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_rows(df: pd.DataFrame) -> list[dict]:
    """Public alone, all-full experts, best homogeneous rank, and each heterogeneous selection, per k.

    Scores are means of group means, kept apart by direction: `score` over higher-is-better groups
    (accuracies) and `lower` over lower-is-better ones (bpb), never averaged together; `utility` (what
    decides "best") is the accuracy mean when there is one, else the negated bpb mean.
    """
    rows_df = df[df["kind"] != "pair"]
    lower_mask = rows_df["metric"].isin(LOWER_IS_BETTER)
    keys = ["kind", "rank_label", "k"]
    higher = average_over_groups(rows_df[~lower_mask], keys) if (~lower_mask).any() else None
    lower = average_over_groups(rows_df[lower_mask], keys) if lower_mask.any() else None
    base = higher if higher is not None else lower
    params = rows_df.groupby(keys)["parameters"].first()
    lookup = lower.set_index(keys)["score"] if lower is not None else None
    rows = []

    def add(label, r):
        key = (r["kind"], r["rank_label"], r["k"])
        bits = float(lookup.get(key)) if lookup is not None and key in lookup.index else None
        score = float(r["score"]) if higher is not None else None
        rows.append({"mixture": label, "k": int(r["k"]), "score": score, "lower": bits,
                     "utility": score if score is not None else -bits, "parameters": params.get(key)})

    for _, r in base[base["kind"] == "public"].iterrows():
        add("public model alone", r)
    homogeneous = base[base["kind"] == "homogeneous"]
    for k, group in homogeneous.groupby("k"):
        for _, r in group[group["rank_label"] == "full"].iterrows():
            add("all experts full-size (FlexOlmo)", r)
        low = group[group["rank_label"] != "full"]
        if len(low):
            best = low.loc[low["utility"].idxmax()]
            add(f"best homogeneous rank ({best['rank_label']})", best)
    for _, r in base[base["kind"] == "heterogeneous"].sort_values(["rank_label", "k"]).iterrows():
        add(f"heterogeneous: {r['rank_label']}", r)
    return rows


def _section(title: str, body: Callable[[], str]) -> str:
    try:
        return f"## {title}\n\n{body()}\n"
    except FlexmoreError as exc:
        return f"## {title}\n\nNot available: {exc}\n"


def _swept_rank(log2_rank: float, ranks: tuple[int, ...]) -> str:
    """A fitted rank as a number inside the swept ranks, or as '<lowest' / '>highest' outside them."""
    if log2_rank < math.log2(ranks[0]):
        return f"<{ranks[0]}"
    if log2_rank > math.log2(ranks[-1]):
        return f">{ranks[-1]}"
    return f"{2 ** log2_rank:.0f}"


def write_report(results: str | Path, out: str | Path, kinds: dict[str, str] | None = None, bootstrap: int = 200,
                 overwrite: bool = False) -> Path:
    """report.md, report.json and PNG figures in OUT (written to a temporary sibling, renamed at the end)."""
    from . import peaks as peaks_mod
    from . import plots, regression, selection

    df = load_results(results)
    lower = sorted({m for m in df["metric"].unique() if m in LOWER_IS_BETTER})
    data: dict = {"flexmore_version": __version__, "source": str(results), "rows": len(df)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        sections = []

        def headline() -> str:
            rows = headline_rows(df)
            if not rows:
                raise FlexmoreError("no N-expert or public results")
            data["headline"] = rows
            best = max(rows, key=lambda r: r["utility"])
            full = [r for r in rows if r["mixture"].startswith("all experts full")]
            has_acc, has_bits = rows[0]["score"] is not None, rows[0]["lower"] is not None
            header = ["mixture", "k"] + (["accuracy (mean of group means)"] if has_acc else []) + \
                (["bits per byte (mean, lower is better)"] if has_bits else []) + ["parameters"]
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            text = _table(header, [[r["mixture"], r["k"]] + ([fmt(r["score"])] if has_acc else [])
                                   + ([fmt(r["lower"])] if has_bits else []) + [_fmt_params(r["parameters"])]
                                   for r in rows])
            measure = "accuracy" if has_acc else "bits per byte"
            value = (lambda r: r["score"]) if has_acc else (lambda r: r["lower"])
            text += f"\n\nBest by {measure}: **{best['mixture']}** at k={best['k']} ({fmt(value(best))})."
            for f in full:
                rivals = [r for r in rows if r["k"] == f["k"] and r is not f and r["mixture"] != "public model alone"]
                for r in rivals:
                    gap = r["utility"] - f["utility"]
                    verdict = "ties with" if abs(gap) < 1e-9 else "beats" if gap > 0 else "loses to"
                    text += (f"\n- k={f['k']}: {r['mixture']} {verdict} the all-full mixture on {measure} "
                             f"({fmt(value(r))} vs {fmt(value(f))}) with {_fmt_params(r['parameters'])} "
                             f"vs {_fmt_params(f['parameters'])} parameters.")
            return text

        sections.append(_section("Headline", headline))

        def figure(name: str, make) -> str:
            make(tmp / name)
            return f"![{name}]({name})"

        sections.append(_section("Average score vs homogeneous rank (Fig. 2)",
                                 lambda: figure("fig2_average_vs_rank.png", lambda p: plots.plot_average_vs_rank(df, p))))

        def peaks_section() -> str:
            analysis = peaks_mod.analyze_peaks(df)
            data["peaks"] = analysis.to_dict()
            stats = analysis.statistics
            text = "Peak log2 rank per group across experts (ties go to the lowest rank; full counts as one step " \
                   f"above the largest rank, log2 = {analysis.full_log2:g}):\n\n"
            text += _table(["group", "experts", "median", "IQR"],
                           [[r["group"], r["n_experts"], f"{r['median']:.2f}", f"[{r['q1']:.2f}, {r['q3']:.2f}]"]
                            for _, r in stats.iterrows()])
            text += "\n\n" + _table(["expert", "group", "peak rank"],
                                    [[r["expert"], r["group"], r["peak_label"]] for _, r in analysis.peaks.iterrows()])
            return text + "\n\n" + figure("fig3_peak_ranks.png", lambda p: plots.plot_peak_ranks(analysis.peaks, p))

        sections.append(_section("Peak ranks (Fig. 3)", peaks_section))
        sections.append(_section("Score vs rank per group and expert (Fig. 4)",
                                 lambda: figure("fig4_group_vs_rank.png", lambda p: plots.plot_group_vs_rank(df, p))))
        sections.append(_section("Expert x rank", lambda: figure("heatmap.png", lambda p: plots.plot_heatmap(df, p))))
        sections.append(_section("Score vs parameters", lambda: figure("frontier.png", lambda p: plots.plot_frontier(df, p))))

        def regression_section() -> str:
            fit = regression.rank_regression(df, kinds=kinds, bootstrap=bootstrap)
            data["regression"] = fit.to_dict()
            rows = []
            for g in fit.groups:
                b = g.bootstrap
                interval = "-"
                if b and b.low is not None:
                    interval = (f"[{_swept_rank(b.low, g.ranks)}, {_swept_rank(b.high, g.ranks)}] "
                                f"({b.kept}/{b.draws} refits with a maximum)")
                rows.append([g.group, g.n, f"{g.linear.estimate:+.4f} [{g.linear.low:+.4f}, {g.linear.high:+.4f}]",
                             f"{g.quadratic.estimate:+.4f} [{g.quadratic.low:+.4f}, {g.quadratic.high:+.4f}]",
                             f"{g.r_squared:.3f}",
                             "none" if g.vertex_log2 is None else _swept_rank(g.vertex_log2, g.ranks), interval])
            text = ("Per group: utility ~ log2(rank) + log2(rank)^2 + expert fixed effects (finite ranks; 95% CIs; "
                    "optimum rank with a bootstrap interval; 'none': the fit has no maximum; ranks beyond the "
                    "swept range are shown as < or > its ends, since the fit says nothing there).\n\n")
            text += _table(["group", "n", "log2 rank", "log2 rank^2", "R^2", "optimum rank", "bootstrap 95%"], rows)
            if fit.contrast is not None:
                c = fit.contrast
                text += (f"\n\nReasoning vs knowledge groups (L:reasoning = {c.linear_reasoning.estimate:+.4f}, "
                         f"p = {c.linear_reasoning.p_value:.3g}): {c.verdict}")
            for note in fit.notes:
                text += f"\n\nNote: {note}"
            return text

        sections.append(_section("Rank regression", regression_section))

        def selection_section() -> str:
            pairs = df[df["kind"] == "pair"]
            if pairs.empty:
                raise FlexmoreError("no 2-expert results")
            criteria = ["All"] + sorted(pairs["group"].unique())
            picks = {c: selection.select_best(df, by=c) for c in criteria}
            data["selection"] = {c: s.to_dict() for c, s in picks.items()}
            experts = list(next(iter(picks.values())).ranks)
            rows = [[c] + [selection.rank_label(s.ranks[e]) for e in experts] for c, s in picks.items()]
            return ("Best rank per expert by the mean over all groups (All) and by each group; "
                    "`flexmore select` writes these as rank-spec files.\n\n" + _table(["criterion"] + experts, rows))

        sections.append(_section("Rank selection", selection_section))

        groups = df.groupby("group")["metric"].first()
        intro = (f"# FlexMoRE study report\n\nResults: `{results}` ({len(df)} task results; groups: "
                 + ", ".join(f"{g} ({m})" for g, m in groups.items()) + f"). Made by flexmore {__version__}.\n")
        if lower:
            intro += (f"\nScores are the raw metrics; {', '.join(lower)} is lower-is-better, so rankings, peaks and "
                      "regressions use its negation (\"utility\").\n")
        (tmp / "report.md").write_text(intro + "\n" + "\n".join(sections))
        (tmp / "report.json").write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return Path(out)


def _json_default(value):
    if value is pd.NA:
        return None
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
