"""Evaluation: local task files, metrics against hand-computed values, aggregation, the sweep and its store."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from lm_eval.api.model import LM

from flexmore import FlexmoreError
from flexmore.convert import convert_checkpoint
from flexmore.eval.engine import TaskResult, evaluate, group_scores, mean_of_group_means
from flexmore.eval.local import normalize_answer, read_task_file, token_f1
from flexmore.eval.store import ResultStore
from flexmore.eval.sweep import run_sweep

from .conftest import NAMES
from .test_cli import assert_one_error_line, flexmore  # noqa: F401 - flexmore is a fixture


class HandLM(LM):
    """A model whose log-probabilities are given by hand: score(context, continuation) -> log p."""

    def __init__(self, score, generation: str = ""):
        super().__init__()
        self.score, self.generation, self.seen = score, generation, []

    def loglikelihood(self, requests):
        self.seen.extend(r.args for r in requests)
        return [(self.score(*r.args), False) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        self.seen.extend(r.args[0] for r in requests)
        return [self.generation for _ in requests]


def write(path, lines):
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_choice_metrics_match_hand_computed_values(tmp_path):
    task = write(tmp_path / "rc.jsonl", [
        {"task": {"name": "rc", "group": "g", "format": "rc"}},
        {"question": "Q1", "choices": ["a", "bbbb"], "answer": 1},
        {"question": "Q2", "choices": ["cc", "d"], "answer": 0},
    ])
    # log p(continuation | context); "Answer:" alone is the unconditional context of acc_uncond
    conditional = {("Q1", " a"): -1.0, ("Q1", " bbbb"): -2.0, ("Q2", " cc"): -3.0, ("Q2", " d"): -2.5}
    unconditional = {" a": -0.5, " bbbb": -4.0, " cc": -3.5, " d": -1.0}

    def score(context, continuation):
        if context == "Answer:":
            return unconditional[continuation]
        question = context.split("Question: ")[1].split("\n")[0]
        return conditional[(question, continuation)]

    lm = HandLM(score)
    (result,) = evaluate(None, None, [str(task)], lm=lm)
    assert ("Question: Q1\nAnswer:", " a") in lm.seen and ("Answer:", " bbbb") in lm.seen
    # acc_raw: Q1 picks " a" (-1 > -2): wrong; Q2 picks " d" (-2.5 > -3): wrong
    # acc_per_char: Q1 -1/2 = -0.5 vs -2/5 = -0.4 -> " bbbb" right; Q2 -3/3 = -1 vs -2.5/2 -> " cc" right
    # acc_uncond: Q1 -0.5 vs 2.0 -> right; Q2 0.5 vs -1.5 -> right
    # bpb: gold " bbbb" 2/(ln2*5), gold " cc" 3/(ln2*3)
    expected_bpb = (2 / (math.log(2) * 5) + 3 / (math.log(2) * 3)) / 2
    assert result.metrics["acc_raw"] == 0.0
    assert result.metrics["acc_per_char"] == 1.0
    assert result.metrics["acc_uncond"] == 1.0
    assert result.metrics["bpb"] == pytest.approx(expected_bpb, rel=1e-12)
    assert result.main_metric == "acc_per_char" and result.n == 2 and result.group == "g"


def test_letter_format_and_few_shot_prompt(tmp_path):
    task = write(tmp_path / "mc.jsonl", [
        {"task": {"format": "mc", "shots": 1}},
        {"question": "Which is red?", "choices": ["sky", "blood", "grass"], "answer": 1},
        {"question": "Which is wet?", "choices": ["water", "sand"], "answer": 0, "split": "fewshot"},
    ])
    lm = HandLM(lambda ctx, cont: {" A": -3.0, " B": -1.0, " C": -2.0}.get(cont, -9.0))
    (result,) = evaluate(None, None, [str(task)], lm=lm)
    context = next(c for c, cont in lm.seen if c != "Answer:")
    assert context == ("Question: Which is wet?\n A. water\n B. sand\nAnswer: A\n\n"
                       "Question: Which is red?\n A. sky\n B. blood\n C. grass\nAnswer:")
    assert {cont for _, cont in lm.seen} == {" A", " B", " C"}
    assert result.metrics["acc_raw"] == 1.0 and result.metrics["bpb"] == pytest.approx(1 / (math.log(2) * 2))


def test_generation_exact_match_and_f1(tmp_path):
    task = write(tmp_path / "gen.jsonl", [
        {"task": {"format": "gen", "metric": "f1"}},
        {"question": "Capital of France?", "answer": ["Paris", "City of Paris"]},
        {"question": "Largest planet?", "answer": "Jupiter"},
    ])
    lm = HandLM(None, generation=" The city of Paris\nignored")
    (result,) = evaluate(None, None, [str(task)], lm=lm)
    # "the city of paris" -> "city of paris": exact match with alias 2 on doc 1; doc 2: no overlap
    assert result.metrics["exact_match"] == 0.5
    assert result.metrics["f1"] == pytest.approx(0.5)
    assert result.score == result.metrics["f1"]
    assert lm.seen[0].startswith("Question: ") and lm.seen[0].endswith("\nAnswer:")
    assert normalize_answer("The  Paris!") == "paris" and token_f1("x y z", "y z w") == pytest.approx(2 / 3)


def test_group_aggregation_macro_micro_and_mean_of_group_means():
    results = [TaskResult("t1", "A", {"acc": 1.0}, "acc", 10), TaskResult("t2", "A", {"acc": 0.0}, "acc", 30),
               TaskResult("t3", "B", {"acc": 0.25}, "acc", 5)]
    assert group_scores(results) == {"A": 0.5, "B": 0.25}
    assert group_scores(results, micro=True) == {"A": 0.25, "B": 0.25}
    assert mean_of_group_means({"A": 0.5, "B": 0.25}) == 0.375  # not the task mean (1.25 / 3)


@pytest.mark.parametrize("lines, fragment", [
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', "{not json"], ":2: invalid JSON"),
    (['{"question": "q", "choices": ["a"], "answer": 0}'], ":1: 'choices' must be a list of at least two"),
    (['{"question": "q", "choices": ["a", "b"], "answer": 5}'], ":1: 'answer' must be the index"),
    (['{"choices": ["a", "b"], "answer": 0}'], ":1: missing 'question'"),
    (['{"task": {"format": "essay"}}'], "format 'essay' is not one of"),
    (['{"task": {"format": "rc", "shots": 2}}', '{"question": "q", "choices": ["a", "b"], "answer": 0}'], "shots=2"),
    (['{"task": {"metric": "bleu"}}', '{"question": "q", "choices": ["a", "b"], "answer": 0}'], "metric 'bleu'"),
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', '{"task": {}}'], ":2: the 'task' header must be"),
])
def test_malformed_task_files_name_the_line(tmp_path, lines, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FlexmoreError) as err:
        read_task_file(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


# ------------------------------------------------------------------------------------------- sweep


@pytest.fixture(scope="module")
def world(tmp_path_factory, flexolmo_dir):
    root = tmp_path_factory.mktemp("sweep")
    source = convert_checkpoint(flexolmo_dir, root / "fo", to="flexolmo", expert_names=NAMES).out
    tasks = root / "tasks"
    tasks.mkdir()
    write(tasks / "facts.jsonl", [{"task": {"group": "knowledge"}}] + [
        {"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 2)], "answer": 0} for i in range(4)])
    write(tasks / "sums.jsonl", [{"task": {"group": "reasoning", "format": "mc"}}] + [
        {"question": f"{i} + {i}?", "choices": [str(2 * i), str(i)], "answer": 0} for i in range(3)])
    return source, tasks


def test_sweep_plans_the_study_and_stores_one_row_per_metric(world, tmp_path):
    source, tasks = world
    db = tmp_path / "r.sqlite"
    summary = run_sweep(source, [str(tasks)], db, ranks="2,full", ks="2,N", specs=["code=2,chat=full,math=4"])
    # public 1 + pairs 3 experts x 2 ranks + homogeneous 2 ranks x 2 k + heterogeneous 1 x 2 k = 13 mixtures
    assert summary.mixtures == 13 and summary.tasks == 2 and summary.evaluated == 26
    rows = ResultStore(db).rows()
    assert len(rows) == 26 * 4  # four choice metrics per task
    pair = [r for r in rows if r["kind"] == "pair" and r["expert_under_test"] == "math" and r["rank_label"] == "2"]
    assert {r["task"] for r in pair} == {"facts", "sums"} and json.loads(pair[0]["ranks"]) == [0, 2]
    assert json.loads(pair[0]["experts"]) == ["public", "math"] and pair[0]["k"] == 2
    full = [r for r in rows if r["kind"] == "homogeneous" and r["rank_label"] == "full" and r["k"] == 4]
    assert full[0]["parameters"] > pair[0]["parameters"]
    assert sum(r["is_main"] for r in rows) == 26
    again = run_sweep(source, [str(tasks)], db, ranks="2,full", ks="2,N", specs=["code=2,chat=full,math=4"])
    assert again.evaluated == 0 and again.skipped == 26


def test_selections_that_pick_the_same_ranks_are_each_reported(world, tmp_path):
    """Two named selections may agree (tiny worlds often pick rank 1 everywhere): neither may vanish."""
    source, tasks = world
    specs = []
    for name in ("best-All", "best-math"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"name": name, "ranks": {"code": 2, "chat": 2, "math": 2}}))
        specs.append(str(path))
    db = tmp_path / "r.sqlite"
    run_sweep(source, [str(tasks / "facts.jsonl")], db, ks="2", specs=specs, include=("heterogeneous",))
    rows = [r for r in ResultStore(db).rows() if r["is_main"]]
    assert sorted(r["rank_label"] for r in rows) == ["best-All", "best-math"]
    assert rows[0]["value"] == rows[1]["value"] and rows[0]["ranks"] == rows[1]["ranks"]


def test_full_pair_scores_equal_a_converted_two_expert_model(world, tmp_path):
    """A mixture assembled in memory is the model you'd get on disk: same scores through lm-eval."""
    source, tasks = world
    db = tmp_path / "r.sqlite"
    run_sweep(source, [str(tasks / "facts.jsonl")], db, ranks="full", include=("pair",))
    from flexmore.convert import load_model
    from flexmore.checkpoint import tokenizer_from_dir

    pair = convert_checkpoint(source, tmp_path / "pair", drop_experts=["code", "math"], top_k=2).out
    (expected,) = evaluate(load_model(pair), tokenizer_from_dir(pair), [str(tasks / "facts.jsonl")], device="cpu")
    row = [r for r in ResultStore(db).rows() if r["expert_under_test"] == "chat" and r["metric"] == "bpb"][0]
    assert row["value"] == pytest.approx(expected.metrics["bpb"], rel=1e-5)


def test_sweep_leaves_progress_to_its_own_display(world, tmp_path, capsys):
    """lm-eval's per-task bars would bury the sweep's progress lines: only `flexmore eval` shows them."""
    source, tasks = world
    from flexmore.convert import load_model
    from flexmore.checkpoint import tokenizer_from_dir

    run_sweep(source, [str(tasks)], tmp_path / "r.sqlite", ranks="full", include=("public",))
    assert "it/s" not in capsys.readouterr().err
    evaluate(load_model(source), tokenizer_from_dir(source), [str(tasks / "facts.jsonl")], device="cpu")
    assert "Running loglikelihood requests" in capsys.readouterr().err


def test_killed_sweep_resumes_without_loss_or_duplicates(world, tmp_path):
    source, tasks = world
    db = tmp_path / "kill.sqlite"
    args = [sys.executable, "-m", "flexmore.cli", "--quiet", "sweep", str(source), "--tasks", str(tasks),
            "--db", str(db), "--ranks", "1,full", "--k", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # kill it once some, but not all, results are in
            if db.exists():
                try:
                    n = sqlite3.connect(db).execute("SELECT COUNT(*) FROM finished").fetchone()[0]
                except sqlite3.OperationalError:
                    n = 0
                if n >= 3:
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    con = sqlite3.connect(db)
    before = dict(con.execute("SELECT mixture || '/' || task, created FROM finished").fetchall())
    total = (1 + 3 * 2 + 2 * 1) * 2  # (public + 3 pairs x 2 ranks + 2 homogeneous) x 2 tasks
    assert 3 <= len(before) < total, "the sweep should have been killed part-way"
    # every finished (mixture, task) has all its metric rows: the kill left no half-written task
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4 * len(before)
    con.close()
    summary = run_sweep(source, [str(tasks)], db, ranks="1,full", ks="2")
    assert summary.evaluated == total - len(before) and summary.skipped == len(before)
    con = sqlite3.connect(db)
    after = dict(con.execute("SELECT mixture || '/' || task, created FROM finished").fetchall())
    assert len(after) == total and all(after[key] == value for key, value in before.items())
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4 * total


# ---------------------------------------------------------------------------------------- bad input


def test_cli_bad_input(world, tmp_path, flexmore):
    source, tasks = world
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    locked = tmp_path / "locked.sqlite"
    ResultStore(locked).close()
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        cases = [
            (["eval", str(source), "-t", "NOSUCH"], "unknown benchmark group"),
            (["eval", str(tmp_path / "missing"), "-t", str(tasks)], "no such directory"),
            (["eval", str(source), "-t", str(tmp_path / "absent.jsonl")], "no such task file"),
            (["sweep", str(source), "-t", str(tasks), "--db", str(corrupt), "--ranks", "full"], "corrupt"),
            (["sweep", str(source), "-t", str(tasks), "--db", str(locked), "--ranks", "full"], "locked"),
            (["sweep", str(source), "-t", str(tasks), "--k", "9"], "--k: '9' must be between 1 and 4"),
            (["sweep", str(source), "-t", str(tasks), "--only", "triples"], "--only: unknown mixture kind"),
            (["results", str(tmp_path / "none.sqlite")], "no such results database"),
        ]
        for args, fragment in cases:
            assert_one_error_line(flexmore(*args), fragment)
        assert not (tmp_path / "none.sqlite").exists() and not os.path.exists("results.sqlite")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
