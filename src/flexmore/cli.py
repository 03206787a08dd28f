"""The `flexmore` command. Each subcommand is a thin layer over a plain Python function."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import FlexmoreError

app = typer.Typer(
    help="Build, measure and run FlexMoRE models: mixtures of rank-heterogeneous experts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
_state = {"debug": False, "quiet": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
):
    _state["debug"] = debug or bool(os.environ.get("FLEXMORE_DEBUG"))
    _state["quiet"] = quiet
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display replaces transformers' bars
    if quiet:
        hf_logging.set_verbosity_error()


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@app.command()
def info(
    path: Annotated[str, typer.Argument(help="Checkpoint directory or hub id (FlexOlmo or FlexMoRE).")],
    ranks: Annotated[
        Optional[str], typer.Option(help="Describe the model with these ranks instead, e.g. 'math=64,code=full' or '256'.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Show the experts (name, rank or full), active k, parameter count, bytes and the saving against all-full experts."""
    from .convert import describe_checkpoint

    d = describe_checkpoint(path, ranks)
    if as_json:
        print(json.dumps(d, indent=2))
        return
    table = Table(title=f"{d['path']} ({d['model_type']})")
    for col in ("#", "expert", "rank", "parameters"):
        table.add_column(col, justify="right" if col != "expert" else "left")
    for x in d["experts"]:
        table.add_row(str(x["index"]), x["name"], "full" if x["rank"] == 0 else str(x["rank"]), f"{x['parameters']:,}")
    out = Console()
    out.print(table)
    out.print(f"active experts per token (k): {d['num_experts_per_tok']} of {len(d['experts'])}")
    out.print(f"parameters: {d['parameters']:,} ({human(d['parameters'])})")
    out.print(f"bytes at {d['dtype']}: {d['bytes']:,} ({human_bytes(d['bytes'])})")
    out.print(
        f"all-full experts: {d['parameters_all_full']:,} parameters ({human(d['parameters_all_full'])}); "
        f"saving {100 * d['saving']:.1f}%"
    )


class Target(str, Enum):
    flexmore = "flexmore"
    flexolmo = "flexolmo"


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Source checkpoint directory or hub id (FlexOlmo or FlexMoRE).")],
    out: Annotated[Path, typer.Argument(help="Output directory (written to a temporary sibling, renamed at the end).")],
    to: Annotated[Target, typer.Option(help="flexmore: keep low-rank experts factored; flexolmo: dense FlexOlmo checkpoint.")],
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Active experts per token in the output.")] = None,
    drop_expert: Annotated[
        Optional[list[str]], typer.Option("--drop-expert", help="Opt an expert out by name or index (repeatable).")
    ] = None,
    names: Annotated[
        Optional[str], typer.Option(help="Comma-separated expert names, public first (for FlexOlmo sources).")
    ] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store weights as float32, bfloat16 or float16.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Convert between FlexOlmo and FlexMoRE checkpoints; choose active k and opt experts out."""
    from .convert import convert_checkpoint

    result = with_progress(
        "converting",
        lambda tick: convert_checkpoint(
            src,
            out,
            to=to.value,
            top_k=top_k,
            drop_experts=tuple(drop_expert or ()),
            expert_names=names.split(",") if names else None,
            dtype=dtype,
            overwrite=overwrite,
            on_tensor=tick,
        ),
    )
    cfg = result.config
    experts = ", ".join(f"{n}:{'full' if r == 0 else r}" for n, r in zip(cfg.expert_names, cfg.expert_ranks))
    console.print(f"wrote {result.out} ({result.target}; experts {experts}; k={cfg.num_experts_per_tok})")


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="Output directory (written to a temporary sibling, renamed at the end).")],
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT",
            help="The owners' 2-expert checkpoints (expert 0 public, expert 1 theirs), optionally preceded by the "
            "public model (a 1-expert checkpoint).",
        ),
    ],
    names: Annotated[
        Optional[str], typer.Option(help="Comma-separated names of the owners' experts, one per owner (not public).")
    ] = None,
    top_k: Annotated[
        Optional[int], typer.Option("--top-k", help="Active experts per token (default: the owners' value).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Merge the owners' domain experts into one mixture; shared weights must be bit-identical across inputs."""
    from .merge import merge_experts

    result = with_progress(
        "merging",
        lambda tick: merge_experts(
            out, inputs, names=names.split(",") if names else None, overwrite=overwrite, top_k=top_k, on_tensor=tick
        ),
    )
    cfg = result.config
    experts = ", ".join(f"{n}:{'full' if r == 0 else r}" for n, r in zip(cfg.expert_names, cfg.expert_ranks))
    console.print(f"wrote {result.out} ({result.target}; experts {experts}; k={cfg.num_experts_per_tok})")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory (a rerun into it resumes finished steps).")] = Path("demo-out"),
    preset: Annotated[str, typer.Option(help="quick (a few minutes on 2 CPU cores) or full (under 30 minutes).")] = "full",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same world, same results.")] = 0,
):
    """The whole FlexMoRE study offline on a tiny world: corpora, tokenizer, public model, owners' experts
    over Flower, merge, SVD cache, sweep, analysis, selections, final model and report."""
    from .world.pipeline import run_demo

    def log(message: str) -> None:  # step names are in square brackets: not rich markup
        console.print(message, markup=False, highlight=False)

    run_demo(out, preset=preset, seed=seed, log=None if _state["quiet"] else log)


class Method(str, Enum):
    auto = "auto"
    exact = "exact"
    randomized = "randomized"


@app.command()
def extract(
    src: Annotated[str, typer.Argument(help="FlexOlmo (or FlexMoRE) checkpoint directory or hub id, 2 or more experts.")],
    out: Annotated[Path, typer.Argument(help="Output FlexMoRE checkpoint (with --sweep: a directory of them).")],
    ranks: Annotated[Optional[str], typer.Option(
        help="Per-expert ranks by name or index: 'math=2048,code=256,news=full', one value for all ('64'), "
             "'energy:0.9' (smallest rank keeping that fraction of the delta's squared norm), or a JSON rank-spec "
             "file. Experts not named stay full-size (or share --budget).")] = None,
    budget: Annotated[Optional[str], typer.Option(
        help="Total parameter budget (e.g. 10.75B): experts not fixed by --ranks get the ranks that keep the most "
             "energy within it (exact allocation).")] = None,
    sweep: Annotated[Optional[str], typer.Option(
        help="Ranks to sweep, e.g. '1,2,4,8,full': one SVD cache in OUT/svd-cache and a checkpoint OUT/rank-R each.")] = None,
    cache_only: Annotated[bool, typer.Option(help="With --sweep: write only the SVD cache.")] = False,
    cache: Annotated[Optional[Path], typer.Option(
        help="SVD cache directory, kept for reuse (default: OUT.svd-cache, removed after success; "
             "with --sweep OUT/svd-cache). A rerun reuses its finished part.")] = None,
    method: Annotated[Method, typer.Option(help="SVD: exact, randomized, or auto (randomized for ranks <= 256).")] = Method.auto,
    compute_dtype: Annotated[str, typer.Option(help="SVD precision: float32 or float64 (bf16/fp16 are upcast).")] = "float32",
    device: Annotated[str, typer.Option(help="Where the SVDs run: cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the randomized SVD.")] = 0,
    oversample: Annotated[Optional[int], typer.Option(
        help="Randomized SVD oversampling (default max(10, rank/4)).")] = None,
    power_iters: Annotated[int, typer.Option(help="Randomized SVD power iterations.")] = 2,
    dtype: Annotated[Optional[str], typer.Option(help="Store weights as float32, bfloat16 or float16.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    verbose: Annotated[bool, typer.Option(help="Print every matrix, not one row per expert and projection.")] = False,
):
    """PHLoRA: turn each domain expert into the public FFN plus a truncated-SVD correction of its own rank."""
    from .extract import SvdSettings
    from .extract import extract as run_extract

    if compute_dtype not in ("float32", "float64"):
        raise FlexmoreError(f"--compute-dtype {compute_dtype!r}: expected float32 or float64")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise FlexmoreError(f"--device {device}: no CUDA device is available")
    settings = SvdSettings(rank=1, method=method.value, compute_dtype=compute_dtype, oversample=oversample,
                           power_iters=power_iters, seed=seed, device=device)
    result = with_progress("extracting", lambda tick: run_extract(
        src, out, ranks=ranks, budget=budget, sweep=sweep, cache_dir=cache, cache_only=cache_only,
        settings=settings, dtype=dtype, overwrite=overwrite, on_step=tick), unit="matrices")
    if sweep is not None:
        for row in result.report["sweep"]:
            console.print(f"rank {row['rank']}: {row['path']} ({row['parameters']:,} parameters)")
        console.print(f"SVD cache: {result.report['cache']}")
    else:
        print_extraction_report(result.report, verbose)
        console.print(f"wrote {result.outputs[0]}" + (f"; SVD cache kept in {result.cache}" if result.cache else ""))


@app.command()
def assemble(
    cache: Annotated[Path, typer.Argument(help="SVD cache written by `flexmore extract` (--sweep or --cache).")],
    out: Annotated[Path, typer.Argument(help="Output FlexMoRE checkpoint.")],
    ranks: Annotated[Optional[str], typer.Option(help="Rank spec, as for `flexmore extract`.")] = None,
    budget: Annotated[Optional[str], typer.Option(help="Parameter budget, as for `flexmore extract`.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store weights as float32, bfloat16 or float16.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    verbose: Annotated[bool, typer.Option(help="Print every matrix.")] = False,
):
    """Build a FlexMoRE checkpoint with any mixture of ranks from an SVD cache, without another SVD."""
    from .extract.pipeline import assemble_from_cache

    report = assemble_from_cache(cache, out, ranks=ranks, budget=budget, dtype=dtype, overwrite=overwrite)
    print_extraction_report(report, verbose)
    console.print(f"wrote {out}")


@app.command(name="eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="FlexMoRE or FlexOlmo checkpoint directory or hub id.")],
    tasks: Annotated[list[str], typer.Option("--tasks", "-t", help=(
        "Named benchmark groups (MC9, GEN5, MMLU, MMLU-Pro, AGIEval, BBH, Math2, Code4: need the dataset hub) "
        "and/or local task files (*.jsonl, or a directory of them). Repeatable or comma-separated."))],
    limit: Annotated[Optional[int], typer.Option(help="At most N instances per task (the paper used 1000).")] = None,
    batch_size: Annotated[str, typer.Option(help="Batch size, or 'auto'.")] = "8",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Active experts per token.")] = None,
    drop_expert: Annotated[Optional[list[str]], typer.Option("--drop-expert", help="Opt an expert out (repeatable).")] = None,
    micro: Annotated[bool, typer.Option(help="Group scores weighted by instances instead of by task.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Evaluate one model with lm-evaluation-harness on benchmark groups and local task files."""
    from .convert import load_model
    from .eval.engine import evaluate, group_scores, mean_of_group_means, resolve_tasks
    from .checkpoint import tokenizer_from_dir

    refs = resolve_tasks(split_items(tasks))
    lm_model = load_model(model, top_k=top_k, drop_experts=tuple(drop_expert or ()), device=device)
    tokenizer = tokenizer_from_dir(Path(lm_model.name_or_path))
    results = evaluate(lm_model, tokenizer, refs, limit=limit, batch_size=parse_batch(batch_size), device=device,
                       progress=not _state["quiet"])
    groups = group_scores(results, micro=micro)
    headline = mean_of_group_means(groups)
    if as_json:
        print(json.dumps({"tasks": [r.__dict__ for r in results], "groups": groups, "mean_of_group_means": headline},
                         indent=2))
        return
    table = Table(title=f"{model}")
    for col in ("task", "group", "metric", "score", "n"):
        table.add_column(col, justify="right" if col in ("score", "n") else "left")
    for r in results:
        table.add_row(r.task, r.group, r.main_metric, f"{r.score:.4f}", str(r.n))
    out = Console()
    out.print(table)
    for group, score in groups.items():
        out.print(f"group {group}: {score:.4f}")
    out.print(f"mean of group means: {headline:.4f}")


def split_items(items: list[str]) -> list[str]:
    return [x.strip() for item in items for x in item.split(",") if x.strip()]


def parse_batch(text: str):
    if text == "auto" or text.startswith("auto:"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise FlexmoreError(f"--batch-size {text!r}: a positive integer or 'auto'")
    return int(text)


@app.command()
def sweep(
    source: Annotated[str, typer.Argument(help="N-expert FlexOlmo (or FlexMoRE) checkpoint with named experts.")],
    tasks: Annotated[list[str], typer.Option("--tasks", "-t", help="Groups and/or local task files, as for `eval`.")],
    db: Annotated[Path, typer.Option(help="SQLite results database (created or resumed).")] = Path("results.sqlite"),
    ranks: Annotated[str, typer.Option(help="Ranks of the sweep, 'full' included.")] = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096,full",
    k: Annotated[Optional[str], typer.Option("--k", help="Active experts of N-expert mixtures, e.g. '2,4,N' (default).")] = None,
    spec: Annotated[Optional[list[str]], typer.Option("--spec", help=(
        "Heterogeneous rank spec: a JSON file from `flexmore select` or an inline spec (repeatable).")),] = None,
    only: Annotated[Optional[str], typer.Option(help=(
        "Mixture kinds to run: comma-separated of public, pair, homogeneous, heterogeneous (default all).")),] = None,
    cache: Annotated[Optional[Path], typer.Option(help="SVD cache (default DB.svd-cache; built or completed as needed).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most N instances per task.")] = None,
    batch_size: Annotated[str, typer.Option(help="Batch size, or 'auto'.")] = "8",
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    ray: Annotated[Optional[str], typer.Option("--ray", help=(
        "Fan mixtures out on Ray: 'auto' (existing cluster), an address, or 'local[:N]'. Needs flexmore[ray].")),] = None,
):
    """Run the paper's study over your experts: 2-expert and N-expert mixtures x ranks x k, resumable."""
    from .eval.sweep import run_sweep

    kinds = ("public", "pair", "homogeneous", "heterogeneous")
    include = tuple(x.strip() for x in only.split(",")) if only else kinds
    bad = [x for x in include if x not in kinds]
    if bad:
        raise FlexmoreError(f"--only: unknown mixture kind {bad[0]!r}; expected some of {', '.join(kinds)}")
    if "heterogeneous" in include and not spec and only:
        raise FlexmoreError("--only heterogeneous needs at least one --spec")
    summary = with_eta("sweeping", lambda tick: run_sweep(
        source, split_items(tasks), db, ranks=ranks, ks=k, specs=list(spec or ()), cache_dir=cache, include=include,
        limit=limit, batch_size=parse_batch(batch_size), device=device, ray_address=ray, on_progress=tick))
    console.print(f"{summary.mixtures} mixtures x {summary.tasks} tasks: {summary.evaluated} evaluated now, "
                  f"{summary.skipped} already in {db} ({summary.seconds:.0f} s)")


@app.command()
def results(
    db: Annotated[Path, typer.Argument(help="SQLite results database written by `flexmore sweep`.")],
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV (long format, every column) instead of a table.")] = False,
    all_metrics: Annotated[bool, typer.Option("--all-metrics", help="Every metric, not only each task's headline.")] = False,
):
    """Print the results of a sweep as a table or CSV."""
    from .eval.store import open_existing, rows_to_csv

    store = open_existing(db)
    rows = store.rows(main_only=not all_metrics)
    if csv_out:
        sys.stdout.write(rows_to_csv(rows))
        return
    table = Table(title=f"{db} ({len(rows)} rows)")
    for col in ("kind", "experts", "rank", "k", "task", "metric", "value", "parameters"):
        table.add_column(col, justify="right" if col in ("k", "value", "parameters") else "left")
    for r in rows:
        experts = ",".join(json.loads(r["experts"]))
        table.add_row(r["kind"], experts, r["rank_label"], str(r["k"]), r["task"], r["metric"], f"{r['value']:.4f}",
                      f"{r['parameters']:,}")
    Console().print(table)


def with_eta(label: str, work):
    """Run work(tick) where tick(done, total, message) drives a progress bar with ETA, unless --quiet."""
    if _state["quiet"] or not console.is_terminal:
        return work(lambda done, total, message: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[message]}"), console=console, transient=True) as progress:
        task = progress.add_task(label, total=None, message="")

        def tick(done: int, total: int, message: str) -> None:
            progress.update(task, completed=done, total=total, message=message[-60:])

        return work(tick)


@app.command()
def select(
    results_path: Annotated[Path, typer.Argument(metavar="RESULTS", help=(
        "Results: a sweep's SQLite database, or a long-format CSV/JSONL (see flexmore.analysis.data).")),],
    out: Annotated[Path, typer.Argument(help="Rank-spec JSON to write (for extract/assemble --ranks, sweep --spec).")],
    by: Annotated[str, typer.Option(help=(
        "Criterion over the 2-expert (pair) results: 'All' (mean of group means) or one group, e.g. MC9.")),] = "All",
    budget: Annotated[Optional[str], typer.Option(help=(
        "Total parameters of the whole mixture, e.g. 10.75B: one rank per expert maximising the summed "
        "criterion within it (exact). Needs --config.")),] = None,
    config: Annotated[Optional[str], typer.Option("--config", help=(
        "Architecture for parameter counts: a preset (flexolmo-7x7b, flexolmo-2x7b), config.json or checkpoint.")),] = None,
    names: Annotated[Optional[str], typer.Option(help="Comma-separated expert names for --config, public first.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Choose one rank per expert from the pair results: best per expert (ties: lowest rank), or within a budget."""
    from .analysis.selection import select_ranks

    selection = select_ranks(results_path, out, by=by, budget=budget, config=config,
                             names=names.split(",") if names else None, overwrite=overwrite)
    table = Table(title=f"{selection.name} ({'budget, ' if selection.budget is not None else ''}"
                        f"criterion {selection.criterion})")
    for col in ("expert", "rank", selection.criterion) + (("parameters",) if selection.parameters is not None else ()):
        table.add_column(col, justify="left" if col == "expert" else "right")
    for expert, rank in selection.ranks.items():
        row = [expert, "full" if rank == 0 else str(rank), f"{selection.values[expert]:.4f}"]
        if selection.expert_parameters is not None:
            row.append(f"{selection.expert_parameters[expert]:,}")
        table.add_row(*row)
    stdout = Console()
    stdout.print(table)
    if selection.parameters is not None:
        limit = f" (budget {selection.budget:,})" if selection.budget is not None else ""
        stdout.print(f"mixture parameters: {selection.parameters:,} ({human(selection.parameters)}){limit}")
    console.print(f"wrote {out}")


@app.command()
def params(
    source: Annotated[str, typer.Argument(help=(
        "A preset (flexolmo-7x7b, flexolmo-2x7b), a config.json, or a checkpoint directory.")),],
    ranks: Annotated[Optional[str], typer.Option(help=(
        "Domain experts' ranks: 'math=64,code=full', one value for all ('256'), or a rank-spec JSON file.")),] = None,
    names: Annotated[Optional[str], typer.Option(help=(
        "Comma-separated expert names, public first (default for flexolmo-7x7b: "
        "public,code,creative,math,news,pes2o,reddit).")),] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Active experts per token (default: the config's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Count parameters from the architecture: total, per expert, shared, router, active per token, bytes, saving.

    Active per token: everything outside the experts, all router rows, and the FFN weights of the k routed
    experts (the public FFN once for any public/low-rank expert, plus factors; a full domain expert its own
    FFN); 'max' is the worst set of k experts, 'mean' the average over all sets of k (uniform routing).
    """
    from .analysis.params import DTYPES, describe_parameters

    report = describe_parameters(source, ranks, names.split(",") if names else None, top_k)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"{source} (H={report.hidden_size}, I={report.intermediate_size}, L={report.num_layers})")
    for col in ("#", "expert", "rank", "parameters"):
        table.add_column(col, justify="left" if col == "expert" else "right")
    for x in report.experts:
        table.add_row(str(x.index), x.name, "full" if x.rank == 0 else str(x.rank), f"{x.parameters:,}")
    table.add_row("", "shared", "", f"{report.shared:,}")
    table.add_row("", "router", "", f"{report.router:,}")
    out = Console()
    out.print(table)
    out.print(f"total parameters: {report.total:,} ({human(report.total)})")
    out.print(f"active per token at k={report.top_k}: max {report.active_max:,} ({human(report.active_max)}), "
              f"mean under uniform routing {human(report.active_mean)}")
    out.print("bytes: " + "; ".join(f"{d} {human_bytes(report.nbytes(d))}" for d in DTYPES))
    out.print(f"all-full experts: {report.all_full_total:,} ({human(report.all_full_total)}); saving "
              f"{report.all_full_total - report.total:,} parameters ({100 * report.saving:.1f}%)")
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="Sweep database, or long-format results (.csv / .jsonl).")],
    out: Annotated[Path, typer.Argument(help="Output directory for report.md, report.json and figures.")],
    kinds: Annotated[Optional[str], typer.Option(help=(
        "Group kinds for the regression contrast, e.g. 'facts=knowledge,arith=reasoning' "
        "(default: the paper's groups' kinds).")),] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap draws for the optimum's interval.")] = 200,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Write the study's report: headline table, Fig. 2-4 style figures, peak ranks, regression, selections."""
    from .analysis.report import write_report

    mapping = parse_kinds(kinds) if kinds else None
    path = write_report(results, out, kinds=mapping, bootstrap=bootstrap, overwrite=overwrite)
    console.print(f"wrote {path / 'report.md'}")


def parse_kinds(text: str) -> dict[str, str]:
    mapping = {}
    for item in text.split(","):
        if "=" not in item:
            raise FlexmoreError(f"--kinds: {item.strip()!r} is not of the form group=knowledge|reasoning")
        group, kind = (x.strip() for x in item.split("=", 1))
        if kind not in ("knowledge", "reasoning"):
            raise FlexmoreError(f"--kinds: {group}: kind {kind!r} must be knowledge or reasoning")
        mapping[group] = kind
    return mapping


_DATA_HELP = ("Documents: .jsonl files (objects with a string 'text' field), .txt files (documents separated by "
              "blank lines), or directories of them.")


@app.command()
def embed(
    public: Annotated[str, typer.Argument(help="Public model checkpoint (FlexOlmo or FlexMoRE; expert 0 is the public FFN).")],
    data: Annotated[list[str], typer.Argument(metavar="DATA", help=_DATA_HELP)],
    out: Annotated[Path, typer.Option("--out", help=(
        "Router-row file to write: ROW.safetensors holding {'router_row': [H]}, plus a ROW.json sidecar.")),],
    max_docs: Annotated[int, typer.Option(help="Embed at most this many documents (a seeded sample when there are more).")] = 1000,
    embedder: Annotated[Optional[str], typer.Option(help=(
        "External embedding model (HF AutoModel directory or id) with the public model's hidden size; default: the "
        "public model's own mean-pooled final hidden states.")),] = None,
    batch_size: Annotated[int, typer.Option(help="Documents per forward pass.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens embedded of each document (the rest is cut).")] = 256,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Compute a domain's router row: the mean embedding of its documents (for train-expert --router-init)."""
    from .training.data import load_texts
    from .training.embed import check_router_row_out, domain_embedding, write_router_row

    check_router_row_out(out, overwrite)
    texts = load_texts(data)
    row = domain_embedding(public, texts, max_docs=max_docs, batch_size=batch_size, seq_len=seq_len, embedder=embedder)
    documents = min(len(texts), max_docs)
    write_router_row(out, row, {
        "operation": "embed", "public": public, "data": data, "documents": documents, "max_docs": max_docs,
        "seq_len": seq_len, "embedder": embedder or "public model (mean-pooled final hidden states)",
    }, overwrite=overwrite)
    console.print(f"wrote {out} (router row of size {row.numel()}, mean of {documents} documents; norm {row.norm():.4f})")


def _train_option(name: str, *flags: str):
    """A train-expert option whose help text is the TrainConfig field's own."""
    from .training.expert import config_help

    return typer.Option(*flags, help=config_help(name))


def _train_default(name: str):
    from .training.expert import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


@app.command(name="train-expert")
def train_expert_command(
    public: Annotated[str, typer.Argument(help="Public model checkpoint (FlexOlmo or FlexMoRE; expert 0 is the public FFN).")],
    data: Annotated[list[str], typer.Argument(metavar="DATA...", help=_DATA_HELP)],
    out: Annotated[Path, typer.Argument(metavar="OUT", help=(
        "Output 2-expert checkpoint (public, NAME): FlexOlmo for --rank 0, FlexMoRE otherwise. Resumable "
        "checkpoints go to OUT.train/ and are removed at the end."))],
    steps: Annotated[int, _train_option("steps")] = _train_default("steps"),
    batch_size: Annotated[int, _train_option("batch_size")] = _train_default("batch_size"),
    seq_len: Annotated[int, _train_option("seq_len")] = _train_default("seq_len"),
    lr: Annotated[float, _train_option("lr")] = _train_default("lr"),
    weight_decay: Annotated[float, _train_option("weight_decay")] = _train_default("weight_decay"),
    warmup_steps: Annotated[int, _train_option("warmup_steps")] = _train_default("warmup_steps"),
    seed: Annotated[int, _train_option("seed")] = _train_default("seed"),
    rank: Annotated[int, _train_option("rank")] = _train_default("rank"),
    negative_bias: Annotated[bool, _train_option("negative_bias")] = _train_default("negative_bias"),
    checkpoint_every: Annotated[int, _train_option("checkpoint_every")] = _train_default("checkpoint_every"),
    router_init: Annotated[Optional[str], _train_option("router_init")] = _train_default("router_init"),
    name: Annotated[Optional[str], _train_option("expert_name", "--name")] = _train_default("expert_name"),
    max_docs_embed: Annotated[int, _train_option("max_docs_embed")] = _train_default("max_docs_embed"),
    device: Annotated[str, _train_option("device")] = _train_default("device"),
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in OUT.train/ (same settings and data).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT (and any checkpoints in OUT.train/) if they exist.")] = False,
):
    """Train one domain expert on your own documents (FlexOlmo recipe): everything but expert 1 and its router row frozen."""
    from .training.expert import TrainConfig, train_expert

    config = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, seed=seed, rank=rank, negative_bias=negative_bias,
                         checkpoint_every=checkpoint_every, router_init=router_init, expert_name=name,
                         max_docs_embed=max_docs_embed, device=device)
    last: dict = {}

    def work(tick):
        def on_step(step: int, loss: float, tokens_per_s: float) -> None:
            last.update(step=step, loss=loss)
            tick(step, steps, f"loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s")

        return train_expert(public, data, out, config, resume=resume, on_step=on_step, overwrite=overwrite)

    path = with_eta("training", work)
    kind = "flexolmo" if rank == 0 else "flexmore"
    expert = name or path.resolve().name
    loss = f", final loss {last['loss']:.4f}" if last else ""
    console.print(f"wrote {path} ({kind}; experts public:full, {expert}:{'full' if rank == 0 else rank}; "
                  f"{steps} steps{loss})")


@app.command()
def federate(
    public: Annotated[str, typer.Argument(help="The public model (a 1-expert checkpoint) every owner trains from.")],
    out: Annotated[Path, typer.Argument(help="Output mixture; OUT.federation.json (bytes per owner) goes next to it.")],
    owner: Annotated[list[str], typer.Option("--owner", help=(
        "An owner as NAME=DATA_PATH (repeatable, in expert order; DATA_PATH may list files with commas). With "
        "--superlink only NAME: each owner's node config says where their data is."))],
    simulation: Annotated[bool, typer.Option("--simulation/--deployment", help=(
        "Simulation: Flower's simulation engine in this process. Deployment: a real SuperLink and one SuperNode "
        "per owner on 127.0.0.1 (or, with --superlink, the owners' own machines)."))] = True,
    superlink: Annotated[Optional[str], typer.Option(help=(
        "HOST:PORT of a running SuperLink the owners' SuperNodes are connected to (implies --deployment).")
    )] = None,
    compress: Annotated[str, typer.Option(help=(
        "Upload of a full expert: full, rank:R (PHLoRA factors of W1 - W0) or energy:F (smallest rank keeping F).")
    )] = "full",
    steps: Annotated[Optional[int], typer.Option(help="Training steps of every owner.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per step.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per training sequence.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Learning-rate warmup steps.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay of the expert.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Training seed.")] = None,
    rank: Annotated[Optional[int], typer.Option(help="0: train full experts; R: train rank-R experts.")] = None,
    negative_bias: Annotated[Optional[bool], typer.Option(
        "--negative-bias/--no-negative-bias", help="FlexOlmo's negative router bias during training.")] = None,
    allow_missing: Annotated[bool, typer.Option(help=(
        "Assemble the owners that were accepted and report the others, instead of writing nothing."))] = False,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Active experts per token (default 2).")] = None,
    node_timeout: Annotated[float, typer.Option(help="Seconds to wait for every owner's node.")] = 120.0,
    device: Annotated[Optional[str], typer.Option(help=(
        "Where owners train in a simulation or loopback deployment (cpu, cuda).") )] = None,
    num_cpus: Annotated[Optional[int], typer.Option(help="Simulation: CPUs for the owners (default: one each).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Collect domain experts from data owners with Flower (each trains locally, uploads once) and merge them."""
    from .federated.run import run_federation_deployment, run_federation_simulation

    owners = []
    for item in owner:
        name, sep, data = item.partition("=")
        if not name.strip() or (sep and not data.strip()) or (not sep and superlink is None):
            raise FlexmoreError(f"--owner {item!r}: expected NAME=DATA_PATH" + ("" if superlink else
                                " (NAME alone only with --superlink)"))
        owners.append((name.strip(), data.strip() or None))
    options = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "warmup_steps": warmup_steps,
               "weight_decay": weight_decay, "seed": seed, "rank": rank, "negative_bias": negative_bias}
    train = {key: value for key, value in options.items() if value is not None}
    common = dict(compression=compress, train=train, allow_missing=allow_missing, top_k=top_k, overwrite=overwrite,
                  node_timeout=node_timeout, device=device)
    if simulation and superlink is None:
        result = run_federation_simulation(public, owners, out, num_cpus=num_cpus, **common)
    else:
        result = run_federation_deployment(public, owners, out, superlink=superlink, **common)
    summary = result.summary
    table = Table(title=f"federation -> {summary['out']}")
    for col in ("owner", "status", "rank", "uploaded", "of full"):
        table.add_column(col, justify="left" if col in ("owner", "status") else "right")
    for name, x in summary["owners"].items():
        table.add_row(name, x["status"], "full" if x["rank"] == 0 else str(x["rank"]), human_bytes(x["bytes"]),
                      f"{100 * x['fraction_of_full']:.1f}%")
    for who, reason in summary["rejected"].items():
        table.add_row(who, "rejected", "", "", "")
    for name in summary["missing"]:
        table.add_row(name, "missing", "", "", "")
    Console().print(table)
    for reason in summary["rejected"].values():
        console.print(f"rejected: {reason}", highlight=False)
    console.print(f"wrote {result.out} (experts {', '.join(summary['expert_names'])}) and {result.summary_file}")


def print_extraction_report(report: dict, verbose: bool = False) -> None:
    """Per expert and matrix (or projection, pooled over layers): rank, retained energy, relative error."""
    table = Table(title="PHLoRA extraction",
                  caption=None if verbose else "per projection: mean retained energy, max error over layers")
    for col in ("expert", "rank", "matrix", "retained energy", "rel. Frobenius error"):
        table.add_column(col, justify="left" if col in ("expert", "matrix") else "right")
    for x in report["experts"]:
        rank = str(x["rank"])
        if not x["matrices"]:
            table.add_row(x["name"], rank, "all", "1.0000", "0.0000")
        groups: dict[str, list] = {}
        for m in x["matrices"]:
            key = f"layer {m['layer']} {m['proj']}" if verbose else m["proj"]
            groups.setdefault(key, []).append(m)
        for key, ms in groups.items():
            energy = sum(m["retained_energy"] for m in ms) / len(ms)
            error = max(m["relative_error"] for m in ms)
            table.add_row(x["name"], rank, key, f"{energy:.4f}", f"{error:.4f}")
    out = Console()
    out.print(table)
    for x in report["experts"]:
        if x.get("note"):
            out.print(f"note: {x['name']}: {x['note']}", highlight=False)
    out.print(f"parameters: {report['parameters']:,} ({human(report['parameters'])}) vs all-full "
              f"{report['parameters_all_full']:,} ({human(report['parameters_all_full'])}); "
              f"bytes at {report['dtype']}: {human_bytes(report['bytes'])} vs {human_bytes(report['bytes_all_full'])}; "
              f"saving {100 * report['saving']:.1f}%")


def with_progress(label: str, work, unit: str = "tensors"):
    """Run work(tick) with a spinner counting ticks (tensors, steps), unless --quiet."""
    if _state["quiet"] or not console.is_terminal:
        return work(lambda _name: None)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn(f"{{task.completed}} {unit}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(label, total=None)
        return work(lambda _name: progress.advance(task))


def main() -> None:
    try:
        app()
    except FlexmoreError as exc:
        if _state["debug"]:
            raise
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
