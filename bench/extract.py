"""Extraction benchmark: randomized vs exact truncated SVD, and the memory and time of `flexmore extract`.

Prints one JSON line per row, then markdown tables.

  python bench/extract.py                  # the full run (about 2 minutes on 2 idle CPU cores)
  python bench/extract.py --smoke          # tiny sizes, seconds: checks the script itself (run by the tests)
  python bench/extract.py --only svd       # or --only memory; --skip-exact leaves out the exact SVD

1. SVD (`bench: svd`). One 4096x11008 fp32 delta D = U diag(s) V^T with U, V random orthonormal
   (`torch.linalg.qr` of Gaussian matrices, seed 1) and a slowly decaying power-law spectrum
   s_i = i^-0.5 (i = 1..4096, no noise floor): half of ||D||_F^2 lies beyond rank ~64, so truncation
   errors are large and a randomized SVD has a hard case (a fast decay would flatter it). Because the
   spectrum is known, the optimal (Eckart-Young) error of every rank is known in closed form too:
   sqrt(sum_{i>r} s_i^2 / sum_i s_i^2), reported as `optimal_error`.
   `truncated_svd(D, max(ranks), method="exact")` is computed once (its time is paid once for all
   ranks but repeated on every row); `method="randomized"` (flexmore's defaults: oversample max(10, rank/4), power_iters 2, seed 0) is
   run per rank (median of `--reps` runs for ranks <= 256, one run above). Errors are
   `Factorization.relative_error` (from the spectrum); for `--check-rank` they are also computed
   directly as ||D - B A||_F / ||D||_F (`direct_*`). speedup = exact s / randomized s,
   excess_error = randomized error / exact error - 1. Target: >= 10x faster and <= 1% excess error
   for ranks <= 256.
2. Memory (`bench: extract_memory`). FlexOlmo checkpoints with 4 and 16 layers of one width
   (hidden 1024, intermediate 2816, 16 heads, 3 experts, vocab 512, fp32, saved in 500 MB shards)
   are generated with `flexmore.tiny`, then `flexmore --quiet extract SRC OUT --ranks 64` runs in a
   fresh interpreter (started through a small launcher, since Linux hands a parent's peak RSS down to
   its children through fork and exec): a few lines that call `flexmore.cli.main()` and report
   `getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux) at exit, the resident set after the imports
   (`baseline`), and the peak reached before the checkpoint is assembled (`svd_phase_peak`, read from
   VmHWM when `pipeline.resolve_and_assemble` is entered; the function itself runs unchanged).
   Target: peak(16 layers) / peak(4 layers) <= 1.2 (streaming: memory does not grow with depth).
3. Time (`bench: extract_timing`), 16-layer run: `timings` of the extraction report (SVD seconds,
   matrices, SVD seconds per expert, total seconds) per matrix and per expert. They are read from
   OUT/extraction_report.json when it has them, otherwise from the report `extract()` returns
   (`timings_source` says which).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmore.extract.svd import truncated_svd
from flexmore.tiny import build_flexolmo, tiny_flexolmo_config


@dataclass
class Dims:
    shape: tuple[int, int]  # the SVD benchmark's delta [out, in]
    ranks: tuple[int, ...]
    check_rank: int  # rank whose error is also computed directly
    target_max_rank: int  # the 10x / 1% target applies to ranks up to this
    hidden: int
    inter: int
    heads: int
    experts: int
    vocab: int
    layers: tuple[int, int]  # (shallow, deep) checkpoints of the memory benchmark
    extract_rank: int
    shard: str  # max_shard_size of the generated checkpoints
    reps: int


FULL = Dims((4096, 11008), (16, 64, 256, 1024), 64, 256, 1024, 2816, 16, 3, 512, (4, 16), 64, "500MB", 3)
SMOKE = Dims((256, 704), (4, 16, 64), 16, 16, 64, 176, 4, 3, 256, (2, 8), 8, "500MB", 1)

TARGET_SPEEDUP = 10.0
TARGET_EXCESS = 0.01
TARGET_MEMORY_RATIO = 1.2


# ---------------------------------------------------------------------------------------------- SVD


def spectrum(k: int) -> torch.Tensor:
    """s_i = i^-0.5, i = 1..k (fp64)."""
    return torch.arange(1, k + 1, dtype=torch.float64) ** -0.5


def optimal_error(s: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the smallest ||D - D_r||_F / ||D||_F of any rank-r matrix, from the known spectrum."""
    sq = s.square()
    return float(sq[rank:].sum() / sq.sum()) ** 0.5


def make_delta(shape: tuple[int, int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """D = U diag(s) V^T (fp32) with random orthonormal U [m, k], V [n, k], k = min(m, n)."""
    m, n = shape
    k = min(m, n)
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = spectrum(k)
    d = (u * s.float()) @ v.T
    del u, v
    return d.contiguous(), s


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def direct_error(d: torch.Tensor, f, rank: int) -> float:
    b, a = f.factors(rank)
    return float((d - b @ a).double().norm() / d.double().norm())


def bench_svd(dims: Dims, skip_exact: bool):
    d, s = make_delta(dims.shape)
    warm = torch.randn(256, 512)  # first-call set-up (BLAS/LAPACK threads) is not any method's cost
    truncated_svd(warm, 8, method="exact")
    truncated_svd(warm, 8, method="randomized")
    exact, exact_s = (None, None) if skip_exact else timed(lambda: truncated_svd(d, max(dims.ranks), method="exact"))
    for rank in dims.ranks:
        reps = dims.reps if rank <= dims.target_max_rank else 1
        times = []
        for _ in range(reps):
            f, seconds = timed(lambda: truncated_svd(d, rank, method="randomized", power_iters=2,
                                                     seed=0))
            times.append(seconds)
        rand_s = statistics.median(times)
        rand_err = f.relative_error(rank)
        opt = optimal_error(s, rank)
        row = {"bench": "svd", "shape": list(dims.shape), "rank": rank, "randomized_method": f.method,
               "randomized_s": round(rand_s, 4), "randomized_reps": reps, "optimal_error": opt,
               "randomized_error": rand_err, "excess_vs_optimal": rand_err / opt - 1}
        if exact is not None:
            exact_err = exact.relative_error(rank)
            speedup = exact_s / rand_s
            excess = rand_err / exact_err - 1
            row.update(exact_s=round(exact_s, 4), exact_paid_once=True, exact_error=exact_err,
                       speedup=round(speedup, 3), excess_error=excess)
        else:
            row.update(exact_s=None, exact_error=None, speedup=None, excess_error=None)
        if rank <= dims.target_max_rank:
            row["target"] = {"speedup": TARGET_SPEEDUP, "excess_error": TARGET_EXCESS}
            row["meets_target"] = None if exact is None else bool(
                row["speedup"] >= TARGET_SPEEDUP and row["excess_error"] <= TARGET_EXCESS)
        if rank == dims.check_rank:
            row["direct_randomized_error"] = direct_error(d, f, rank)
            if exact is not None:
                row["direct_exact_error"] = direct_error(d, exact, rank)
        del f
        yield row


# ------------------------------------------------------------------------------------------- memory

# Runs `flexmore ...` (argv after -c) in this interpreter and writes what it measured to $FLEXMORE_BENCH_PROBE.
_WRAPPER = r"""
import json, os, resource, sys, time
start = time.perf_counter()

def status(key):  # KiB
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

import torch, transformers, safetensors, typer, rich  # the libraries' own footprint: the baseline
import flexmore.cli
import flexmore.extract
import flexmore.extract.pipeline as pipeline
import flexmore.convert, flexmore.checkpoint
probe = {"baseline_rss_kib": status("VmRSS")}

assemble = pipeline.resolve_and_assemble
def probed_assemble(*args, **kwargs):  # entered once every SVD is done: the peak so far is the SVD phase's
    probe["svd_phase_peak_kib"] = status("VmHWM")
    return assemble(*args, **kwargs)
pipeline.resolve_and_assemble = probed_assemble

extract = flexmore.extract.extract  # the CLI imports it at call time, so it gets this wrapper
def reporting_extract(*args, **kwargs):
    result = extract(*args, **kwargs)
    probe["timings"] = result.report.get("timings")
    return result
flexmore.extract.extract = reporting_extract

sys.argv[0] = "flexmore"
code = 0
try:
    flexmore.cli.main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
probe.update(exit_code=code, ru_maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
             vmhwm_kib=status("VmHWM"), wall_s=time.perf_counter() - start)
with open(os.environ["FLEXMORE_BENCH_PROBE"], "w") as f:
    json.dump(probe, f)
sys.exit(code)
"""


# Linux copies a process's peak RSS into its child at fork and keeps it across exec, so a child of this
# (large) interpreter would report this interpreter's peak as its own ru_maxrss. A small launcher in between
# gives the extraction a clean count: its own peak only.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix == ".safetensors")


def make_checkpoint(dims: Dims, layers: int, path: Path) -> int:
    cfg = tiny_flexolmo_config(vocab_size=dims.vocab, hidden_size=dims.hidden, intermediate_size=dims.inter,
                               num_hidden_layers=layers, num_attention_heads=dims.heads, num_experts=dims.experts,
                               num_experts_per_tok=2)
    model = build_flexolmo(cfg, seed=0)
    model.save_pretrained(path, max_shard_size=dims.shard)
    del model
    gc.collect()
    return dir_bytes(path)


def run_extract(src: Path, out: Path, rank: int) -> dict:
    probe_file = out.parent / f"{out.name}.probe.json"
    env = {**os.environ, "FLEXMORE_BENCH_PROBE": str(probe_file)}
    cmd = [sys.executable, "-c", _LAUNCHER, sys.executable, "-c", _WRAPPER,
           "--quiet", "extract", str(src), str(out), "--ranks", str(rank)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not probe_file.is_file():
        raise RuntimeError(f"flexmore extract failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(probe_file.read_text())


def bench_memory(dims: Dims, workdir: Path):
    sources = {}
    for layers in dims.layers:
        src = workdir / f"flexolmo-{layers}l"
        sources[layers] = (src, make_checkpoint(dims, layers, src))
    peaks = {}
    for layers in dims.layers:
        src, nbytes = sources[layers]
        out = workdir / f"flexmore-{layers}l"
        probe = run_extract(src, out, dims.extract_rank)
        report = json.loads((out / "extraction_report.json").read_text())
        kib = 1024
        row = {"bench": "extract_memory", "layers": layers, "hidden": dims.hidden, "intermediate": dims.inter,
               "experts": dims.experts, "rank": dims.extract_rank, "checkpoint_bytes": nbytes,
               "output_bytes": dir_bytes(out), "peak_rss_bytes": probe["ru_maxrss_kib"] * kib,
               "vmhwm_bytes": probe["vmhwm_kib"] * kib, "baseline_rss_bytes": probe["baseline_rss_kib"] * kib,
               "svd_phase_peak_bytes": probe["svd_phase_peak_kib"] * kib, "process_wall_s": round(probe["wall_s"], 3),
               "expert_ranks": report["expert_ranks"]}
        peaks[layers] = row
        yield row
        if layers == max(dims.layers):
            yield timing_row(dims, layers, report, probe)
    shallow, deep = (peaks[n] for n in dims.layers)

    def ratio(key: str, minus: str | None = None) -> float:
        sub = (lambda r: r[minus]) if minus else (lambda r: 0)
        return (deep[key] - sub(deep)) / max(1, shallow[key] - sub(shallow))

    yield {"bench": "extract_memory_ratio", "layers": list(dims.layers),
           "checkpoint_ratio": deep["checkpoint_bytes"] / shallow["checkpoint_bytes"],
           "peak_ratio": ratio("peak_rss_bytes"), "target": TARGET_MEMORY_RATIO,
           "meets_target": bool(ratio("peak_rss_bytes") <= TARGET_MEMORY_RATIO),
           "peak_above_baseline_ratio": ratio("peak_rss_bytes", "baseline_rss_bytes"),
           "svd_phase_peak_ratio": ratio("svd_phase_peak_bytes"),
           "svd_phase_above_baseline_ratio": ratio("svd_phase_peak_bytes", "baseline_rss_bytes")}


def timing_row(dims: Dims, layers: int, report: dict, probe: dict) -> dict:
    # extract()'s returned report adds total_seconds to the timings its extraction_report.json holds
    t, source = probe["timings"], "extract() report"
    assert report["timings"]["matrices"] == t["matrices"], "extraction_report.json disagrees with extract()"
    factorised = len(t["per_expert_seconds"])
    return {"bench": "extract_timing", "layers": layers, "rank": dims.extract_rank, "timings_source": source,
            "matrices": t["matrices"], "experts_factorised": factorised, "svd_seconds": t["svd_seconds"],
            "svd_per_matrix_s": t["svd_seconds"] / max(1, t["matrices"]),
            "svd_per_expert_s": t["per_expert_seconds"], "total_seconds": t["total_seconds"],
            "total_per_expert_s": t["total_seconds"] / max(1, factorised),
            "total_per_matrix_s": t["total_seconds"] / max(1, t["matrices"]),
            "process_wall_s": round(probe["wall_s"], 3)}


# ----------------------------------------------------------------------------------------- output


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


SVD_HEADER = ("| rank | exact s | randomized s | speedup | optimal err | exact err | randomized err | excess err "
              "| target |\n|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
MEMORY_HEADER = ("| layers | checkpoint MiB | output MiB | baseline MiB | SVD-phase peak MiB | peak RSS MiB "
                 "| process s |\n|---:|---:|---:|---:|---:|---:|---:|")
TIMING_HEADER = ("| layers | matrices | SVD s | SVD s / matrix | SVD s / expert | total s | total s / expert "
                 "| total s / matrix |\n|---:|---:|---:|---:|---:|---:|---:|---:|")


def markdown(rows: list[dict]) -> str:
    out = []
    svd = [r for r in rows if r["bench"] == "svd"]
    if svd:
        out.append(SVD_HEADER)
        for r in svd:
            has = r["exact_error"] is not None
            if "meets_target" not in r:
                target = "-"
            else:
                target = {None: "?", True: "met", False: "missed"}[r["meets_target"]]
            exact_s = f"{r['exact_s']:.2f}" if has else "-"
            speedup = f"{r['speedup']:.1f}x" if has else "-"
            exact_err = f"{r['exact_error']:.5f}" if has else "-"
            if has:
                excess = f"{100 * r['excess_error']:+.3f}%"
            else:
                excess = f"{100 * r['excess_vs_optimal']:+.3f}% (vs optimal)"
            out.append(f"| {r['rank']} | {exact_s} | {r['randomized_s']:.2f} | {speedup} | {r['optimal_error']:.5f} | "
                       f"{exact_err} | {r['randomized_error']:.5f} | {excess} | {target} |")
        out.append("")
    mem = [r for r in rows if r["bench"] == "extract_memory"]
    if mem:
        out.append(MEMORY_HEADER)
        for r in mem:
            out.append(f"| {r['layers']} | {mib(r['checkpoint_bytes'])} | {mib(r['output_bytes'])} | "
                       f"{mib(r['baseline_rss_bytes'])} | {mib(r['svd_phase_peak_bytes'])} | "
                       f"{mib(r['peak_rss_bytes'])} | {r['process_wall_s']:.1f} |")
        for r in rows:
            if r["bench"] == "extract_memory_ratio":
                a, b = r["layers"]
                verdict = "met" if r["meets_target"] else "missed"
                out.append(f"| {b}/{a} | {r['checkpoint_ratio']:.2f}x | | | {r['svd_phase_peak_ratio']:.2f}x | "
                           f"**{r['peak_ratio']:.2f}x** (target <= {r['target']}x: {verdict}) | |")
        out.append("")
    for r in rows:
        if r["bench"] == "extract_timing":
            per_expert = ", ".join(f"{k} {v:.2f}" for k, v in r["svd_per_expert_s"].items())
            out += [TIMING_HEADER,
                    f"| {r['layers']} | {r['matrices']} | {r['svd_seconds']:.2f} | {r['svd_per_matrix_s']:.3f} | "
                    f"{per_expert} | {r['total_seconds']:.2f} | {r['total_per_expert_s']:.2f} | "
                    f"{r['total_per_matrix_s']:.3f} |", ""]
    return "\n".join(out).rstrip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script in seconds")
    parser.add_argument("--only", choices=["svd", "memory"], help="run one part only (memory includes the timings)")
    parser.add_argument("--skip-exact", action="store_true", help="no exact SVD (errors compared with the optimum)")
    parser.add_argument("--reps", type=int, help="randomized SVD runs per rank <= the target's (median taken)")
    parser.add_argument("--workdir", type=Path, help="where checkpoints are generated (default: a temporary dir)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    d = SMOKE if args.smoke else FULL
    if args.reps:
        d.reps = args.reps
    print(json.dumps({"bench": "env", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "device": "cpu", "loadavg_start": os.getloadavg(),
                      "spectrum": "s_i = i^-0.5", "dims": d.__dict__}), flush=True)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.only in (None, "svd"):
        for r in bench_svd(d, args.skip_exact):
            emit(r)
        gc.collect()
    if args.only in (None, "memory"):
        with tempfile.TemporaryDirectory(prefix="flexmore-bench-", dir=args.workdir) as tmp:
            for r in bench_memory(d, Path(tmp)):
                emit(r)
    print(json.dumps({"bench": "end", "wall_s": round(time.perf_counter() - started, 1),
                      "loadavg_end": os.getloadavg()}), flush=True)
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
