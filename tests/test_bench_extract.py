"""The extraction benchmark runs (tiny sizes) and its built-in correctness figures hold. No timings asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "extract.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = subprocess.run([sys.executable, str(BENCH), "--smoke", "--workdir", str(tmp_path_factory.mktemp("bench"))],
                         capture_output=True, text=True, check=True, timeout=300)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return rows, out.stdout


def of(rows, kind):
    return [r for r in rows if r["bench"] == kind]


def test_rows_are_well_formed(smoke):
    rows, stdout = smoke
    kinds = {"env", "svd", "extract_memory", "extract_timing", "extract_memory_ratio", "end"}
    assert {r["bench"] for r in rows} == kinds
    env = of(rows, "env")[0]
    assert env["dims"]["ranks"] == [r["rank"] for r in of(rows, "svd")]
    for r in of(rows, "svd"):
        for key in ("exact_s", "randomized_s", "speedup", "exact_error", "randomized_error", "optimal_error",
                    "excess_error", "excess_vs_optimal"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), key
        assert r["randomized_method"] == "randomized"
        assert r["exact_paid_once"] is True
        if r["rank"] <= env["dims"]["target_max_rank"]:
            assert isinstance(r["meets_target"], bool) and r["target"] == {"speedup": 10.0, "excess_error": 0.01}
        else:
            assert "meets_target" not in r
    # the markdown tables follow the JSON lines
    for header in ("| rank | exact s |", "| layers | checkpoint MiB |", "| layers | matrices |"):
        assert header in stdout


def test_svd_errors_are_consistent(smoke):
    rows, _ = smoke
    svd = of(rows, "svd")
    previous = 1.0
    for r in svd:
        # exact SVD is optimal (Eckart-Young) and matches the closed form of the constructed spectrum
        assert r["exact_error"] == pytest.approx(r["optimal_error"], rel=1e-4)
        assert r["randomized_error"] >= r["exact_error"] * (1 - 1e-6)
        assert r["excess_error"] >= -1e-6
        assert r["excess_error"] == pytest.approx(r["randomized_error"] / r["exact_error"] - 1, abs=1e-12)
        assert r["randomized_error"] < previous  # error falls with rank
        previous = r["randomized_error"]
    checked = [r for r in svd if "direct_randomized_error" in r]
    assert len(checked) == 1
    r = checked[0]
    # the spectrum-based error equals ||D - B A||_F / ||D||_F computed from the factors, for both methods
    assert r["direct_randomized_error"] == pytest.approx(r["randomized_error"], rel=1e-4)
    assert r["direct_exact_error"] == pytest.approx(r["exact_error"], rel=1e-4)


def test_memory_rows(smoke):
    rows, _ = smoke
    env = of(rows, "env")[0]
    mem = of(rows, "extract_memory")
    assert [r["layers"] for r in mem] == env["dims"]["layers"]
    for r in mem:
        for key in ("peak_rss_bytes", "vmhwm_bytes", "baseline_rss_bytes", "svd_phase_peak_bytes", "checkpoint_bytes",
                    "output_bytes"):
            assert isinstance(r[key], int) and r[key] > 0, key
        assert r["baseline_rss_bytes"] <= r["svd_phase_peak_bytes"] <= r["peak_rss_bytes"]
        # ru_maxrss counts the extraction's own peak only (none inherited from the benchmark's process)
        assert r["vmhwm_bytes"] <= r["peak_rss_bytes"] <= 1.5 * r["vmhwm_bytes"]  # inherited peaks were 6x
        assert r["output_bytes"] < r["checkpoint_bytes"]  # the low-rank experts are smaller than the dense ones
        assert r["expert_ranks"] == [0] + [env["dims"]["extract_rank"]] * (env["dims"]["experts"] - 1)
    shallow, deep = mem
    assert deep["checkpoint_bytes"] > 2 * shallow["checkpoint_bytes"]
    ratio = of(rows, "extract_memory_ratio")[0]
    assert ratio["peak_ratio"] == pytest.approx(deep["peak_rss_bytes"] / shallow["peak_rss_bytes"])
    assert isinstance(ratio["meets_target"], bool) and ratio["target"] == 1.2


def test_timing_row(smoke):
    rows, _ = smoke
    dims = of(rows, "env")[0]["dims"]
    t = of(rows, "extract_timing")[0]
    assert t["layers"] == max(dims["layers"])
    assert t["matrices"] == t["layers"] * 3 * (dims["experts"] - 1)  # gate, up, down of every domain expert
    assert t["experts_factorised"] == dims["experts"] - 1
    assert set(t["svd_per_expert_s"]) == {f"expert{e}" for e in range(1, dims["experts"])}
    assert t["svd_per_matrix_s"] == pytest.approx(t["svd_seconds"] / t["matrices"])
    assert t["total_per_expert_s"] == pytest.approx(t["total_seconds"] / t["experts_factorised"])
    assert t["timings_source"]
