"""`flexmore report` end to end on synthetic results whose answers are known."""

from __future__ import annotations

import json
import math

from .test_cli import assert_one_error_line, flexmore  # noqa: F401 - flexmore is a fixture

RANKS = [1, 2, 4, 8, 16, 32, 64]
# where each expert's "facts" (knowledge) and "arith" (reasoning) curves peak, in log2 rank
PEAKS = {"code": (2, 5), "chat": (1, 4), "math": (3, 6)}


def synthetic(path):
    rows = []
    for expert, (facts_peak, arith_peak) in PEAKS.items():
        for rank in RANKS + ["full"]:
            log2 = 7 if rank == "full" else math.log2(rank)
            for group, peak, base in (("facts", facts_peak, 0.6), ("arith", arith_peak, 0.4)):
                score = base - 0.01 * (log2 - peak) ** 2
                for task in (1, 2):
                    rows.append({"kind": "pair", "expert": expert, "experts": ["public", expert], "rank": rank,
                                 "k": 2, "task": f"{group}{task}", "group": group, "score": score,
                                 "parameters": 1000 + (40 if rank == "full" else rank) * 10})
    for k in (2, 4):
        for rank in ["4", "full"]:
            for group, value in (("facts", 0.5 + 0.01 * k), ("arith", 0.3 + (0.05 if rank == "4" else 0))):
                rows.append({"kind": "homogeneous", "rank": rank, "k": k, "task": f"{group}1", "group": group,
                             "score": value, "parameters": 2000 if rank == "full" else 1200})
        for group, value in (("facts", 0.58), ("arith", 0.36)):
            rows.append({"kind": "heterogeneous", "rank_label": "best-All", "k": k, "task": f"{group}1",
                         "group": group, "score": value, "parameters": 1300})
    for group, value in (("facts", 0.45), ("arith", 0.2)):
        rows.append({"kind": "public", "rank_label": "public", "k": 1, "task": f"{group}1", "group": group,
                     "score": value, "parameters": 800})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_report_end_to_end(tmp_path, flexmore):
    results = synthetic(tmp_path / "results.jsonl")
    out = tmp_path / "report"
    run = flexmore("report", results, out, "--kinds", "facts=knowledge,arith=reasoning", "--bootstrap", "50")
    assert run.code == 0, run.err
    md = (out / "report.md").read_text()
    for name in ("fig2_average_vs_rank.png", "fig3_peak_ranks.png", "fig4_group_vs_rank.png", "heatmap.png",
                 "frontier.png"):
        assert (out / name).stat().st_size > 10_000 and f"]({name})" in md
    data = json.loads((out / "report.json").read_text())
    head = {(r["mixture"], r["k"]): r for r in data["headline"]}
    assert head[("public model alone", 1)]["score"] == (0.45 + 0.2) / 2
    assert head[("all experts full-size (FlexOlmo)", 4)]["score"] == (0.54 + 0.3) / 2
    assert head[("best homogeneous rank (4)", 2)]["score"] == (0.52 + 0.35) / 2
    assert head[("heterogeneous: best-All", 2)]["parameters"] == 1300
    assert "heterogeneous: best-All beats the all-full mixture" in md
    peaks = {(p["expert"], p["group"]): p["peak_rank"] for p in data["peaks"]["peaks"]}
    for expert, (facts_peak, arith_peak) in PEAKS.items():
        assert peaks[(expert, "facts")] == 2 ** facts_peak and peaks[(expert, "arith")] == 2 ** arith_peak
    fits = {g["group"]: g for g in data["regression"]["groups"]}
    assert abs(fits["arith"]["vertex_log2"] - 5) < 0.05 and abs(fits["facts"]["vertex_log2"] - 2) < 0.05
    assert data["regression"]["contrast"]["linear_reasoning"]["estimate"] > 0
    assert data["selection"]["All"]["ranks"]["math"] in (16, 32)  # All = mean of the two groups' curves
    assert "## Rank regression" in md and "## Peak ranks (Fig. 3)" in md


def test_report_errors(tmp_path, flexmore):
    bad = tmp_path / "bad.csv"
    bad.write_text("task,score,rank,expert\nt1,0.5,abc,math\n")
    assert_one_error_line(flexmore("report", bad, tmp_path / "o"), "bad.csv:2: rank 'abc' is not an integer")
    assert not (tmp_path / "o").exists()
    ok = synthetic(tmp_path / "r.jsonl")
    assert_one_error_line(flexmore("report", ok, tmp_path / "o", "--kinds", "facts=trivia"), "--kinds")


def test_fitted_ranks_beyond_the_sweep_are_not_extrapolated():
    from flexmore.analysis.report import _swept_rank

    ranks = (1, 2, 4, 8, 16, 32, 64)
    assert _swept_rank(5.0, ranks) == "32" and _swept_rank(0.0, ranks) == "1" and _swept_rank(6.0, ranks) == "64"
    assert _swept_rank(140.0, ranks) == ">64"  # a nearly flat quadratic puts its vertex at 2**140
    assert _swept_rank(-3.0, ranks) == "<1"
