"""The forward benchmark runs (tiny dimensions) and its built-in correctness checks hold. No timings asserted."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "forward.py"


def test_forward_bench_smoke():
    out = subprocess.run([sys.executable, str(BENCH), "--smoke", "--reps", "1"], capture_output=True, text=True,
                         check=True, timeout=300)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kinds = {r["bench"] for r in rows}
    assert kinds == {"env", "moe_block", "prefill", "decode"}
    for r in rows:
        if r["bench"] == "env":
            continue
        assert r["flexolmo_ms"] > 0 and r["flexmore_ms"] > 0 and r["flop_limit"] > 1
        assert abs(r["speedup_vs_flexolmo"] - r["flexolmo_ms"] / r["flexmore_ms"]) < 0.05 * r["speedup_vs_flexolmo"]
        if "max_rel_diff" in r:  # FlexMoRE and the dense reconstruction compute the same function
            assert r["max_rel_diff"] < 1e-5
    assert "| moe_block |" in out.stdout  # the markdown table follows the JSON lines
