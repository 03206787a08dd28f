"""Choose one rank per domain expert from the 2-expert ("pair") results: what `flexmore select` writes.

Each pair result is public + one domain expert at one rank. Per expert and rank, the criterion's value is
  GROUP  the mean utility over that group's tasks (utility: higher is better; bpb-like metrics negated);
  All    the mean over groups of those group means (every group counts once), the paper's headline.
Two ways to choose:
  best     per expert, the rank with the highest value; ties go to the lowest rank (fewest parameters).
  budget   one rank per expert, among the ranks in the results, maximising the SUMMED value over the experts
           subject to the parameters of the whole N-expert mixture (shared + routers + public + the
           experts at their ranks) staying within the budget. Solved exactly (multiple-choice knapsack over
           Pareto frontiers, see `solve_budget`); ties go to the mixture with fewer parameters.
Parameter costs come from a config (`load_config`: preset, config.json or checkpoint): a rank at or above
the break-even rank costs what a full-size expert does, as extraction and the sweep store it.

The output is a rank-spec file, {"name": ..., "ranks": {expert: rank | "full"}, ...}, that
`flexmore extract --ranks`, `flexmore assemble --ranks` and `flexmore sweep --spec` read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import FULL, FlexMoREConfig, break_even_rank, count_parameters, default_expert_names
from ..errors import FlexmoreError

ALL = "All"
_TIE = 1e-12  # values closer than this (relative) are ties: float sums of equal scores may differ in the last bit


def rank_label(rank: int) -> str | int:
    return "full" if rank == FULL else int(rank)


def _rank_order(rank: int) -> float:
    """Sort key: low ranks first, full last."""
    return float("inf") if rank == FULL else float(rank)


# --------------------------------------------------------------------------------------------------
# Values per expert and rank


def pair_rows(df: pd.DataFrame) -> pd.DataFrame:
    pairs = df[df["kind"] == "pair"]
    if pairs.empty:
        kinds = ", ".join(sorted(set(df["kind"]))) or "none"
        raise FlexmoreError(f"no pair results (2-expert mixtures of public + one expert); the results hold: {kinds}")
    return pairs


def resolve_group(by: str, groups: list[str]) -> str:
    """`All` or one of `groups`, matched exactly or else case-insensitively."""
    if by in groups or by == ALL:
        return by
    folded = [g for g in groups if g.lower() == by.lower()]
    if len(folded) == 1:
        return folded[0]
    if by.lower() == ALL.lower():
        return ALL
    raise FlexmoreError(f"--by {by!r}: no such group in the pair results; known groups: {ALL}, {', '.join(groups)}")


def rank_values(df: pd.DataFrame, by: str = ALL) -> pd.DataFrame:
    """Columns expert, rank, value: the criterion per expert and rank over the pair rows (see module doc).

    Every rank of an expert must cover the same tasks, or the comparison between its ranks would mix
    benchmarks; a gap is an error naming it.
    """
    pairs = pair_rows(df)
    groups = sorted(set(pairs["group"]))
    by = resolve_group(by, groups)
    experts = list(pd.unique(pairs["expert"]))
    if by != ALL:
        missing = [e for e in experts if not (pairs[(pairs["expert"] == e)]["group"] == by).any()]
        if missing:
            raise FlexmoreError(f"--by {by}: expert {missing[0]!r} has no pair results in group {by}")
        pairs = pairs[pairs["group"] == by]
    for expert, rows in pairs.groupby("expert", sort=False):
        tasks = {int(rank): set(zip(r["group"], r["task"])) for rank, r in rows.groupby("rank")}
        union = set().union(*tasks.values())
        for rank, have in tasks.items():
            if have != union:
                group, task = sorted(union - have)[0]
                raise FlexmoreError(
                    f"expert {expert!r} rank {rank_label(int(rank))}: no result for {group}/{task} "
                    f"({len(union - have)} task(s) its other ranks have); ranks must be compared on the same tasks")
    per_group = pairs.groupby(["expert", "rank", "group"], as_index=False)["utility"].mean()
    values = per_group.groupby(["expert", "rank"], as_index=False)["utility"].mean()
    values = values.rename(columns={"utility": "value"})
    values["rank"] = values["rank"].astype(int)
    values["expert"] = pd.Categorical(values["expert"], categories=experts, ordered=True)
    values["_order"] = values["rank"].map(_rank_order)
    values = values.sort_values(["expert", "_order"]).drop(columns="_order").reset_index(drop=True)
    values["expert"] = values["expert"].astype(str)
    values.attrs["criterion"] = by
    return values


# --------------------------------------------------------------------------------------------------
# Parameter costs


@dataclass(frozen=True)
class Costs:
    """Parameter costs of the N-expert mixture: fixed part (shared + routers + public) and per expert rank."""

    fixed: int
    config: FlexMoREConfig

    def expert(self, rank: int) -> int:
        """Parameters of one domain expert at `rank`, stored as extraction stores it."""
        c = self.config
        even = break_even_rank(c.hidden_size, c.intermediate_size)
        stored = FULL if rank == FULL or min(rank, c.max_rank) >= even else rank
        return count_parameters(c, [FULL, stored]).experts[1]


def mixture_costs(config: FlexMoREConfig, experts: list[str]) -> Costs:
    """Costs of public + `experts` with the dimensions of `config`."""
    count = count_parameters(config, [FULL] * (len(experts) + 1))
    return Costs(fixed=count.shared + count.router + count.experts[0], config=config)


def mixture_experts(config: FlexMoREConfig | None, experts: list[str]) -> list[str]:
    """The mixture's domain experts: the config's, when it names them, else the experts in the results."""
    if config is None or config.expert_names == default_expert_names(config.num_experts):
        return experts
    named = config.expert_names[1:]
    for e in named:
        if e not in experts:
            raise FlexmoreError(f"expert {e!r} of the config has no pair results (the results have "
                                f"{', '.join(experts)})")
    for e in experts:
        if e not in named:
            where = "the public expert" if e == config.expert_names[0] else "not one of its experts"
            raise FlexmoreError(f"--config: the results' expert {e!r} is {where} ({', '.join(config.expert_names)})")
    return named


# --------------------------------------------------------------------------------------------------
# Selection


@dataclass(frozen=True)
class Selection:
    """One rank per domain expert, with the criterion's value at it and (given a config) parameter counts."""

    name: str
    criterion: str  # "All" or a group
    ranks: dict[str, int]  # expert -> rank (0 = full), mixture order
    values: dict[str, float]  # expert -> the criterion's value at the chosen rank
    table: pd.DataFrame  # expert, rank, value (+ parameters: the expert's cost) for every candidate
    parameters: int | None = None  # the whole mixture (shared + routers + public + experts)
    expert_parameters: dict[str, int] | None = None
    budget: int | None = None

    def to_dict(self) -> dict:
        """The rank-spec file's content."""
        from .. import __version__

        out = {"name": self.name, "ranks": {e: rank_label(r) for e, r in self.ranks.items()},
               "criterion": self.criterion, "values": dict(self.values)}
        if self.budget is not None:
            out["budget"] = self.budget
        if self.parameters is not None:
            out["parameters"] = self.parameters
        out["flexmore_version"] = __version__
        return out


def _with_costs(values: pd.DataFrame, costs: Costs | None) -> pd.DataFrame:
    values = values.copy()
    if costs is not None:
        values["parameters"] = [costs.expert(int(r)) for r in values["rank"]]
    return values


def _finish(name: str, values: pd.DataFrame, chosen: dict[str, int], experts: list[str], costs: Costs | None,
            budget: int | None = None) -> Selection:
    table = _with_costs(values, costs)
    value_of = {(e, int(r)): float(v) for e, r, v in zip(values["expert"], values["rank"], values["value"])}
    ranks = {e: chosen[e] for e in experts}
    expert_parameters = {e: costs.expert(r) for e, r in ranks.items()} if costs is not None else None
    total = costs.fixed + sum(expert_parameters.values()) if costs is not None else None
    return Selection(name=name, criterion=values.attrs["criterion"], ranks=ranks,
                     values={e: value_of[(e, r)] for e, r in ranks.items()}, table=table, parameters=total,
                     expert_parameters=expert_parameters, budget=budget)


def select_best(df: pd.DataFrame, by: str = ALL, config: FlexMoREConfig | None = None) -> Selection:
    """Per expert, the rank with the best value; ties go to the fewest parameters (the lowest rank)."""
    values = rank_values(df, by)
    experts = mixture_experts(config, list(pd.unique(values["expert"])))
    costs = mixture_costs(config, experts) if config is not None else None
    chosen = {}
    for expert in experts:
        rows = values[values["expert"] == expert]
        best = rows["value"].max()
        ties = rows[rows["value"] >= best - _TIE * max(1.0, abs(best))]
        key = (lambda r: (costs.expert(r), _rank_order(r))) if costs is not None else _rank_order
        chosen[expert] = min((int(r) for r in ties["rank"]), key=key)
    return _finish(f"best-{values.attrs['criterion']}", values, chosen, experts, costs)


def solve_budget(costs: list[list[int]], values: list[list[float]], capacity: int) -> list[int] | None:
    """Exact multiple-choice knapsack: one option per group, summed cost <= capacity, summed value maximal.

    Dynamic programming over Pareto frontiers: after each group, keep only the (cost, value) states that
    no cheaper-or-equal state beats, so every optimal combination survives (its prefix is on the frontier
    or replaceable by one that costs no more and scores no less). Ties in value go to the cheaper state.
    Returns the option index per group, or None when even the cheapest options exceed `capacity`.
    Sizes: frontier x options per step, numpy-vectorised; the frontier never outgrows the distinct costs.
    """
    cost_arrays = [np.asarray(c, dtype=np.int64) for c in costs]
    value_arrays = [np.asarray(v, dtype=np.float64) for v in values]
    cheapest_rest = np.cumsum([0] + [int(c.min()) for c in reversed(cost_arrays)])[::-1]  # min cost of groups i..
    if cheapest_rest[0] > capacity:
        return None
    f_cost, f_value = np.zeros(1, dtype=np.int64), np.zeros(1)
    steps: list[tuple[np.ndarray, np.ndarray]] = []  # per group: parent state and option of each state
    for i, (c, v) in enumerate(zip(cost_arrays, value_arrays)):
        cand_cost = (f_cost[:, None] + c[None, :]).ravel()
        cand_value = (f_value[:, None] + v[None, :]).ravel()
        parent = np.repeat(np.arange(len(f_cost)), len(c))
        option = np.tile(np.arange(len(c)), len(f_cost))
        fits = cand_cost + cheapest_rest[i + 1] <= capacity
        cand_cost, cand_value, parent, option = cand_cost[fits], cand_value[fits], parent[fits], option[fits]
        order = np.lexsort((-cand_value, cand_cost))  # cost ascending, then value descending
        cand_cost, cand_value, parent, option = cand_cost[order], cand_value[order], parent[order], option[order]
        best_before = np.maximum.accumulate(cand_value)
        keep = np.ones(len(cand_cost), dtype=bool)
        keep[1:] = cand_value[1:] > best_before[:-1]  # strictly better than every cheaper (or equal-cost) state
        f_cost, f_value = cand_cost[keep], cand_value[keep]
        steps.append((parent[keep], option[keep]))
    best = f_value.max()
    state = int(np.flatnonzero(f_value >= best - _TIE * max(1.0, abs(best)))[0])  # cheapest of the ties
    picks = []
    for parent, option in reversed(steps):
        picks.append(int(option[state]))
        state = int(parent[state])
    return picks[::-1]


def select_budget(df: pd.DataFrame, budget: int, config: FlexMoREConfig, by: str = ALL,
                  label: str | None = None) -> Selection:
    """One rank per expert maximising the summed value within `budget` parameters for the whole mixture."""
    values = rank_values(df, by)
    experts = mixture_experts(config, list(pd.unique(values["expert"])))
    costs = mixture_costs(config, experts)
    options = [values[values["expert"] == e] for e in experts]
    option_costs = [[costs.expert(int(r)) for r in rows["rank"]] for rows in options]
    picks = solve_budget(option_costs, [list(rows["value"]) for rows in options], budget - costs.fixed)
    if picks is None:
        need = costs.fixed + sum(min(c) for c in option_costs)
        raise FlexmoreError(f"--budget: {budget:,} parameters is too small; the cheapest ranks in the results need "
                            f"{need:,}")
    chosen = {e: int(rows["rank"].iloc[p]) for e, rows, p in zip(experts, options, picks)}
    criterion = values.attrs["criterion"]
    name = f"budget-{label or budget}" + ("" if criterion == ALL else f"-{criterion}")
    return _finish(name, values, chosen, experts, costs, budget)


def check_out(out: Path, overwrite: bool) -> None:
    if out.suffix != ".json":
        raise FlexmoreError(f"{out}: the rank-spec file must end in .json (how --ranks and --spec recognise it)")
    if out.exists() and not overwrite:
        raise FlexmoreError(f"{out}: already exists (pass --overwrite to replace it)")


def write_selection(selection: Selection, out: str | Path, overwrite: bool = False) -> Path:
    """Write the rank-spec JSON through a temporary sibling renamed at the end."""
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(selection.to_dict(), indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def select_ranks(results: str | Path, out: str | Path | None = None, by: str = ALL, budget: str | int | None = None,
                 config: str | Path | FlexMoREConfig | None = None, names: list[str] | None = None,
                 overwrite: bool = False) -> Selection:
    """`flexmore select`: load results, choose (best per expert, or within a budget), write OUT if given."""
    from ..extract.ranks import parse_budget
    from .data import load_results
    from .params import load_config

    if budget is not None and config is None:
        raise FlexmoreError("--budget needs --config (a preset, config.json or checkpoint) to count parameters")
    if out is not None:  # fail on a bad OUT before any work
        check_out(Path(out), overwrite)
    label = None
    if isinstance(budget, str):
        label = budget.strip()
        budget = parse_budget(budget)
    cfg = load_config(config, names, "--config") if isinstance(config, (str, Path)) else config
    df = load_results(results)
    selection = select_best(df, by, cfg) if budget is None else select_budget(df, budget, cfg, by, label)
    if out is not None:
        write_selection(selection, out, overwrite)
    return selection
