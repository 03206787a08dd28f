"""Peak ranks (Figure 3) and the rank regressions on synthetic pair tables with known answers."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("statsmodels")

from flexmore.analysis.data import COLUMNS, load_results  # noqa: E402
from flexmore.analysis.peaks import AVG, analyze_peaks, peak_ranks, peak_statistics, rank_curves  # noqa: E402
from flexmore.analysis.regression import (  # noqa: E402
    fit_groups,
    fit_kind_contrast,
    rank_regression,
    resolve_kinds,
)
from flexmore.errors import FlexmoreError  # noqa: E402

SWEEP = [2**i for i in range(13)] + [0]  # 1..4096 and full (log2 13 by default)


def quadratic(vertex: float, curvature: float = -0.01, offset: float = 0.0):
    return lambda L: offset + curvature * (L - vertex) ** 2


def pair_table(curves, ranks=SWEEP, tasks=2, noise=0.0, seed=0, full_log2=13.0) -> pd.DataFrame:
    """Pair rows for curves {group: {expert: utility(L)}}: `tasks` tasks per group, each the curve plus
    independent noise; full is evaluated at `full_log2`."""
    rng = np.random.default_rng(seed)
    rows = []
    for group, by_expert in curves.items():
        for expert, curve in by_expert.items():
            for rank in ranks:
                value = curve(full_log2 if rank == 0 else math.log2(rank))
                for t in range(tasks):
                    u = value + noise * rng.standard_normal()
                    rows.append({
                        "kind": "pair", "experts": ("public", expert), "expert": expert, "rank": rank,
                        "rank_label": "full" if rank == 0 else str(rank), "k": 2, "task": f"{group}_t{t}",
                        "group": group, "metric": "acc", "score": u, "utility": u, "parameters": None,
                    })
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"rank": "Int64", "k": "Int64", "parameters": "Int64"})


# --- peaks --------------------------------------------------------------------------------------


FIG3_PEAKS = [5, 6, 9, 9, 11, 12]  # log2 peaks of six experts: the paper's Avg statistics


def test_peaks_found_where_the_generator_put_them():
    experts = {f"e{i}": quadratic(p, offset=0.1 * i) for i, p in enumerate(FIG3_PEAKS)}
    # noise 1e-4 per task: neighbours of a peak are 0.01 lower, so noise cannot move a peak
    peaks = peak_ranks(pair_table({"BBH": experts}, noise=1e-4, tasks=3))
    bbh = peaks[peaks["group"] == "BBH"].set_index("expert")
    assert list(bbh["log2_peak"]) == [float(p) for p in FIG3_PEAKS]
    assert list(bbh["peak_rank"]) == [2**p for p in FIG3_PEAKS]
    assert list(bbh["peak_label"]) == [str(2**p) for p in FIG3_PEAKS]
    assert list(peaks.columns) == ["expert", "group", "peak_rank", "peak_label", "log2_peak", "peak_utility"]
    stats = peak_statistics(peaks).set_index("group")
    assert stats.loc["BBH", ["median", "q1", "q3"]].tolist() == [9.0, 6.75, 10.5]
    assert stats.loc["BBH", "n_experts"] == 6


def test_quartiles_by_linear_interpolation_by_hand():
    values = [12, 5, 9, 11, 6, 9]  # unsorted on purpose
    stats = peak_statistics(pd.DataFrame({"group": "Avg", "log2_peak": values})).iloc[0]
    ordered = sorted(values)

    def linear(q):  # position q (n - 1) between the order statistics around it
        pos = q * (len(ordered) - 1)
        lo = math.floor(pos)
        return ordered[lo] + (pos - lo) * (ordered[min(lo + 1, len(ordered) - 1)] - ordered[lo])

    assert (stats["q1"], stats["median"], stats["q3"]) == (6.75, 9.0, 10.5)
    assert (linear(0.25), linear(0.5), linear(0.75)) == (6.75, 9.0, 10.5)
    assert stats["iqr"] == 3.75


def test_ties_go_to_the_lowest_rank_and_full_counts_highest():
    def plateau(L):  # equal best at ranks 8 and 64 (log2 3 and 6)
        return 0.5 if L in (3.0, 6.0) else 0.4

    def full_ties(L):  # the best finite rank (256) ties with full
        return 0.7 if L in (8.0, 13.0) else 0.3

    df = pair_table({"MC9": {"a": plateau, "b": full_ties}})
    peaks = peak_ranks(df).set_index(["group", "expert"])
    assert peaks.loc[("MC9", "a"), "peak_rank"] == 8
    assert peaks.loc[("MC9", "b"), "peak_rank"] == 256


def test_ties_survive_float_rounding_of_the_group_mean():
    # the same three task scores in another order: their means differ in the last bit (0.19999999999999998
    # at rank 4, 0.20000000000000004 at rank 32), which without a tolerance would make 32 the peak
    scores = {4: [0.1, 0.2, 0.3], 32: [0.3, 0.2, 0.1]}
    rows = [{"kind": "pair", "expert": "a", "rank": r, "rank_label": str(r), "k": 2, "task": f"t{i}",
             "group": "G", "metric": "acc", "score": s, "utility": s}
            for r in (2, 4, 32) for i, s in enumerate(scores.get(r, [0.0, 0.0, 0.0]))]
    df = pd.DataFrame(rows).astype({"rank": "Int64", "k": "Int64"})
    assert peak_ranks(df).set_index("group").loc["G", "peak_rank"] == 4
    assert peak_ranks(df, tie_tolerance=0).set_index("group").loc["G", "peak_rank"] == 32


def test_full_placement_and_exclusion():
    df = pair_table({"MC9": {"a": lambda L: L}})  # utility rises with rank: full is best
    peak = peak_ranks(df).iloc[0]
    assert (peak["peak_rank"], peak["peak_label"], peak["log2_peak"]) == (0, "full", 13.0)  # log2(4096) + 1
    assert peak_ranks(df, full_as=20.0).iloc[0]["log2_peak"] == 20.0
    finite = peak_ranks(df, include_full=False).iloc[0]
    assert (finite["peak_rank"], finite["log2_peak"]) == (4096, 12.0)
    assert analyze_peaks(df).full_log2 == 13.0
    assert analyze_peaks(df, include_full=False).full_log2 is None


def test_avg_is_the_mean_of_group_means_not_of_tasks():
    # MC9 peaks at log2 4, BBH at 8 with equal curvature: the mean of the two peaks at 6. BBH has five
    # tasks and MC9 one; a task-weighted mean would pull the Avg peak towards 8.
    df = pd.concat([pair_table({"MC9": {"a": quadratic(4)}}, tasks=1),
                    pair_table({"BBH": {"a": quadratic(8)}}, tasks=5)], ignore_index=True)
    curves = rank_curves(df)
    assert list(pd.unique(curves["group"])) == ["MC9", "BBH", AVG]
    wide = curves.pivot(index="rank", columns="group", values="utility")
    np.testing.assert_allclose(wide[AVG], (wide["MC9"] + wide["BBH"]) / 2)
    peaks = peak_ranks(df).set_index("group")
    assert peaks.loc[AVG, "log2_peak"] == 6.0
    assert peaks.loc["MC9", "log2_peak"] == 4.0 and peaks.loc["BBH", "log2_peak"] == 8.0


def test_avg_only_at_ranks_where_every_group_was_swept():
    # BBH swept at fewer ranks than MC9: Avg exists only at BBH's ranks, MC9 keeps all of its own
    df = pd.concat([pair_table({"MC9": {"a": quadratic(4)}}),
                    pair_table({"BBH": {"a": quadratic(8)}}, ranks=[16, 64, 256, 0])], ignore_index=True)
    curves = rank_curves(df)
    assert list(curves[curves["group"] == AVG]["rank"]) == [16, 64, 256, 0]
    assert len(curves[curves["group"] == "MC9"]) == len(SWEEP)
    assert peak_ranks(df).set_index("group").loc[AVG, "peak_rank"] == 64


def test_only_pair_rows_count_and_bad_tables_are_named():
    df = pair_table({"MC9": {"a": quadratic(5)}})
    other = df.assign(kind="homogeneous", expert=None, utility=99.0)  # would win everywhere if counted
    assert peak_ranks(pd.concat([df, other], ignore_index=True)).iloc[0]["log2_peak"] == 5.0

    with pytest.raises(FlexmoreError, match="no pair rows"):
        peak_ranks(other)
    with pytest.raises(FlexmoreError, match="mix k = 1, 2"):
        peak_ranks(pd.concat([df, df.assign(k=pd.array([1] * len(df), dtype="Int64"))], ignore_index=True))
    hole = df.drop(index=df[(df["rank"] == 64) & (df["task"] == "MC9_t1")].index)
    with pytest.raises(FlexmoreError, match="expert a, group MC9: incomplete sweep, rank 64 lacks MC9_t1"):
        peak_ranks(hole)


def test_results_file_to_json(tmp_path):
    df = pair_table({"MC9": {"a": quadratic(3)}, "BBH": {"a": quadratic(9)}})
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["kind", "expert", "rank", "k", "task", "group", "metric", "score"])
        writer.writeheader()
        for row in df.itertuples():
            writer.writerow({"kind": "pair", "expert": row.expert, "rank": row.rank_label, "k": 2,
                             "task": row.task, "group": row.group, "metric": "acc", "score": row.score})
    analysis = analyze_peaks(load_results(path))
    peaks = analysis.peaks.set_index("group")["log2_peak"]
    assert (peaks["MC9"], peaks["BBH"]) == (3.0, 9.0)
    text = json.dumps(analysis.to_dict(), allow_nan=False)
    assert json.loads(text)["statistics"][0]["group"] == "MC9"


# --- regression ---------------------------------------------------------------------------------


def _offsets(vertex, n=4, **kw):
    return {f"e{i}": quadratic(vertex, offset=0.05 * i, **kw) for i in range(n)}


def test_group_quadratic_recovers_the_vertex():
    df = pair_table({"MMLU": _offsets(7)}, noise=0.002, seed=1)
    (fit,) = fit_groups(df, bootstrap=200, seed=3)
    assert fit.group == "MMLU" and fit.n == 4 * 13 and fit.n_experts == 4  # full rows left out
    assert fit.ranks == tuple(2**i for i in range(13))
    assert abs(fit.vertex_log2 - 7) < 0.1 and fit.vertex_rank == pytest.approx(2**fit.vertex_log2)
    assert fit.quadratic.low < -0.01 < fit.quadratic.high and fit.quadratic.p_value < 1e-6
    assert fit.linear.low < 0.14 < fit.linear.high  # b1 = -2 * b2 * 7
    assert fit.r_squared > 0.9 and fit.vertex_in_range
    assert fit.optimum.startswith("optimum at log2 rank 7.0")
    boot = fit.bootstrap
    assert boot.low < 7 < boot.high and boot.high - boot.low < 1
    assert boot.draws == 200 and boot.kept + boot.dropped + boot.degenerate == 200
    # seeded: the same interval again
    assert fit_groups(df, bootstrap=200, seed=3)[0].bootstrap == boot


def test_convex_curve_has_no_interior_optimum():
    df = pair_table({"MMLU": _offsets(6, curvature=0.01)}, noise=0.001)
    (fit,) = fit_groups(df, bootstrap=50)
    assert fit.vertex_log2 is None and fit.vertex_rank is None and fit.vertex_in_range is None
    assert fit.optimum.startswith("no interior optimum")
    assert fit.bootstrap.dropped == 50 and fit.bootstrap.kept == 0 and fit.bootstrap.low is None


def test_reasoning_groups_peak_higher_in_the_pooled_model():
    curves = {"MC9": _offsets(4), "MMLU": _offsets(4), "BBH": _offsets(10), "AGIEval": _offsets(10)}
    df = pair_table(curves, noise=0.003, seed=2)
    report = rank_regression(df, bootstrap=20)
    assert report.kinds == {"MC9": "knowledge", "MMLU": "knowledge", "BBH": "reasoning", "AGIEval": "reasoning"}
    c = report.contrast
    assert c.linear_reasoning.estimate > 0 and c.linear_reasoning.p_value < 0.01
    assert c.linear_reasoning.low > 0
    assert abs(c.vertex_reasoning - 10) < 0.2 and abs(c.vertex_knowledge - 4) < 0.2
    assert abs(c.vertex_difference.estimate - 6) < 0.3 and c.vertex_difference.low > 0
    assert c.verdict.startswith("reasoning-heavy groups peak at a higher rank")
    pooled = {curve.group: curve for curve in report.pooled.curves}
    assert all(abs(pooled[g].vertex_log2 - v) < 0.2 for g, v in [("MC9", 4), ("BBH", 10)])
    assert report.pooled.interaction_p < 0.01
    assert [f.group for f in report.groups] == ["MC9", "MMLU", "BBH", "AGIEval"]
    json.dumps(report.to_dict(), allow_nan=False)


def test_no_difference_between_kinds_is_not_claimed():
    curves = {"MC9": _offsets(7), "MMLU": _offsets(7), "BBH": _offsets(7), "AGIEval": _offsets(7)}
    contrast = fit_kind_contrast(pair_table(curves, noise=0.003, seed=5))
    assert contrast.linear_reasoning.p_value > 0.05
    assert contrast.verdict.startswith("no evidence")
    assert abs(contrast.vertex_difference.estimate) < 0.3


def test_too_few_ranks_names_the_group():
    good = pair_table({"MMLU": _offsets(5), "BBH": _offsets(9)})
    thin = pair_table({"tiny_qa": _offsets(5)}, ranks=[4, 16, 0])
    df = pd.concat([good, thin], ignore_index=True)
    with pytest.raises(FlexmoreError, match=r"group tiny_qa: .*at least 3 distinct finite ranks, got 2 \(4, 16\)"):
        rank_regression(df, kinds={"tiny_qa": "knowledge"})
    with pytest.raises(FlexmoreError, match="group tiny_qa"):
        fit_groups(df, groups=["tiny_qa"])


def test_singular_design_is_an_error_not_a_pseudo_inverse_fit():
    # three ranks, but each expert at one of them: L is absorbed by the expert effects
    rows = pd.concat([pair_table({"MMLU": {f"e{r}": quadratic(3)}}, ranks=[r]) for r in (2, 4, 8)],
                     ignore_index=True)
    with pytest.raises(FlexmoreError, match="group MMLU: the design is singular"):
        fit_groups(rows)


def test_group_kinds_come_from_the_registry_or_the_mapping():
    assert resolve_kinds(["mmlu", "BBH", "Code4"]) == {"mmlu": "knowledge", "BBH": "reasoning",
                                                       "Code4": "reasoning"}
    with pytest.raises(FlexmoreError, match="no kind .* for group.s. tiny_qa, tiny_math"):
        resolve_kinds(["MC9", "tiny_qa", "tiny_math"])
    assert resolve_kinds(["MC9", "tiny_qa"], {"tiny_qa": "reasoning", "MC9": "reasoning"}) == {
        "MC9": "reasoning", "tiny_qa": "reasoning"}  # the mapping wins over the registry
    with pytest.raises(FlexmoreError, match="tiny_qa: 'maths'"):
        resolve_kinds(["tiny_qa"], {"tiny_qa": "maths"})

    df = pair_table({"tiny_qa": _offsets(4), "tiny_math": _offsets(9)})
    with pytest.raises(FlexmoreError, match="tiny_qa, tiny_math"):
        rank_regression(df, bootstrap=0)
    report = rank_regression(df, kinds={"tiny_qa": "knowledge", "tiny_math": "reasoning"}, bootstrap=0)
    assert report.contrast.vertex_reasoning > report.contrast.vertex_knowledge


def test_one_kind_only_skips_the_contrast_with_a_note():
    report = rank_regression(pair_table({"MC9": _offsets(4), "MMLU": _offsets(5)}), bootstrap=0)
    assert report.contrast is None and report.pooled is not None
    assert report.notes == ["only knowledge groups: no reasoning vs knowledge contrast"]
    with pytest.raises(FlexmoreError, match="needs both kinds; no reasoning group"):
        fit_kind_contrast(pair_table({"MC9": _offsets(4), "MMLU": _offsets(5)}))
