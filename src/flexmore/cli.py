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
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Run the smallest end-to-end path: build a tiny model, convert, save, reload, generate."""
    from .demo import run_demo

    run_demo(out, seed=seed, log=None if _state["quiet"] else console.print)


def with_progress(label: str, work):
    """Run work(tick) with a spinner counting ticks (tensors, steps), unless --quiet."""
    if _state["quiet"] or not console.is_terminal:
        return work(lambda _name: None)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} tensors"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(label, total=None)
        return work(lambda _name: progress.advance(task))


def main() -> None:
    try:
        app()
    except FlexmoreError as exc:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
