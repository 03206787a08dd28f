"""Rank selection from pair results (analysis/selection.py) and parameter accounting (analysis/params.py).

Known answers:
  best     per expert the argmax of the mean of group means (not of the task mean), or of one group;
           bpb-like metrics count lower as better; ties (to the last float bit) go to the lowest rank;
  budget   the exact optimum of the multiple-choice knapsack, checked against brute force over every
           combination and an independent DP over parameter units, on an instance built so that the
           greedy best-gain-per-parameter upgrade gets it wrong;
  params   33,270,665,216 for the 7x7B preset, 10.75B for six low-rank experts with ranks summing to 2380,
           and, on tiny configs, exactly the parameters of the built FlexMoREForCausalLM; active counts equal
           a brute-force count of the model's weights each set of k experts reads;
  CLI      both commands in-process; the written spec is read back by parse_rank_spec and sweep's load_specs;
           bad input is one error line, exit 2, nothing overwritten.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from functools import reduce
from pathlib import Path

import numpy as np
import pytest

from flexmore.analysis.data import load_results
from flexmore.analysis.params import active_parameters, describe_parameters, load_config
from flexmore.analysis.selection import mixture_costs, rank_values, select_best, select_budget, solve_budget
from flexmore.config import FULL, FlexMoREConfig, count_parameters, parse_rank_spec
from flexmore.errors import FlexmoreError
from flexmore.eval.sweep import load_specs
from flexmore.extract.ranks import parse_policy
from flexmore.modeling import FlexMoREForCausalLM

from .test_cli import assert_one_error_line, flexmore  # noqa: F401  (fixture)

# Tiny architecture for budgets: unit = 3 (H + I) L = 576 parameters per rank, full expert 3 H I L = 12,288,
# break-even rank ceil(H I / (H + I)) = 22.
H, I, L = 32, 64, 2
UNIT, FULL_COST = 3 * (H + I) * L, 3 * H * I * L


def tiny_config(num_experts: int = 3, **kw) -> FlexMoREConfig:
    base = dict(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                num_experts=num_experts, num_experts_per_tok=min(2, num_experts), pad_token_id=0)
    base.update(kw)
    return FlexMoREConfig(**base)


def write_results(path: Path, table: dict, metric: dict | None = None, extra: list[dict] = ()) -> Path:
    """table[expert][rank][(group, task)] = score -> a long CSV of pair rows (rank 0 = full)."""
    metric = metric or {}
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["kind", "expert", "rank", "task", "group", "metric", "score"])
        w.writeheader()
        for expert, ranks in table.items():
            for rank, scores in ranks.items():
                for (group, task), score in scores.items():
                    w.writerow({"kind": "pair", "expert": expert, "rank": "full" if rank == FULL else rank,
                                "task": task, "group": group, "metric": metric.get(group, "acc"), "score": score})
        for row in extra:
            w.writerow(row)
    return path


def flat(values: dict[int, float], group: str = "G", task: str = "t") -> dict:
    """One task per rank: rank -> {(group, task): score}."""
    return {rank: {(group, task): v} for rank, v in values.items()}


# --------------------------------------------------------------------------------------------------
# Best rank per expert


# math: All (mean of group means) peaks at rank 2; the plain task mean would pick 1 or full; MC peaks at full,
# GEN at 2. code: All peaks at 8, MC at 1.
TWO_GROUPS = {
    "math": {
        1: {("MC", "a"): 0.5, ("MC", "b"): 0.5, ("GEN", "c"): 0.2},  # All .35, task mean .40
        2: {("MC", "a"): 0.3, ("MC", "b"): 0.3, ("GEN", "c"): 0.45},  # All .375, task mean .35
        FULL: {("MC", "a"): 0.6, ("MC", "b"): 0.6, ("GEN", "c"): 0.0},  # All .30, task mean .40
    },
    "code": {
        1: {("MC", "a"): 0.9, ("MC", "b"): 0.7, ("GEN", "c"): 0.1},  # All .45
        8: {("MC", "a"): 0.5, ("MC", "b"): 0.5, ("GEN", "c"): 0.6},  # All .55
        FULL: {("MC", "a"): 0.4, ("MC", "b"): 0.4, ("GEN", "c"): 0.5},  # All .45
    },
}


def test_best_by_all_uses_the_mean_of_group_means(tmp_path: Path) -> None:
    df = load_results(write_results(tmp_path / "r.csv", TWO_GROUPS))
    sel = select_best(df)
    assert sel.name == "best-All" and sel.criterion == "All"
    assert sel.ranks == {"math": 2, "code": 8}
    assert sel.values == pytest.approx({"math": 0.375, "code": 0.55})
    assert sel.parameters is None  # no config, no counts


def test_best_by_one_group(tmp_path: Path) -> None:
    df = load_results(write_results(tmp_path / "r.csv", TWO_GROUPS))
    assert select_best(df, "MC").ranks == {"math": FULL, "code": 1}
    sel = select_best(df, "gen")  # group names match case-insensitively
    assert sel.name == "best-GEN" and sel.ranks == {"math": 2, "code": 8}


def test_lower_is_better_metrics_are_negated(tmp_path: Path) -> None:
    df = load_results(write_results(tmp_path / "r.csv", {"math": flat({1: 1.3, 4: 0.9, FULL: 1.1}, "BPB")},
                                    metric={"BPB": "bpb"}))
    sel = select_best(df, "BPB")
    assert sel.ranks == {"math": 4} and sel.values == {"math": pytest.approx(-0.9)}


def test_ties_go_to_the_lowest_rank(tmp_path: Path) -> None:
    # rank 4 averages (0.15, 0.15) = 0.15; rank 8 averages (0.1, 0.2) = 0.15000000000000002: a tie in all but
    # the last bit. full ties exactly with rank 2 for `code`.
    table = {
        "math": {2: {("G", "a"): 0.1, ("G", "b"): 0.1}, 4: {("G", "a"): 0.15, ("G", "b"): 0.15},
                 8: {("G", "a"): 0.1, ("G", "b"): 0.2}, FULL: {("G", "a"): 0.15, ("G", "b"): 0.15}},
        "code": {FULL: {("G", "a"): 0.5, ("G", "b"): 0.5}, 2: {("G", "a"): 0.5, ("G", "b"): 0.5},
                 1: {("G", "a"): 0.4, ("G", "b"): 0.4}},
    }
    df = load_results(write_results(tmp_path / "r.csv", table))
    assert select_best(df).ranks == {"math": 4, "code": 2}
    # with a config: ranks at or above break-even (22) cost a full expert; the tie still goes to the lowest rank
    table = {"math": flat({4: 0.5, 24: 0.7, 32: 0.7, FULL: 0.7})}
    sel = select_best(load_results(write_results(tmp_path / "r2.csv", table)), config=tiny_config())
    assert sel.ranks == {"math": 24} and sel.expert_parameters == {"math": FULL_COST}


def test_rank_values_table(tmp_path: Path) -> None:
    values = rank_values(load_results(write_results(tmp_path / "r.csv", TWO_GROUPS)))
    assert list(values["expert"]) == ["math"] * 3 + ["code"] * 3  # results order, ranks ascending, full last
    assert list(values["rank"]) == [1, 2, FULL, 1, 8, FULL]


@pytest.mark.parametrize(
    ("call", "mentions"),
    [
        (lambda df: select_best(df, "BBH"), ["--by 'BBH'", "known groups: All, GEN, MC"]),
        (lambda df: select_budget(df, 10**9, tiny_config(num_experts=3, expert_names=["public", "math", "news"])),
         ["'news'", "no pair results"]),
        (lambda df: select_budget(df, 100, tiny_config()), ["too small", "need"]),
        (lambda df: select_best(df, config=tiny_config(num_experts=2, expert_names=["public", "code"])),
         ["'math'", "not one of its experts"]),
    ],
)
def test_selection_errors(tmp_path: Path, call, mentions: list[str]) -> None:
    df = load_results(write_results(tmp_path / "r.csv", TWO_GROUPS))
    with pytest.raises(FlexmoreError) as err:
        call(df)
    for text in mentions:
        assert text in str(err.value)
    assert "\n" not in str(err.value)


def test_errors_for_missing_pairs_group_coverage_and_tasks(tmp_path: Path) -> None:
    only_homogeneous = write_results(tmp_path / "h.csv", {}, extra=[
        {"kind": "homogeneous", "rank": 4, "task": "t", "group": "G", "score": 0.5}])
    with pytest.raises(FlexmoreError, match="no pair results"):
        select_best(load_results(only_homogeneous))
    table = {"math": flat({1: 0.1, 2: 0.2}, "MC"), "code": flat({1: 0.1, 2: 0.2}, "GEN")}
    df = load_results(write_results(tmp_path / "g.csv", table))
    with pytest.raises(FlexmoreError, match="expert 'code' has no pair results in group MC"):
        select_best(df, "MC")
    gappy = {"math": {1: {("G", "a"): 0.1, ("G", "b"): 0.2}, 2: {("G", "a"): 0.9}}}
    with pytest.raises(FlexmoreError, match="expert 'math' rank 2: no result for G/b"):
        select_best(load_results(write_results(tmp_path / "t.csv", gappy)))


# --------------------------------------------------------------------------------------------------
# Budget: exact multiple-choice knapsack


def brute_force(costs: list[list[int]], values: list[list[float]], capacity: int):
    """(best value, fewest parameters among the best) over every combination, or None."""
    best = None
    for combo in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[i] for c, i in zip(costs, combo))
        if cost > capacity:
            continue
        value = sum(v[i] for v, i in zip(values, combo))
        if best is None or value > best[0] + 1e-12 or (abs(value - best[0]) <= 1e-12 and cost < best[1]):
            best = (value, cost)
    return best


def greedy_by_ratio(costs: list[list[int]], values: list[list[float]], capacity: int) -> list[int]:
    """The tempting heuristic: start from the cheapest options, take the best gain per parameter that fits."""
    picks = [int(np.argmin(c)) for c in costs]
    while True:
        spent = sum(c[p] for c, p in zip(costs, picks))
        moves = [((v[o] - v[p]) / (c[o] - c[p]), g, o) for g, (c, v, p) in enumerate(zip(costs, values, picks))
                 for o in range(len(c)) if c[o] > c[p] and v[o] > v[p] and spent + c[o] - c[p] <= capacity]
        if not moves:
            return picks
        _, g, o = max(moves)
        picks[g] = o


def test_budget_beats_greedy_on_a_known_instance(tmp_path: Path) -> None:
    # a: rank 2 gains 0.3 for one unit of rank (best ratio); b: full gains 0.5 for 11,712 parameters more.
    # Budget = fixed + a at rank 1 + b full: greedy upgrades a first and can then no longer afford b.
    table = {"a": flat({1: 0.0, 2: 0.3, FULL: 0.3}), "b": flat({1: 0.0, 2: 0.0, FULL: 0.5})}
    df = load_results(write_results(tmp_path / "r.csv", table))
    config = tiny_config(num_experts=3)
    fixed = mixture_costs(config, ["a", "b"]).fixed
    budget = fixed + UNIT + FULL_COST
    sel = select_budget(df, budget, config)
    assert sel.ranks == {"a": 1, "b": FULL} and sum(sel.values.values()) == pytest.approx(0.5)
    assert sel.parameters == budget == count_parameters(config, [FULL, 1, FULL]).total
    assert sel.name == f"budget-{budget}"
    costs = [[UNIT, 2 * UNIT, FULL_COST]] * 2
    values = [[0.0, 0.3, 0.3], [0.0, 0.0, 0.5]]
    greedy = greedy_by_ratio(costs, values, budget - fixed)
    assert sum(v[p] for v, p in zip(values, greedy)) == pytest.approx(0.3)  # the heuristic is really wrong here
    assert brute_force(costs, values, budget - fixed) == pytest.approx((0.5, UNIT + FULL_COST))
    # one parameter less and b cannot be full: the optimum becomes a at rank 2
    assert select_budget(df, budget - 1, config).ranks == {"a": 2, "b": 1}


@pytest.mark.parametrize("seed", range(40))
def test_solve_budget_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    groups, options = rng.randint(1, 5), rng.randint(1, 6)
    costs = [[rng.randint(1, 40) for _ in range(options)] for _ in range(groups)]
    # integer values make exact ties common: the tie-break (fewest parameters) is checked too
    values = [[float(rng.randint(0, 4)) if seed % 2 else rng.random() for _ in range(options)] for _ in range(groups)]
    capacity = rng.randint(sum(map(min, costs)) - 3, sum(map(max, costs)))
    expected = brute_force(costs, values, capacity)
    picks = solve_budget(costs, values, capacity)
    if expected is None:
        assert picks is None
        return
    value = sum(v[p] for v, p in zip(values, picks))
    cost = sum(c[p] for c, p in zip(costs, picks))
    assert cost <= capacity and (value, cost) == pytest.approx(expected)


def test_budget_on_the_paper_sizes_matches_a_dp_over_parameter_units() -> None:
    """6 experts x 16 ranks (2^0..2^14, full) of the 7x7B preset within 10.75B, against a DP over gcd units."""
    rng = np.random.default_rng(0)
    config = load_config("flexolmo-7x7b")
    names = config.expert_names[1:]
    ranks = [2**i for i in range(15)] + [FULL]
    costs_of = mixture_costs(config, names)
    costs = [[costs_of.expert(r) for r in ranks] for _ in names]
    peaks = rng.uniform(4, 13, len(names))  # noisy unimodal utility in log2 rank, as Figure 3's curves
    values = [[float(-(np.log2(r or 2**15) - p) ** 2 / 50 + rng.normal(0, 0.01)) for r in ranks] for p in peaks]
    capacity = 10_750_000_000 - costs_of.fixed
    picks = solve_budget(costs, values, capacity)
    got = sum(v[p] for v, p in zip(values, picks))
    assert sum(c[p] for c, p in zip(costs, picks)) <= capacity
    unit = reduce(math.gcd, [c for row in costs for c in row])
    slots = capacity // unit
    best = np.zeros(slots + 1)  # best[s] = best value of the experts so far within s units
    for row_costs, row_values in zip(costs, values):
        new = np.full(slots + 1, -np.inf)
        for c, v in zip(row_costs, row_values):
            u = c // unit
            if u <= slots:
                new[u:] = np.maximum(new[u:], best[: slots + 1 - u] + v)
        best = new
    assert got == pytest.approx(best[-1], abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Parameter accounting


SIX_LOW_RANK = "code=400,creative=400,math=400,news=380,pes2o=400,reddit=400"  # sum 2380


def test_params_of_the_7x7b_preset() -> None:
    full = describe_parameters("flexolmo-7x7b")
    assert full.total == 33_270_665_216 == full.all_full_total and full.saving == 0
    assert [x.name for x in full.experts] == ["public", "code", "creative", "math", "news", "pes2o", "reddit"]
    assert full.active_max == full.active_mean == full.shared + full.router + 5 * full.experts[0].parameters
    low = describe_parameters("flexolmo-7x7b", SIX_LOW_RANK)
    assert low.total == 7_299_534_848 + 1_449_984 * 2380 and f"{low.total / 1e9:.2f}" == "10.75"
    assert low.all_full_total == full.total and low.nbytes("bfloat16") == 2 * low.total
    assert describe_parameters("flexolmo-2x7b").total == 11_627_401_216


TINY_CONFIGS = [
    dict(expert_ranks=[0, 3, 0, 5]),
    dict(expert_ranks=[0, 1, 2, 30], num_key_value_heads=2),  # GQA; 30 is above break-even, still factored
    dict(expert_ranks=[0, 4, 4, 4], tie_word_embeddings=True, attention_bias=True),
    dict(expert_ranks=[0, 0, 0, 0]),
]


def touched(model: FlexMoREForCausalLM, ranks: list[int], subset: tuple[int, ...]) -> int:
    """Parameters a token routed to `subset` reads, counted on the built module by tensor names."""
    names = set()
    for name, _ in model.named_parameters():
        if ".mlp.experts." not in name:
            names.add(name)
            continue
        e = int(name.split(".mlp.experts.")[1].split(".")[0])
        if e in subset or (e == 0 and any(x == 0 or ranks[x] != FULL for x in subset)):
            names.add(name)
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    return sum(sizes[n] for n in names)


@pytest.mark.parametrize("kw", TINY_CONFIGS)
def test_params_match_the_built_model(tmp_path: Path, kw: dict) -> None:
    config = tiny_config(num_experts=4, **kw)
    model = FlexMoREForCausalLM(config)
    config.save_pretrained(tmp_path)  # a checkpoint directory's config.json is all params reads
    report = describe_parameters(tmp_path)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert [x.parameters for x in report.experts] == [
        sum(p.numel() for p in model.model.layers[0].mlp.experts[e].parameters()) * L for e in range(4)]
    for k in (1, 2, 3, 4):
        per_set = [touched(model, config.expert_ranks, s) for s in itertools.combinations(range(4), k)]
        active_max, active_mean = active_parameters(config, config.expert_ranks, k)
        assert active_max == max(per_set) and active_mean == pytest.approx(sum(per_set) / len(per_set))


def test_params_ranks_override_a_config_file(tmp_path: Path) -> None:
    config = tiny_config(num_experts=4, expert_names=["public", "math", "code", "news"])
    config.save_pretrained(tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"ranks": {"math": 4, "news": "full"}}))
    report = describe_parameters(tmp_path / "config.json", str(spec))
    built = FlexMoREForCausalLM(tiny_config(num_experts=4, expert_ranks=[0, 4, 0, 0]))
    assert [x.rank for x in report.experts] == [0, 4, 0, 0]
    assert report.total == sum(p.numel() for p in built.parameters())


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_params(flexmore, tmp_path: Path) -> None:  # noqa: F811
    result = flexmore("params", "flexolmo-7x7b")
    assert result.code == 0, result.err
    assert "33,270,665,216" in result.out and "reddit" in result.out
    result = flexmore("params", "flexolmo-7x7b", "--ranks", SIX_LOW_RANK, "--top-k", "2", "--json")
    d = json.loads(result.out)
    assert f"{d['parameters'] / 1e9:.2f}" == "10.75" and d["top_k"] == 2
    assert d["bytes"] == {"float32": 4 * d["parameters"], "bfloat16": 2 * d["parameters"],
                          "float16": 2 * d["parameters"]}
    assert d["saved_parameters"] == 33_270_665_216 - d["parameters"]
    assert {x["name"]: x["rank"] for x in d["experts"]}["news"] == 380
    d = json.loads(flexmore("params", "flexolmo-2x7b", "--names", "public,math", "--json").out)
    assert [x["name"] for x in d["experts"]] == ["public", "math"]


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["nope"], ["'nope'", "not a preset"]),
        (["flexolmo-7x7b", "--ranks", "math=5000"], ["--ranks", "5000"]),
        (["flexolmo-7x7b", "--names", "public,math"], ["--names", "2 names"]),
        (["flexolmo-7x7b", "--top-k", "9"], ["--top-k 9"]),
    ],
)
def test_cli_params_errors(flexmore, args: list[str], mentions: list[str]) -> None:  # noqa: F811
    assert_one_error_line(flexmore("params", *args), *mentions)


def test_cli_select_writes_a_spec_that_extract_and_sweep_read(flexmore, tmp_path: Path) -> None:  # noqa: F811
    results = write_results(tmp_path / "r.csv", TWO_GROUPS)
    out = tmp_path / "best.json"
    result = flexmore("select", results, out)
    assert result.code == 0, result.err
    assert "math" in result.out and "code" in result.out
    spec = json.loads(out.read_text())
    assert spec["name"] == "best-All" and spec["ranks"] == {"math": 2, "code": 8} and spec["criterion"] == "All"
    assert spec["values"] == pytest.approx({"math": 0.375, "code": 0.55}) and "flexmore_version" in spec
    names = ["public", "code", "math"]
    assert parse_rank_spec(str(out), names) == {2: 2, 1: 8}
    as_policies = parse_rank_spec(str(out), names, parse_value=parse_policy)  # what extract/assemble read
    assert as_policies == {2: parse_policy("2", ""), 1: parse_policy("8", "")}
    assert load_specs([str(out)], names) == {"best-All": [FULL, 8, 2]}

    out_mc = tmp_path / "mc.json"
    assert flexmore("select", results, out_mc, "--by", "MC").code == 0
    assert json.loads(out_mc.read_text())["ranks"] == {"math": "full", "code": 1}
    assert parse_rank_spec(str(out_mc), names) == {2: FULL, 1: 1}


def test_cli_select_with_budget(flexmore, tmp_path: Path) -> None:  # noqa: F811
    table = {"a": flat({1: 0.0, 2: 0.3, FULL: 0.3}), "b": flat({1: 0.0, 2: 0.0, FULL: 0.5})}
    results = write_results(tmp_path / "r.csv", table)
    config = tiny_config(num_experts=3)
    config.save_pretrained(tmp_path / "ckpt")
    budget = mixture_costs(config, ["a", "b"]).fixed + UNIT + FULL_COST
    out = tmp_path / "budget.json"
    result = flexmore("select", results, out, "--budget", str(budget), "--config", tmp_path / "ckpt")
    assert result.code == 0, result.err
    spec = json.loads(out.read_text())
    assert spec["name"] == f"budget-{budget}" and spec["ranks"] == {"a": 1, "b": "full"}
    assert spec["parameters"] == budget == spec["budget"]
    assert f"{budget:,}" in result.out
    assert parse_rank_spec(str(out), ["public", "a", "b"]) == {1: 1, 2: FULL}


def test_cli_select_errors(flexmore, tmp_path: Path) -> None:  # noqa: F811
    results = write_results(tmp_path / "r.csv", TWO_GROUPS)
    out = tmp_path / "out.json"
    assert_one_error_line(flexmore("select", results, out, "--by", "BBH"), "BBH", "known groups: All, GEN, MC")
    assert_one_error_line(flexmore("select", results, out, "--budget", "10B"), "--budget needs --config")
    assert_one_error_line(flexmore("select", results, out, "--budget", "1K", "--config", "flexolmo-7x7b",
                                   "--names", "public,math,code,a,b,c,d"), "'a'", "no pair results")
    # the 2x7B preset's names are generic, so the mixture is public + the results' two experts, at rank 1 at least
    need = count_parameters(load_config("flexolmo-2x7b"), [FULL, 1, 1]).total
    assert_one_error_line(flexmore("select", results, out, "--budget", "5B", "--config", "flexolmo-2x7b"),
                          "too small", f"need {need:,}")
    only_homogeneous = write_results(tmp_path / "h.csv", {}, extra=[
        {"kind": "homogeneous", "rank": 4, "task": "t", "group": "G", "score": 0.5}])
    assert_one_error_line(flexmore("select", only_homogeneous, out), "no pair results")
    assert_one_error_line(flexmore("select", results, tmp_path / "out.txt"), "out.txt", ".json")
    assert not out.exists() and not list(tmp_path.glob(".out.json*"))
    out.write_text("precious\n")
    assert_one_error_line(flexmore("select", results, out), "already exists", "--overwrite")
    assert out.read_text() == "precious\n"
    assert flexmore("select", results, out, "--overwrite").code == 0
    assert json.loads(out.read_text())["name"] == "best-All"
