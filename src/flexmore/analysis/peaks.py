"""Figure 3: at which rank does each expert do best, per benchmark group?

Works on the 2-expert "pair" rows of a results table (data.py): the public model plus one expert at one
rank, k = 2, as the paper swept them (ranks 2^0..2^14 and full, REFERENCE §7).

    curves = rank_curves(df)          # expert x group (+ "Avg") x rank -> group-mean utility
    peaks = peak_ranks(df)            # the best rank per expert and group; ties go to the LOWEST rank
    stats = peak_statistics(peaks)    # median and IQR of log2(peak rank) across experts, per group

A group mean is the mean over the group's tasks (each task counts once); "Avg" is, per expert and
rank, the mean over groups of those group means (the paper's Avg row). "full" (rank 0) sits one step
above the largest swept rank on the log2 axis, log2(max finite rank) + 1, unless `full_as` places it.
The paper reports Avg median 9, IQR [6.75, 10.50], with quartiles by linear interpolation (numpy's
default), which is what peak_statistics computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import FlexmoreError
from .data import FULL

AVG = "Avg"  # the pseudo-group: mean over groups of the group means
PEAK_COLUMNS = ["expert", "group", "peak_rank", "peak_label", "log2_peak", "peak_utility"]
STAT_COLUMNS = ["group", "n_experts", "median", "q1", "q3", "iqr"]


def rank_label(rank: int) -> str:
    return "full" if rank == FULL else str(int(rank))


def pair_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The 2-expert rows (kind "pair"), checked: one k, an expert and a rank on every row."""
    missing = {"kind", "expert", "rank", "k", "task", "group", "utility"} - set(df.columns)
    if missing:
        raise FlexmoreError(f"results table lacks column(s) {', '.join(sorted(missing))}")
    pairs = df[df["kind"] == "pair"]
    if pairs.empty:
        raise FlexmoreError("the results table has no pair rows (kind 'pair': public + one expert at one rank)")
    if pairs["expert"].isna().any() or pairs["rank"].isna().any():
        raise FlexmoreError("pair rows need an expert and a rank on every row")
    ks = sorted({int(k) for k in pairs["k"].dropna()})
    if len(ks) > 1:
        raise FlexmoreError(f"pair rows mix k = {', '.join(map(str, ks))}; filter the table to one k first")
    return pairs


def _check_complete(pairs: pd.DataFrame) -> None:
    """Every rank of an expert in a group must cover the same tasks: a rank missing a hard task would
    look better. Experts (and groups) may have been swept over different ranks."""
    for (expert, group), rows in pairs.groupby(["expert", "group"], sort=True):
        tasks = sorted(set(rows["task"]))
        have = set(zip(rows["rank"].astype(int), rows["task"]))
        ranks = sorted({int(r) for r in rows["rank"]}, key=_rank_order)
        missing = [(r, t) for r in ranks for t in tasks if (r, t) not in have]
        if missing:
            shown = "; ".join(f"rank {rank_label(r)} lacks {t}" for r, t in missing[:3])
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise FlexmoreError(f"expert {expert}, group {group}: incomplete sweep, {shown}{more}; "
                                "the group means would not compare")


def _rank_order(rank: int) -> tuple[int, int]:
    """Sort key: finite ranks ascending, full (0) above all of them."""
    return (1, 0) if rank == FULL else (0, rank)


def full_log2(ranks: Sequence[int], full_as: float | None = None) -> float:
    """Where "full" sits on the log2 axis: `full_as`, else log2(largest finite rank) + 1."""
    if full_as is not None:
        return float(full_as)
    finite = [int(r) for r in ranks if int(r) != FULL]
    if not finite:
        raise FlexmoreError("only full-size pair rows: no swept rank places 'full' on the log2 axis; pass full_as")
    return math.log2(max(finite)) + 1.0


def rank_curves(
    df: pd.DataFrame,
    full_as: float | None = None,
    include_full: bool = True,
    groups: Sequence[str] | None = None,
    avg: bool = True,
) -> pd.DataFrame:
    """Group-mean utility per expert, group and rank, from the pair rows.

    Columns: expert, group, rank (int, 0 = full), rank_label, log2_rank, utility. Groups keep their
    order of first appearance (or the order of `groups`, which restricts them); with `avg` an "Avg"
    pseudo-group follows, the mean over groups of the group means, at the ranks where the expert has
    all of its groups. Within an expert and group every rank must cover the same tasks. Repeated
    measurements of one task are averaged before the group mean, so every task counts once.
    """
    pairs = pair_rows(df)
    if groups is not None:
        absent = [g for g in groups if g not in set(pairs["group"])]
        if absent:
            raise FlexmoreError(f"no pair rows for group(s) {', '.join(absent)}")
        pairs = pairs[pairs["group"].isin(list(groups))]
    if not include_full:
        pairs = pairs[pairs["rank"] != FULL]
        if pairs.empty:
            raise FlexmoreError("no pair rows at a finite rank (only full-size experts)")
    order = list(groups) if groups is not None else list(pd.unique(pairs["group"]))
    if avg and AVG in order:
        raise FlexmoreError(f"a group is named {AVG!r}, the name of the average over groups; rename it")
    _check_complete(pairs)

    frame = pairs[["expert", "rank", "group", "task", "utility"]].astype({"rank": "int64", "utility": "float64"})
    per_task = frame.groupby(["expert", "rank", "group", "task"], as_index=False)["utility"].mean()
    curves = per_task.groupby(["expert", "rank", "group"], as_index=False)["utility"].mean()
    if avg:
        # only ranks at which the expert has every one of its groups: a missing group would shift the mean
        n_groups = curves.groupby("expert")["group"].transform("nunique")
        n_here = curves.groupby(["expert", "rank"])["group"].transform("size")
        complete = curves[n_here == n_groups]
        mean = complete.groupby(["expert", "rank"], as_index=False)["utility"].mean().assign(group=AVG)
        curves = pd.concat([curves, mean], ignore_index=True)
        order.append(AVG)

    ranks = curves["rank"].to_numpy()
    top = full_log2(ranks, full_as) if (ranks == FULL).any() else math.nan
    curves["rank_label"] = [rank_label(r) for r in ranks]
    curves["log2_rank"] = np.where(ranks == FULL, top, np.log2(np.where(ranks == FULL, 1, ranks)))
    curves["_group"] = curves["group"].map({g: i for i, g in enumerate(order)})
    curves["_rank"] = np.where(ranks == FULL, np.iinfo(np.int64).max, ranks)  # full above every rank
    curves = curves.sort_values(["_group", "expert", "_rank"], kind="stable").drop(columns=["_group", "_rank"])
    return curves[["expert", "group", "rank", "rank_label", "log2_rank", "utility"]].reset_index(drop=True)


def peak_ranks(
    df: pd.DataFrame,
    full_as: float | None = None,
    include_full: bool = True,
    groups: Sequence[str] | None = None,
    tie_tolerance: float = 1e-9,
) -> pd.DataFrame:
    """Per expert and group (and "Avg"): the rank with the highest group-mean utility.

    Ranks whose utility is within `tie_tolerance` of the best tie, and a tie goes to the LOWEST rank
    (full counts as the highest). `full_as` places full on the log2 axis (default log2(max rank) + 1);
    `include_full=False` leaves full out. Columns: expert, group, peak_rank (int, 0 = full), peak_label,
    log2_peak, peak_utility.
    """
    curves = rank_curves(df, full_as=full_as, include_full=include_full, groups=groups)
    rows = []
    for (expert, group), curve in curves.groupby(["expert", "group"], sort=False):
        best = curve["utility"].max()
        winner = curve[curve["utility"] >= best - tie_tolerance].iloc[0]  # curves are in rank order
        rows.append({
            "expert": expert, "group": group, "peak_rank": int(winner["rank"]), "peak_label": winner["rank_label"],
            "log2_peak": float(winner["log2_rank"]), "peak_utility": float(winner["utility"]),
        })
    peaks = pd.DataFrame(rows, columns=PEAK_COLUMNS)
    order = {g: i for i, g in enumerate(pd.unique(curves["group"]))}
    peaks = peaks.sort_values(["group", "expert"], key=lambda s: s.map(order) if s.name == "group" else s)
    return peaks.reset_index(drop=True)


def peak_statistics(peaks: pd.DataFrame) -> pd.DataFrame:
    """Per group: median and interquartile range of log2(peak rank) across experts.

    Quartiles by linear interpolation (numpy's default "linear" method): six experts at log2 peaks
    [5, 6, 9, 9, 11, 12] give median 9, Q1 6.75, Q3 10.5. Columns: group, n_experts, median, q1, q3, iqr.
    """
    missing = {"group", "log2_peak"} - set(peaks.columns)
    if missing:
        raise FlexmoreError(f"peak table lacks column(s) {', '.join(sorted(missing))}; pass peak_ranks()'s output")
    rows = []
    for group, rows_of_group in peaks.groupby("group", sort=False):
        values = rows_of_group["log2_peak"].to_numpy(dtype=float)
        q1, median, q3 = np.percentile(values, [25, 50, 75], method="linear")
        rows.append({"group": group, "n_experts": len(values), "median": float(median), "q1": float(q1),
                     "q3": float(q3), "iqr": float(q3 - q1)})
    return pd.DataFrame(rows, columns=STAT_COLUMNS)


@dataclass
class PeakAnalysis:
    """Figure 3 in one object: the per-expert peaks, their per-group statistics, where full sits."""

    peaks: pd.DataFrame  # peak_ranks() columns
    statistics: pd.DataFrame  # peak_statistics() columns
    full_log2: float | None  # log2 position of "full"; None when full was left out or never swept
    include_full: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "peaks": records(self.peaks),
            "statistics": records(self.statistics),
            "full_log2": self.full_log2,
            "include_full": self.include_full,
        }


def analyze_peaks(
    df: pd.DataFrame,
    full_as: float | None = None,
    include_full: bool = True,
    groups: Sequence[str] | None = None,
) -> PeakAnalysis:
    """peak_ranks + peak_statistics, with the log2 position used for full, ready for JSON."""
    peaks = peak_ranks(df, full_as=full_as, include_full=include_full, groups=groups)
    pairs = pair_rows(df)
    if groups is not None:
        pairs = pairs[pairs["group"].isin(list(groups))]
    ranks = [int(r) for r in pairs["rank"]]
    has_full = include_full and FULL in ranks
    return PeakAnalysis(
        peaks=peaks,
        statistics=peak_statistics(peaks),
        full_log2=full_log2(ranks, full_as) if has_full else None,
        include_full=include_full,
    )


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready records: Python scalars, NaN and infinities as None."""
    out = []
    for row in frame.to_dict(orient="records"):
        out.append({str(k): _plain(v) for k, v in row.items()})
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA:
        return None
    return value
