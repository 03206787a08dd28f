"""Benchmark groups: the registry against lm-eval 0.4.13's task index, scoring, the OLMES MC format on a
local task, and the one-line failure when the dataset hub is out of reach. No network."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from flexmore.errors import FlexmoreError  # noqa: E402
from flexmore.eval.groups import (  # noqa: E402
    GROUPS,
    PAPER_GROUPS,
    BenchmarkGroup,
    McItem,
    _by_prefix,
    _MC_ADAPTERS,
    add_token_f1,
    build_group_tasks,
    cap_eval_docs,
    get_group,
    group_score,
    headline_score,
    olmes_mc_render,
    olmes_mc_task,
    provide_squad_metrics,
    task_manager_for,
    task_scores,
    token_f1,
)

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"

# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_index():
    """lm-eval's whole task index (reads ~15k YAMLs, ~14 s; built once)."""
    return TaskManager()


@pytest.fixture(scope="module")
def fast_index():
    return task_manager_for(*GROUPS.values())


QUESTIONS = [  # (question, choices, gold index)
    ("Which is a fruit?", ["stone", "apple", "chair"], 1),
    ("Which is hot?", ["ice", "fire", "snow"], 1),
    ("Which can fly?", ["bird", "fish", "rock"], 0),
    ("Which is blue?", ["grass", "blood", "sky"], 2),
]
TRAIN = [("Which is wet?", ["water", "sand"], 0), ("Which is a number?", ["dog", "seven"], 1)]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows))
    return path


@pytest.fixture(scope="module")
def mc_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc")
    return {"test": str(_write_jsonl(root / "test.jsonl", QUESTIONS)),
            "train": str(_write_jsonl(root / "train.jsonl", TRAIN))}


def _mc_config(files, name="tiny_mc"):
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": dict(files)},
        "training_split": "train",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


@pytest.fixture()
def tiny_mc(mc_files):
    return ConfigurableTask(config=_mc_config(mc_files))


class FixedLM(LM):
    """Prefers the letter " B" whatever the question; generates canned answers in request order."""

    def __init__(self, generations=()):
        super().__init__()
        self.generations = list(generations)
        self.contexts: list[str] = []

    def loglikelihood(self, requests):
        self.contexts += [r.args[0] for r in requests]
        return [(-1.0 if r.args[1] == " B" else -3.0, False) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        return [self.generations[r.doc["row"]] for r in requests]


def _evaluate(lm, tasks, **kwargs):
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, bootstrap_iters=0, log_samples=False,
                                   task_manager=TaskManager(include_defaults=False), **kwargs)


# --- the registry --------------------------------------------------------------------------------


def test_the_six_paper_groups_are_the_120_tasks():
    sizes = {name: len(GROUPS[name].tasks) for name in PAPER_GROUPS}
    assert PAPER_GROUPS == ("MC9", "GEN5", "MMLU", "MMLU-Pro", "AGIEval", "BBH")
    assert sizes == {"MC9": 9, "GEN5": 5, "MMLU": 57, "MMLU-Pro": 14, "AGIEval": 8, "BBH": 27}
    every = [t for name in PAPER_GROUPS for t in GROUPS[name].tasks]
    assert len(every) == len(set(every)) == 120
    assert {g.name for g in GROUPS.values() if not g.in_paper} == {"Math2", "Code4"}


def test_kinds_formats_and_shots_follow_the_paper():
    kinds = {g.name: g.kind for g in GROUPS.values()}
    assert kinds == {"MC9": "knowledge", "GEN5": "knowledge", "MMLU": "knowledge", "MMLU-Pro": "reasoning",
                     "AGIEval": "reasoning", "BBH": "reasoning", "Math2": "reasoning", "Code4": "reasoning"}
    assert {n: GROUPS[n].shots for n in ("MC9", "MMLU", "MMLU-Pro", "AGIEval", "BBH")} == {
        "MC9": 5, "MMLU": 5, "MMLU-Pro": 5, "AGIEval": 1, "BBH": 3}
    assert {n for n, g in GROUPS.items() if g.format == "mc"} == {"MC9", "MMLU", "MMLU-Pro", "AGIEval"}
    assert GROUPS["GEN5"].metric == "exact_match" and GROUPS["BBH"].format == "cot"


def test_every_task_is_in_lm_eval_s_index_and_its_folder(full_index, fast_index):
    for group in GROUPS.values():
        for task in group.tasks:
            assert task in full_index.all_subtasks, f"{group.name}: {task}"
            where = full_index.task_index[task].yaml_path.relative_to(LM_EVAL_TASKS).as_posix()
            assert any(where.startswith(d + "/") for d in group.task_dirs), f"{task} is in {where}"
            assert fast_index.task_index[task].yaml_path == full_index.task_index[task].yaml_path


def test_metric_keys_are_what_lm_eval_reports(fast_index):
    """Where a task's YAML names its metrics and filters, the group reads one of them."""
    added = {("nq_open", "f1"), ("triviaqa", "f1")}  # flexmore adds these (add_token_f1)
    for group in [g for g in GROUPS.values() if g.format != "mc"] + [GROUPS["GEN5"].with_metric("f1")]:
        for task in group.tasks:
            cfg = fast_index.task_index[task].cfg
            spec = group.metric_spec(task)
            filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
            assert spec.filter in filters, (task, spec, filters)
            metrics = [str(m["metric"]).rsplit(".", 1)[-1] for m in cfg.get("metric_list") or []]
            if metrics and (task, group.metric) not in added:
                # lm-eval's pass_at_k metric reports its results as pass@k
                assert spec.name in metrics or spec.name == "pass@1" and "pass_at_k" in metrics, (task, metrics)
    assert GROUPS["GEN5"].metric_spec("coqa").key == "em,none"
    assert GROUPS["GEN5"].metric_spec("squadv2").scale == 100.0
    assert GROUPS["BBH"].metric_spec("bbh_cot_fewshot_snarks").key == "exact_match,get-answer"
    assert GROUPS["MMLU"].metric_spec("mmlu_anatomy").key == "acc,none"


def test_get_group_ignores_case_and_names_the_known_groups():
    assert get_group("mmlu-pro") is GROUPS["MMLU-Pro"] and get_group("gen5") is GROUPS["GEN5"]
    with pytest.raises(FlexmoreError, match=r"unknown benchmark group 'MC10'; known groups: MC9, GEN5, "):
        get_group("MC10")
    with pytest.raises(FlexmoreError, match="task hellaswag is not in benchmark group BBH"):
        GROUPS["BBH"].metric_spec("hellaswag")


def test_a_malformed_group_is_refused_with_its_name():
    with pytest.raises(FlexmoreError, match=r"benchmark group X: kind 'math' .*; aggregation 'median'"):
        BenchmarkGroup("X", "math", ("a",), "mc", 5, "acc", "median", "bad")
    with pytest.raises(FlexmoreError, match="subgroup members"):
        BenchmarkGroup("Y", "reasoning", ("a",), "gen", None, "f1", "macro", "bad", subgroups=(("s", ("b",)),))


def test_prefix_lookup_prefers_the_longest_prefix():
    assert _by_prefix(_MC_ADAPTERS, "mmlu_pro_law").__name__ == "_mmlu_pro_item"
    assert _by_prefix(_MC_ADAPTERS, "mmlu_anatomy").__name__ == "_mmlu_item"
    assert _by_prefix(_MC_ADAPTERS, "arc_easy") is None


# --- scoring -------------------------------------------------------------------------------------


def test_macro_and_micro_group_scores():
    mc9 = GROUPS["MC9"]
    scores = {t: i / 10 for i, t in enumerate(mc9.tasks)}  # 0.0 .. 0.8
    assert group_score(mc9, {**scores, "unrelated": 1.0}) == pytest.approx(0.4)
    pro = GROUPS["MMLU-Pro"]
    scores = {t: (1.0 if i == 0 else 0.0) for i, t in enumerate(pro.tasks)}
    sizes = {t: (300 if i == 0 else 100) for i, t in enumerate(pro.tasks)}
    assert group_score(pro, scores, sizes) == pytest.approx(300 / (300 + 13 * 100))  # micro
    with pytest.raises(FlexmoreError, match="MMLU-Pro weights tasks by instances: no size for mmlu_pro_biology"):
        group_score(pro, scores)


def test_math2_pools_minerva_math_before_averaging_with_gsm8k():
    math2 = GROUPS["Math2"]
    scores = {t: 0.0 for t in math2.tasks} | {"gsm8k_cot": 0.5, "minerva_math_algebra": 1.0}
    sizes = {t: 100 for t in math2.tasks} | {"minerva_math_algebra": 400}
    # minerva_math = 400 / 1000 = 0.4; Math2 = mean(0.5, 0.4)
    assert group_score("math2", scores, sizes) == pytest.approx(0.45)


def test_group_score_names_missing_tasks_and_refuses_percentages():
    with pytest.raises(FlexmoreError, match=r"MMLU: no score for mmlu_abstract_algebra, .* and 52 more"):
        group_score("MMLU", {})
    with pytest.raises(FlexmoreError, match=r"GEN5 squadv2 = 71.0: scores must be fractions"):
        group_score("GEN5", {t: 0.5 for t in GROUPS["GEN5"].tasks} | {"squadv2": 71.0})


def test_headline_is_the_mean_of_the_six_group_means_times_100():
    means = {"mc9": 0.704, "GEN5": 0.601, "MMLU": 0.602, "MMLU-Pro": 0.305, "AGIEval": 0.448, "BBH": 0.468,
             "Math2": 0.9}
    assert headline_score(means) == pytest.approx(100 * (0.704 + 0.601 + 0.602 + 0.305 + 0.448 + 0.468) / 6)
    with pytest.raises(FlexmoreError, match="missing MMLU-Pro, BBH"):
        headline_score({g: 0.5 for g in ("MC9", "GEN5", "MMLU", "AGIEval")})


def test_task_scores_read_each_task_s_key_and_scale():
    gen5 = GROUPS["GEN5"]
    results = {"coqa": {"em,none": 0.5, "f1,none": 0.7}, "squadv2": {"exact,none": 40.0, "f1,none": 55.0},
               "nq_open": {"exact_match,remove_whitespace": 0.2, "f1,remove_whitespace": 0.3},
               "triviaqa": {"exact_match,remove_whitespace": 0.6, "f1,remove_whitespace": 0.65},
               "drop": {"em,none": 0.1, "f1,none": 0.2}}
    assert task_scores(gen5, results) == {"coqa": 0.5, "squadv2": 0.4, "nq_open": 0.2, "triviaqa": 0.6,
                                          "drop": 0.1}
    assert task_scores(gen5.with_metric("f1"), results)["squadv2"] == pytest.approx(0.55)
    with pytest.raises(FlexmoreError, match=r"GEN5 coqa: lm-eval results have no em,none \(have f1,none\)"):
        task_scores(gen5, {**results, "coqa": {"f1,none": 0.7, "f1_stderr,none": "N/A"}})


# --- the OLMES multiple-choice format ------------------------------------------------------------


def test_olmes_mc_prompt_choices_and_target(tiny_mc):
    task = olmes_mc_task(tiny_mc)
    doc = task.eval_docs[0]
    assert task.config.task == "tiny_mc" and task.OUTPUT_TYPE == "multiple_choice"
    assert task.fewshot_context(doc, 0) == "Question: Which is a fruit?\n A. stone\n B. apple\n C. chair\nAnswer:"
    assert task.doc_to_choice(doc) == ["A", "B", "C"] and task.doc_to_target(doc) == 1
    requests = task.construct_requests(doc, task.fewshot_context(doc, 0))
    assert [r.args[1] for r in requests] == [" A", " B", " C"]
    # few-shot examples are rendered the same way and answered with their letter
    shot = task.fewshot_context(doc, 2)
    assert shot.count("\nAnswer:") == 3 and shot.endswith("\n C. chair\nAnswer:")
    assert "Question: Which is wet?\n A. water\n B. sand\nAnswer: A\n\n" in shot
    assert "Question: Which is a number?\n A. dog\n B. seven\nAnswer: B\n\n" in shot


def test_olmes_mc_accuracy_through_simple_evaluate(tiny_mc):
    lm = FixedLM()
    out = _evaluate(lm, [olmes_mc_task(tiny_mc)], num_fewshot=1)
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(2 / 4)  # golds B, B, A, C; always B
    assert all(c.endswith("\nAnswer:") and "Answer: " in c for c in lm.contexts)  # 1-shot contexts
    # the base cloze task scores the choice texts: the fixed LM prefers none of them (ties -> first)
    assert _evaluate(FixedLM(), [tiny_mc])["results"]["tiny_mc"]["acc,none"] == pytest.approx(1 / 4)


def test_a_task_already_asking_for_letters_is_kept(mc_files):
    cfg = _mc_config(mc_files, "lettered") | {"doc_to_choice": "{{['A', 'B', 'C'][:choices|length]}}"}
    base = ConfigurableTask(config=cfg)
    assert olmes_mc_task(base) is base


def test_generation_tasks_without_an_adapter_are_refused(mc_files):
    cfg = _mc_config(mc_files, "gen_task") | {"output_type": "generate_until", "doc_to_choice": None,
                                               "metric_list": None}
    with pytest.raises(FlexmoreError, match="gen_task: OLMES MC format needs a multiple_choice task"):
        olmes_mc_task(ConfigurableTask(config=cfg))


def test_adapters_turn_each_dataset_layout_into_one_mc_item():
    agieval = {"query": "Q: What is 2+2? Answer Choices: (A)3 (B)4 (C)5\nA: Among A through C, the answer is",
               "choices": ["(A)3", "(B)4", "(C)5"], "gold": [1]}
    cases = {
        "agieval_sat_math": (agieval, McItem("Question: What is 2+2?", ("3", "4", "5"), 1)),
        "mmlu_pro_law": ({"question": " Q? ", "options": ["a ", "b", "c"], "answer_index": 2},
                         McItem("Question: Q?", ("a", "b", "c"), 2)),
        "mmlu_anatomy": ({"question": "Bones?", "choices": ["1", "2", "3", "4"], "answer": 3},
                         McItem("Question: Bones?", ("1", "2", "3", "4"), 3)),
        "winogrande": ({"sentence": "The cup broke because _ was thin.", "option1": "cup", "option2": "table",
                        "answer": "1"}, McItem("Fill in the blank: The cup broke because _ was thin.",
                                               ("cup", "table"), 0)),
        "commonsense_qa": ({"question": "Where?", "choices": {"label": ["A", "B"], "text": ["here", "there"]},
                            "answerKey": "B"}, McItem("Question: Where?", ("here", "there"), 1)),
        "social_iqa": ({"context": "Ann ran.", "question": "Why?", "answerA": "late", "answerB": "fun",
                        "answerC": "cold", "label": "2"}, McItem("Question: Ann ran. Why?",
                                                                 ("late", "fun", "cold"), 1)),
    }
    for task, (doc, want) in cases.items():
        base = SimpleNamespace(config=SimpleNamespace(task=task))  # adapters read the docs, not the task
        assert _by_prefix(_MC_ADAPTERS, task)(base, doc) == want, task
    assert olmes_mc_render(cases["winogrande"][1]) == (
        "Fill in the blank: The cup broke because _ was thin.\n A. cup\n B. table\nAnswer:")


# --- building groups -----------------------------------------------------------------------------


def _offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.mark.parametrize("name, first", [("MC9", "arc_easy"), ("GEN5", "coqa"), ("MMLU-Pro", "mmlu_pro_biology"),
                                         ("BBH", "bbh_cot_fewshot_boolean_expressions")])
def test_without_the_hub_a_group_fails_in_one_line_quickly(monkeypatch, fast_index, name, first):
    _offline(monkeypatch)
    start = time.monotonic()
    with pytest.raises(FlexmoreError) as caught:
        build_group_tasks(name, task_manager=fast_index)
    message = str(caught.value)
    assert time.monotonic() - start < 5
    assert re.fullmatch(
        rf"benchmark group {name} needs the Hugging Face dataset hub, which is unreachable "
        rf"\({first}: HF_HUB_OFFLINE is set; [^\n]+\); use local task files instead", message), message


def test_a_task_manager_without_the_group_s_tasks_is_reported():
    with pytest.raises(FlexmoreError, match="benchmark group AGIEval: lm-eval has no task agieval_aqua_rat"):
        build_group_tasks("AGIEval", task_manager=TaskManager(include_defaults=False))


def test_build_group_tasks_formats_sets_shots_and_caps(tmp_path, mc_files):
    """A group of local YAML tasks goes through the same path as the hub groups."""
    for name in ("tiny_a", "tiny_b"):
        cfg = _mc_config(mc_files, name) | {"num_fewshot": 0}
        (tmp_path / f"{name}.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    manager = TaskManager(include_defaults=False, include_path=str(tmp_path))
    group = BenchmarkGroup("Tiny", "knowledge", ("tiny_a", "tiny_b"), "mc", 2, "acc", "macro", "test group")
    tasks = build_group_tasks(group, task_manager=manager, limit=3)
    assert [t.config.task for t in tasks] == ["tiny_a", "tiny_b"]
    assert all(t.config.num_fewshot == 2 and len(t.eval_docs) == 3 for t in tasks)
    kept = [d["question"] for d in tasks[0].eval_docs]
    assert kept == [d["question"] for d in tasks[1].eval_docs]  # the same fixed-seed subsample
    assert kept == [q for q, _, _ in QUESTIONS if q in kept]  # in the original order
    assert tasks[0].fewshot_context(tasks[0].eval_docs[0], 2).count("\nAnswer:") == 3
    out = _evaluate(FixedLM(), tasks)
    golds = {q: a for q, _, a in QUESTIONS}
    want = sum(golds[q] == 1 for q in kept) / 3
    assert group_score(group, task_scores(group, out["results"])) == pytest.approx(want)
    rc = replace(group, format="rc", shots=None)
    assert all(t.config.doc_to_text.startswith("Question: {{") for t in build_group_tasks(rc, manager))


def test_cap_keeps_small_tasks_whole(tiny_mc):
    assert len(cap_eval_docs(tiny_mc, 10).eval_docs) == len(QUESTIONS)


def test_token_f1_is_squad_s():
    assert token_f1("The Eiffel Tower", "eiffel tower") == 1.0
    assert token_f1("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("London", "Paris") == 0.0 and token_f1("the", "a") == 1.0


def test_added_f1_takes_the_best_alias_through_simple_evaluate(tmp_path):
    rows = [{"row": 0, "q": "Capital of France?", "answers": ["Paris", "Paris, France"]},
            {"row": 1, "q": "Largest planet?", "answers": ["Jupiter"]}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = ConfigurableTask(config={
        "task": "tiny_qa", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "Q: {{q}}\nA:",
        "doc_to_target": "{{answers}}", "generation_kwargs": {"until": ["\n"]},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    })
    out = _evaluate(FixedLM(generations=[" Paris France", " the planet Saturn"]), [add_token_f1(task)])
    result = out["results"]["tiny_qa"]
    assert result["f1,none"] == pytest.approx((1.0 + 0.0) / 2)  # "paris france" matches alias 2 exactly
    assert result["exact_match,none"] == 0.0


def test_coqa_scores_with_transformers_5():
    """lm-eval 0.4.13's coqa scorer imports a module transformers 5 removed; flexmore provides it."""
    import importlib.util

    provide_squad_metrics()
    spec = importlib.util.spec_from_file_location("coqa_utils", LM_EVAL_TASKS / "coqa" / "utils.py")
    coqa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coqa)
    doc = {"story": "A red car.", "questions": {"input_text": ["What is red?"]},
           "answers": {"input_text": ["the red car"]}}
    assert coqa.process_results(doc, [" Red car.\nQ: next"]) == {"em": 1.0, "f1": 1.0}
    assert coqa.process_results(doc, [" a blue car"])["f1"] == pytest.approx(0.5)


def test_a_missing_scorer_dependency_is_one_line(fast_index):
    if all(importlib.util.find_spec(m) for m in ("sympy", "math_verify", "antlr4")):
        pytest.skip("minerva_math's dependencies are installed here")
    minerva = GROUPS["Math2"].subgroups[0][1]
    group = replace(GROUPS["Math2"], tasks=minerva, subgroups=())
    with pytest.raises(FlexmoreError, match=r"benchmark group Math2: lm-eval cannot load minerva_math_algebra "
                                            r"\(.*sympy.*\)"):
        build_group_tasks(group, task_manager=fast_index)


N_CHOICES = {"boolq": 2, "piqa": 2, "winogrande": 2, "social_iqa": 3, "commonsense_qa": 5}  # else 4


def _row(task: str, i: int, gold: int) -> dict:
    """Question i with answer `gold` in the layout lm-eval's YAML for `task` reads (its hub dataset's)."""
    q, opts = f"Question number {i}?", [f"option {i}{c}" for c in "pqrst"[:N_CHOICES.get(task, 4)]]
    labels = list("ABCDE")[: len(opts)]
    layouts = {
        "arc_easy": lambda: {"question": q, "choices": {"text": opts, "label": labels}, "answerKey": labels[gold]},
        "openbookqa": lambda: {"question_stem": q, "choices": {"text": opts, "label": labels},
                               "answerKey": labels[gold]},
        "commonsense_qa": lambda: {"question": q, "choices": {"text": opts, "label": labels},
                                   "answerKey": labels[gold]},
        "hellaswag": lambda: {"activity_label": "Cooking", "ctx_a": f"Step {i}.", "ctx_b": "then", "endings": opts,
                              "label": str(gold)},
        "boolq": lambda: {"passage": f"Passage {i}.", "question": q, "label": gold},
        "piqa": lambda: {"goal": q, "sol1": opts[0], "sol2": opts[1], "label": gold},
        "winogrande": lambda: {"sentence": f"Sentence {i} has _ here.", "option1": opts[0], "option2": opts[1],
                               "answer": str(gold + 1)},
        "social_iqa": lambda: {"context": f"Context {i}.", "question": q, "answerA": opts[0], "answerB": opts[1],
                               "answerC": opts[2], "label": str(gold + 1)},
        "mmlu_anatomy": lambda: {"question": q, "choices": opts, "answer": gold},
        "mmlu_pro_law": lambda: {"question": q, "options": opts, "answer": labels[gold], "answer_index": gold,
                                 "category": "law", "cot_content": "A: Let's think step by step. So.", "src": "x"},
        "agieval_lsat_ar": lambda: {"query": f"Q: {q} Answer Choices: " + " ".join(
            f"({labels[k]}){o}" for k, o in enumerate(opts)) + "\nA: Among A through D, the answer is",
            "choices": [f"({labels[k]}){o}" for k, o in enumerate(opts)], "gold": [gold]},
    }
    return layouts[task]()




def test_real_lm_eval_configs_in_olmes_mc_format(tmp_path, fast_index):
    """lm-eval's own YAMLs for each MC layout, fed local rows: prompts, letters and accuracy come out right."""
    tasks = [
        "arc_easy", "openbookqa", "commonsense_qa", "hellaswag", "boolq", "piqa", "winogrande", "social_iqa",
        "mmlu_anatomy", "mmlu_pro_law", "agieval_lsat_ar"]
    for task in tasks:
        golds = [1, 0, 1, 0] if N_CHOICES.get(task) == 2 else [1, 0, 1, 2]
        data = tmp_path / f"{task}.jsonl"
        data.write_text("".join(json.dumps(_row(task, i, g)) + "\n" for i, g in enumerate(golds)))
        splits = {s: str(data) for s in ("train", "validation", "test", "dev")}
        override = {"include": str(fast_index.task_index[task].yaml_path), "task": task, "dataset_path": "json",
                    "dataset_name": None, "dataset_kwargs": {"data_files": splits}}
        (tmp_path / f"{task}.yaml").write_text(json.dumps(override))
    manager = TaskManager(include_defaults=False, include_path=str(tmp_path))
    group = BenchmarkGroup("Local", "knowledge", tuple(tasks), "mc", 1, "acc", "macro", "lm-eval YAMLs, local rows")
    built = {t.config.task: t for t in build_group_tasks(group, task_manager=manager)}
    for name, task in built.items():
        doc = task.eval_docs[0]
        prompt = task.fewshot_context(doc, 0)
        n = N_CHOICES.get(name, 4)
        assert prompt.endswith("\nAnswer:") and prompt.count("\nAnswer:") == 1, (name, prompt)
        assert [line[:4] for line in prompt.splitlines()[-n - 1:-1]] == [f" {c}. " for c in "ABCDE"[:n]], name
        assert "Answer Choices" not in prompt and "think step by step" not in prompt.lower(), name
        assert task.doc_to_choice(doc) == list("ABCDE"[:n]) and task.doc_to_target(doc) == 1, name
    assert built["mmlu_pro_law"].OUTPUT_TYPE == "multiple_choice"  # lm-eval's own is CoT generation
    agieval = built["agieval_lsat_ar"]  # its shots come from the test split: never the question asked
    agieval.set_fewshot_seed(0)
    for i, doc in enumerate(agieval.eval_docs):
        for _ in range(5):
            assert agieval.fewshot_context(doc, 1).count(f"Question number {i}?") == 1
    assert built["agieval_lsat_ar"].fewshot_context(built["agieval_lsat_ar"].eval_docs[0], 0).startswith(
        "Question: Question number 0?\n A. option 0p\n")
    out = _evaluate(FixedLM(), list(built.values()))
    assert all(out["results"][t]["acc,none"] == pytest.approx(0.5) for t in tasks)  # gold B in 2 of 4
    assert group_score(group, task_scores(group, out["results"])) == pytest.approx(0.5)
