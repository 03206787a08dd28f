"""Results tables for the analysis, read from a sweep's SQLite database or a long-format CSV/JSONL.

Long format, one row per mixture x task (CSV with a header, or JSONL objects):
    kind              public | pair | homogeneous | heterogeneous   (default: pair if expert is set,
                      else homogeneous)
    experts           the mixture's experts, public first: JSON list or "public;math;code"   (optional)
    expert            the expert under test of a 2-expert mixture ("math")                  (pair rows)
    rank              an integer >= 1 or "full" (homogeneous and pair rows; a spec label otherwise)
    k                 active experts per token
    task, group       the task and its benchmark group
    score             the task's score (fractions, as lm-eval reports them)
    metric            the metric's name (optional; "bpb" marks lower-is-better scores)
    parameters        total parameters of the mixture (optional)
Results from other harnesses (OLMES output included) fit once written this way. A bad row is an error
naming its line; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd

from ..errors import FlexmoreError
from ..jsonl import jsonl_objects

FULL = 0
LOWER_IS_BETTER = {"bpb", "bits_per_byte", "perplexity", "word_perplexity", "byte_perplexity"}
COLUMNS = ["kind", "experts", "expert", "rank", "rank_label", "k", "task", "group", "metric", "score", "utility",
           "parameters"]
KINDS = ("public", "pair", "homogeneous", "heterogeneous")


def load_results(path: str | Path) -> pd.DataFrame:
    """A DataFrame with COLUMNS; `utility` is the score oriented so that higher is always better."""
    path = Path(path)
    if not path.is_file():
        raise FlexmoreError(f"{path}: no such results file")
    if path.suffix in (".csv", ".jsonl", ".json"):
        records = _read_long(path)
    else:
        records = _read_db(path)
    if not records:
        raise FlexmoreError(f"{path}: no results")
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    for column in ("rank", "parameters", "k"):  # nullable integers: None stays missing, ranks stay ints
        df[column] = df[column].astype("Int64")
    return df


def _read_db(path: Path) -> list[dict]:
    from ..eval.store import open_existing

    store = open_existing(path)
    out = []
    for i, row in enumerate(store.rows(main_only=True), 1):
        label = row["rank_label"]
        out.append(_normalise(f"{path} row {i}", {
            "kind": row["kind"], "experts": json.loads(row["experts"]), "expert": row["expert_under_test"],
            "rank": label if row["kind"] in ("pair", "homogeneous") else None, "rank_label": label,
            "k": row["k"], "task": row["task"], "group": row["task_group"], "metric": row["metric"],
            "score": row["value"], "parameters": row["parameters"],
        }))
    store.close()
    return out


def _read_long(path: Path) -> list[dict]:
    rows: list[tuple[int, dict]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"task", "score"} - set(reader.fieldnames or [])
        if missing:
            raise FlexmoreError(f"{path}:1: the header lacks {', '.join(sorted(missing))}")
        rows = [(i, row) for i, row in enumerate(reader, 2)]
    else:
        rows = list(jsonl_objects(text, path))
    return [_normalise(f"{path}:{i}", row) for i, row in rows]


def parse_rank(value, where: str) -> int:
    text = str(value).strip().lower()
    if text == "full":
        return FULL
    try:
        rank = int(float(text))
    except ValueError:
        raise FlexmoreError(f"{where}: rank {value!r} is not an integer or 'full'") from None
    if rank < 1 or rank != float(text):
        raise FlexmoreError(f"{where}: rank {value!r} must be a positive integer or 'full'")
    return rank


def _normalise(where: str, row: dict) -> dict:
    def get(key):
        value = row.get(key)
        return None if value is None or (isinstance(value, str) and value.strip() == "") else value

    task, group = get("task"), get("group") or get("task_group")
    if task is None:
        raise FlexmoreError(f"{where}: missing task")
    try:
        score = float(get("score") if get("score") is not None else get("value"))
    except (TypeError, ValueError):
        raise FlexmoreError(f"{where}: score {row.get('score')!r} is not a number") from None
    if math.isnan(score) or math.isinf(score):
        raise FlexmoreError(f"{where}: score is {score}")
    expert = get("expert") or get("expert_under_test")
    kind = get("kind") or ("pair" if expert else "homogeneous")
    if kind not in KINDS:
        raise FlexmoreError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    experts = get("experts")
    if isinstance(experts, str):
        experts = json.loads(experts) if experts.startswith("[") else experts.split(";")
    rank_value = get("rank")
    label = get("rank_label")
    rank = None
    if kind in ("pair", "homogeneous"):
        if rank_value is None and label is None:
            raise FlexmoreError(f"{where}: missing rank")
        rank = parse_rank(rank_value if rank_value is not None else label, where)
        label = label or ("full" if rank == FULL else str(rank))
    if kind == "pair" and not expert:
        raise FlexmoreError(f"{where}: a pair row needs its expert")
    try:
        k = int(get("k")) if get("k") is not None else (2 if kind == "pair" else 1)
    except ValueError:
        raise FlexmoreError(f"{where}: k {row.get('k')!r} is not an integer") from None
    parameters = get("parameters")
    try:
        parameters = int(float(parameters)) if parameters is not None else None
    except ValueError:
        raise FlexmoreError(f"{where}: parameters {parameters!r} is not a number") from None
    metric = get("metric") or "score"
    return {
        "kind": kind, "experts": tuple(experts) if experts else None, "expert": expert, "rank": rank,
        "rank_label": label or kind, "k": k, "task": str(task), "group": str(group or task), "metric": metric,
        "score": score, "utility": -score if metric in LOWER_IS_BETTER else score, "parameters": parameters,
    }


def group_means(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean utility and score per group over its tasks (macro), for each combination of `by`."""
    return df.groupby(by + ["group"], dropna=False, as_index=False)[["score", "utility"]].mean()


def average_over_groups(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """The headline: mean of group means (every group counts once), for each combination of `by`."""
    per_group = group_means(df, by)
    return per_group.groupby(by, dropna=False, as_index=False)[["score", "utility"]].mean()
