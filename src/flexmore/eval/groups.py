"""The paper's benchmark groups (REFERENCE §7), defined once: which lm-eval tasks, how they are asked, how
they are scored, and how task scores become group means and the headline number.

    group = get_group("mc9")
    tasks = build_group_tasks(group, limit=1000)          # lm-eval Task objects, OLMES MC format
    scores = task_scores(group, lm_eval_out["results"])  # {task: fraction in [0, 1]}
    mc9 = group_score(group, scores)                      # fraction in [0, 1]
    headline_score({"MC9": mc9, "GEN5": ..., ...})       # the paper's number, x100

Six groups make the paper's 120 tasks (MC9 9 + GEN5 5 + MMLU 57 + MMLU-Pro 14 + AGIEval 8 + BBH 27);
Math2 and Code4 were in the FlexMoRE scripts but not in the 120, so the headline ignores them.

Scores are fractions in [0, 1] everywhere in this module; only `headline_score` multiplies by 100, as
the paper reports it. Task names are lm-eval 0.4.13's. Its built-in tasks download their data from the
Hugging Face dataset hub when built; where the hub is unreachable, `build_group_tasks` says so in one
line and local task files (local.py) are the way to evaluate.

lm-eval is imported inside the functions that need it, so the registry (names, kinds, metrics) is usable
by the analysis without lm-eval installed.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import random
import re
import string
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FlexmoreError

if TYPE_CHECKING:
    from lm_eval.api.task import ConfigurableTask, Task
    from lm_eval.tasks import TaskManager

KINDS = ("knowledge", "reasoning")
FORMATS = {
    "mc": "OLMES multiple choice: choices listed as ' A. ...', the model scores the letters ' A', ' B', ...",
    "rc": "cloze: 'Question: ...\\nAnswer:' scored by the log-probability of ' {choice}'",
    "gen": "free generation, scored against the gold answers (exact match / F1 / pass@1)",
    "cot": "chain-of-thought generation, the answer extracted from it, then exact match",
}
AGGREGATIONS = {
    "macro": "unweighted mean over tasks (each task counts once)",
    "micro": "instance-weighted mean over tasks (each question counts once)",
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SUBSAMPLE_SEED = 1234  # `limit` draws this fixed-seed subsample, so every mixture sees the same questions


@dataclass(frozen=True)
class MetricSpec:
    """Where one task's score sits in lm-eval's results, and how to bring it to a fraction."""

    name: str  # the metric as lm-eval names it in results ("acc", "em", "exact_match", "pass@1")
    filter: str = "none"  # lm-eval's filter pipeline name: results are keyed "metric,filter"
    scale: float = 1.0  # lm-eval value / scale = fraction; squadv2 reports percentages (scale 100)

    @property
    def key(self) -> str:
        return f"{self.name},{self.filter}"


@dataclass(frozen=True)
class BenchmarkGroup:
    """One of the paper's benchmark groups and how to run and score it with lm-eval 0.4.13."""

    name: str  # "MC9", "GEN5", ... as the paper writes it
    kind: str  # "knowledge" | "reasoning": the analysis contrasts the two
    tasks: tuple[str, ...]  # lm-eval task names, each scored on its own
    format: str  # a key of FORMATS
    shots: int | None  # few-shot examples; None keeps each lm-eval task's own default
    metric: str  # "acc", "exact_match", "f1", "pass@1": resolved per task by metric_spec()
    aggregation: str  # a key of AGGREGATIONS, over tasks (after pooling subgroups)
    description: str  # one line for listings
    # Folders under lm_eval/tasks/ whose YAMLs define `tasks`: indexing only these takes ~0.1 s where
    # lm-eval's full index takes ~14 s (task_manager_for()).
    task_dirs: tuple[str, ...] = ()
    # Benchmarks lm-eval splits into subtasks that count as ONE benchmark in the group, pooled
    # instance-weighted first (lm-eval's own group does that): minerva_math's 7 subjects in Math2.
    subgroups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    in_paper: bool = True  # one of the six groups behind the paper's headline number

    def __post_init__(self) -> None:
        problems = [
            f"kind {self.kind!r} is not one of {', '.join(KINDS)}" if self.kind not in KINDS else "",
            f"format {self.format!r} is not one of {', '.join(FORMATS)}" if self.format not in FORMATS else "",
            f"aggregation {self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}"
            if self.aggregation not in AGGREGATIONS else "",
            "no tasks" if not self.tasks else "",
            "a task is listed twice" if len(set(self.tasks)) != len(self.tasks) else "",
            f"shots must be >= 0, got {self.shots}" if self.shots is not None and self.shots < 0 else "",
        ]
        pooled = [t for _, members in self.subgroups for t in members]
        if not set(pooled) <= set(self.tasks) or len(set(pooled)) != len(pooled):
            problems.append("subgroup members must be distinct tasks of the group")
        problems = [p for p in problems if p]
        if problems:
            raise FlexmoreError(f"benchmark group {self.name}: {'; '.join(problems)}")

    def metric_spec(self, task: str) -> MetricSpec:
        """The result key and scale of `task` under this group's metric."""
        if task not in self.tasks:
            raise FlexmoreError(f"task {task} is not in benchmark group {self.name}")
        return _by_prefix(_METRIC_SPECS, task, self.metric) or MetricSpec(self.metric)

    def with_metric(self, metric: str) -> BenchmarkGroup:
        """The same group scored by another metric, e.g. GEN5 by F1 as FlexOlmo reported it."""
        return replace(self, metric=metric)


def _names(prefix: str, items: str) -> tuple[str, ...]:
    return tuple(prefix + item for item in items.split())


_MMLU_SUBJECTS = """
abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry
college_computer_science college_mathematics college_medicine college_physics computer_security
conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts
high_school_biology high_school_chemistry high_school_computer_science high_school_european_history
high_school_geography high_school_government_and_politics high_school_macroeconomics
high_school_mathematics high_school_microeconomics high_school_physics high_school_psychology
high_school_statistics high_school_us_history high_school_world_history human_aging human_sexuality
international_law jurisprudence logical_fallacies machine_learning management marketing medical_genetics
miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory professional_accounting
professional_law professional_medicine professional_psychology public_relations security_studies
sociology us_foreign_policy virology world_religions
"""
_MMLU_PRO_CATEGORIES = """
biology business chemistry computer_science economics engineering health history law math other
philosophy physics psychology
"""
_BBH_TASKS = """
boolean_expressions causal_judgement date_understanding disambiguation_qa dyck_languages formal_fallacies
geometric_shapes hyperbaton logical_deduction_five_objects logical_deduction_seven_objects
logical_deduction_three_objects movie_recommendation multistep_arithmetic_two navigate object_counting
penguins_in_a_table reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks
sports_understanding temporal_sequences tracking_shuffled_objects_five_objects
tracking_shuffled_objects_seven_objects tracking_shuffled_objects_three_objects web_of_lies word_sorting
"""
_MINERVA_MATH = _names(
    "minerva_math_", "algebra counting_and_prob geometry intermediate_algebra num_theory prealgebra precalc"
)

_ALL_GROUPS = (
    BenchmarkGroup(
        name="MC9",
        kind="knowledge",
        tasks=("arc_easy", "arc_challenge", "boolq", "commonsense_qa", "hellaswag", "openbookqa", "piqa",
               "social_iqa", "winogrande"),
        format="mc", shots=5, metric="acc", aggregation="macro",
        description="nine commonsense/science multiple-choice sets, OLMES MC letters, 5-shot, accuracy",
        task_dirs=("arc", "super_glue/boolq", "commonsense_qa", "hellaswag", "openbookqa", "piqa", "siqa",
                   "winogrande"),
    ),
    BenchmarkGroup(
        name="GEN5",
        kind="knowledge",
        # squadv2 stands in for SQuAD v1.1: lm-eval 0.4.13 has no v1 task. It asks the same extractive
        # question ("Title / Background / Question / Answer:") and scores SQuAD exact match / F1;
        # squad_completion is a fill-in-the-blank rewrite scored by substring containment, further away.
        tasks=("coqa", "squadv2", "nq_open", "triviaqa", "drop"),
        # shots=None keeps lm-eval's defaults, 0-shot for all five (CoQA carries its own dialogue).
        # OLMES runs most of these few-shot; pass shots explicitly (replace(group, shots=5)) to match.
        format="gen", shots=None, metric="exact_match", aggregation="macro",
        description="five generative QA sets, greedy answers, exact match (FlexOlmo reported F1)",
        task_dirs=("coqa", "squadv2", "nq_open", "triviaqa", "drop"),
    ),
    BenchmarkGroup(
        name="MMLU",
        kind="knowledge",
        tasks=_names("mmlu_", _MMLU_SUBJECTS),
        format="mc", shots=5, metric="acc", aggregation="macro",
        description="57 MMLU subjects, OLMES MC letters, 5-shot, accuracy averaged over subjects",
        task_dirs=("mmlu/default",),
    ),
    BenchmarkGroup(
        name="MMLU-Pro",
        kind="reasoning",
        tasks=_names("mmlu_pro_", _MMLU_PRO_CATEGORIES),
        # micro: MMLU-Pro's published score is accuracy over all its questions (lm-eval's group weights
        # by size too). lm-eval's own tasks are CoT generation; olmes_mc_task asks them as 10-letter MC.
        format="mc", shots=5, metric="acc", aggregation="micro",
        description="14 MMLU-Pro categories, 10-option OLMES MC letters, 5-shot, accuracy",
        task_dirs=("mmlu_pro",),
    ),
    BenchmarkGroup(
        name="AGIEval",
        kind="reasoning",
        tasks=("agieval_aqua_rat", "agieval_gaokao_english", "agieval_logiqa_en", "agieval_lsat_ar",
               "agieval_lsat_lr", "agieval_lsat_rc", "agieval_sat_en", "agieval_sat_math"),
        format="mc", shots=1, metric="acc", aggregation="macro",
        description="eight English AGIEval exam sets, OLMES MC letters, 1-shot, accuracy",
        task_dirs=("agieval",),
    ),
    BenchmarkGroup(
        name="BBH",
        kind="reasoning",
        tasks=_names("bbh_cot_fewshot_", _BBH_TASKS),
        format="cot", shots=3, metric="exact_match", aggregation="macro",
        description="27 BIG-Bench Hard tasks, 3-shot chain of thought, exact match on the extracted answer",
        task_dirs=("bbh/cot_fewshot",),
    ),
    BenchmarkGroup(
        name="Math2",
        kind="reasoning",
        # gsm8k_cot: lm-eval's 8-shot chain-of-thought GSM8K. minerva_math: 4-shot, 7 subjects pooled.
        tasks=("gsm8k_cot", *_MINERVA_MATH),
        format="cot", shots=None, metric="exact_match", aggregation="macro",
        description="GSM8K and MATH (Minerva), chain of thought, exact match (not in the paper's 120)",
        task_dirs=("gsm8k", "minerva_math"),
        subgroups=(("minerva_math", _MINERVA_MATH),),
        in_paper=False,
    ),
    BenchmarkGroup(
        name="Code4",
        kind="reasoning",
        # All four exist in lm-eval 0.4.13. They run generated code: lm-eval needs HF_ALLOW_CODE_EVAL=1
        # and confirm_run_unsafe_code=True, and loads HF evaluate's code_eval metric from the hub.
        tasks=("humaneval", "humaneval_plus", "mbpp", "mbpp_plus"),
        format="gen", shots=None, metric="pass@1", aggregation="macro",
        description="HumanEval(+) 0-shot and MBPP(+) 3-shot, greedy, pass@1 (not in the paper's 120)",
        task_dirs=("humaneval", "mbpp"),
        in_paper=False,
    ),
)

GROUPS: dict[str, BenchmarkGroup] = {g.name: g for g in _ALL_GROUPS}
PAPER_GROUPS: tuple[str, ...] = tuple(g.name for g in _ALL_GROUPS if g.in_paper)

# Per-task exceptions to "the metric is called what the group calls it, unfiltered, as a fraction".
# Keys are (task name or a prefix ending in "_", group metric).
_METRIC_SPECS: dict[tuple[str, str], MetricSpec] = {
    ("coqa", "exact_match"): MetricSpec("em"),
    ("drop", "exact_match"): MetricSpec("em"),
    ("squadv2", "exact_match"): MetricSpec("exact", scale=100.0),
    ("squadv2", "f1"): MetricSpec("f1", scale=100.0),
    ("nq_open", "exact_match"): MetricSpec("exact_match", "remove_whitespace"),
    ("nq_open", "f1"): MetricSpec("f1", "remove_whitespace"),  # added by build_group_tasks
    ("triviaqa", "exact_match"): MetricSpec("exact_match", "remove_whitespace"),
    ("triviaqa", "f1"): MetricSpec("f1", "remove_whitespace"),  # added by build_group_tasks
    ("bbh_cot_fewshot_", "exact_match"): MetricSpec("exact_match", "get-answer"),
    # OLMES takes the last number when "The answer is N" is missing; flexible-extract does the same.
    ("gsm8k_cot", "exact_match"): MetricSpec("exact_match", "flexible-extract"),
    ("humaneval", "pass@1"): MetricSpec("pass@1", "create_test"),
    ("humaneval_plus", "pass@1"): MetricSpec("pass@1", "create_test"),
    ("mbpp", "pass@1"): MetricSpec("pass_at_1"),
    ("mbpp_plus", "pass@1"): MetricSpec("pass_at_1"),
}


def _by_prefix(registry: Mapping[Any, Any], task: str, *rest: str) -> Any:
    """The entry for `task` (keyed `(task, *rest)` when `rest` is given), else for the longest key that is
    a prefix of `task` ending in "_" ("bbh_cot_fewshot_" covers all of BBH), else None."""
    def key(name: str) -> Any:
        return (name, *rest) if rest else name

    names = {k[0] if rest else k for k in registry}
    prefixes = sorted((n for n in names if n.endswith("_") and task.startswith(n)), key=len, reverse=True)
    for name in (task, *prefixes):
        if key(name) in registry:
            return registry[key(name)]
    return None


def get_group(name: str) -> BenchmarkGroup:
    """The group called `name`, ignoring case ("mc9", "mmlu-pro")."""
    by_lower = {g.lower(): g for g in GROUPS}
    if name.lower() not in by_lower:
        raise FlexmoreError(f"unknown benchmark group {name!r}; known groups: {', '.join(GROUPS)}")
    return GROUPS[by_lower[name.lower()]]


# --- scoring -------------------------------------------------------------------------------------


def _check_fraction(where: str, value: float) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise FlexmoreError(f"{where} = {value!r}: scores must be fractions in [0, 1] (x100 only at the end)")
    return float(value)


def _macro(scores: list[float], sizes: list[int] | None) -> float:
    return sum(scores) / len(scores)


def _micro(scores: list[float], sizes: list[int] | None) -> float:
    assert sizes is not None  # group_score checks this with a message naming the group
    if sum(sizes) == 0:
        raise FlexmoreError("micro average over tasks with 0 instances")
    return sum(s * n for s, n in zip(scores, sizes, strict=True)) / sum(sizes)


_AGGREGATE: dict[str, Callable[[list[float], list[int] | None], float]] = {"macro": _macro, "micro": _micro}


def group_score(
    group: BenchmarkGroup | str,
    task_scores: Mapping[str, float],
    task_sizes: Mapping[str, int] | None = None,
) -> float:
    """The group's mean as a fraction: its tasks' fractions averaged per the group's aggregation.

    Subgroups (Math2's minerva_math) are pooled instance-weighted first and then count as one task.
    `task_sizes` (instances evaluated per task) is needed for micro groups and for subgroups. Keys of
    other groups' tasks are ignored, so one dict of every task's score can serve every group.
    """
    group = get_group(group) if isinstance(group, str) else group
    missing = [t for t in group.tasks if t not in task_scores]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FlexmoreError(f"benchmark group {group.name}: no score for {shown}")
    needs_sizes = group.aggregation == "micro" or bool(group.subgroups)
    if needs_sizes:
        absent = [t for t in group.tasks if task_sizes is None or t not in task_sizes]
        if absent:
            raise FlexmoreError(
                f"benchmark group {group.name} weights tasks by instances: no size for {', '.join(absent[:5])}"
            )
    scores = {t: _check_fraction(f"{group.name} {t}", task_scores[t]) for t in group.tasks}
    sizes = {t: int(task_sizes[t]) for t in group.tasks} if needs_sizes and task_sizes else {}

    units: list[tuple[float, int]] = []
    pooled = {t for _, members in group.subgroups for t in members}
    for task in group.tasks:
        if task not in pooled:
            units.append((scores[task], sizes.get(task, 0)))
    for _, members in group.subgroups:
        n = sum(sizes[t] for t in members)
        units.append((_micro([scores[t] for t in members], [sizes[t] for t in members]), n))
    values = [s for s, _ in units]
    return _AGGREGATE[group.aggregation](values, [n for _, n in units] if needs_sizes else None)


def headline_score(group_means: Mapping[str, float]) -> float:
    """The paper's headline: the unweighted mean of the six paper groups' means, x100.

    `group_means` maps group names (any case) to fractions in [0, 1]; other groups (Math2, Code4) are
    ignored. The result is on the paper's 0-100 scale.
    """
    by_name = {get_group(name).name: value for name, value in group_means.items()}
    missing = [g for g in PAPER_GROUPS if g not in by_name]
    if missing:
        raise FlexmoreError(f"headline score needs all six paper groups; missing {', '.join(missing)}")
    return 100.0 * sum(_check_fraction(g, by_name[g]) for g in PAPER_GROUPS) / len(PAPER_GROUPS)


def task_scores(group: BenchmarkGroup, results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Each task's score as a fraction, read from lm-eval's `out["results"]` by the group's metric."""
    scores = {}
    for task in group.tasks:
        spec = group.metric_spec(task)
        row = results.get(task)
        if row is None or spec.key not in row:
            have = ", ".join(k for k in (row or {}) if "stderr" not in k and k != "alias") or "nothing"
            raise FlexmoreError(f"{group.name} {task}: lm-eval results have no {spec.key} (have {have})")
        scores[task] = _check_fraction(f"{group.name} {task} {spec.key}", float(row[spec.key]) / spec.scale)
    return scores


# --- OLMES multiple-choice format ----------------------------------------------------------------


@dataclass(frozen=True)
class McItem:
    """One question in OLMES MC form: the stem, the choice texts, the index of the gold choice."""

    stem: str
    choices: tuple[str, ...]
    gold: int


_ANSWER_CUE = re.compile(r"\s*(?:Answer|A):\s*$")


def _strip_answer_cue(text: str) -> str:
    """lm-eval prompts end with the cloze cue ('Answer:' for ARC/PIQA/BoolQ, 'A:' for SIQA); the MC
    rendering adds its own after the choices."""
    return _ANSWER_CUE.sub("", text).rstrip()


def _gold_index(target: Any, choices: list[str], task: str) -> int:
    if isinstance(target, list):  # AGIEval stores gold as a one-element list
        if not target:
            raise FlexmoreError(f"{task}: empty gold answer list")
        target = target[0]
    if isinstance(target, bool):
        target = int(target)
    if isinstance(target, str):
        stripped = target.strip()
        if stripped.isdigit():
            target = int(stripped)
        elif stripped in choices:
            target = choices.index(stripped)
        elif len(stripped) == 1 and stripped in LETTERS[: len(choices)]:
            target = LETTERS.index(stripped)
    if not isinstance(target, int) or not 0 <= target < len(choices):
        raise FlexmoreError(f"{task}: gold answer {target!r} is not one of the {len(choices)} choices")
    return target


def _generic_item(base: ConfigurableTask, doc: dict) -> McItem:
    """The stem is the base prompt minus its answer cue; choices and gold are the base task's."""
    text = base.doc_to_text(doc)
    if not isinstance(text, str):  # lm-eval's "multiple input" tasks (winogrande) vary the context
        raise FlexmoreError(
            f"{base.config.task}: its prompt is not one string per question (multiple-input task); "
            "it needs an OLMES MC adapter in flexmore.eval.groups"
        )
    choices = list(base.doc_to_choice(doc))
    return McItem(_strip_answer_cue(text), tuple(choices), _gold_index(base.doc_to_target(doc), choices,
                                                                       base.config.task))


def _openbookqa_item(base: ConfigurableTask, doc: dict) -> McItem:
    item = _generic_item(base, doc)  # lm-eval's prompt is the bare question stem
    return replace(item, stem=f"Question: {doc['question_stem'].strip()}")


def _siqa_item(base: ConfigurableTask, doc: dict) -> McItem:
    choices = (doc["answerA"], doc["answerB"], doc["answerC"])
    return McItem(f"Question: {doc['context']} {doc['question']}", choices, int(doc["label"]) - 1)


def _winogrande_item(base: ConfigurableTask, doc: dict) -> McItem:
    # lm-eval scores the sentence tail under two contexts; as MC the two fillers of "_" are the choices.
    return McItem(f"Fill in the blank: {doc['sentence']}", (doc["option1"], doc["option2"]),
                  int(doc["answer"]) - 1)


def _csqa_item(base: ConfigurableTask, doc: dict) -> McItem:
    # lm-eval already lists the choices but as "A. x" and without the OLMES leading space.
    labels = list(doc["choices"]["label"])
    return McItem(f"Question: {doc['question'].strip()}", tuple(doc["choices"]["text"]),
                  labels.index(doc["answerKey"].strip()))


def _mmlu_item(base: ConfigurableTask, doc: dict) -> McItem:
    return McItem(f"Question: {doc['question'].strip()}", tuple(doc["choices"]), int(doc["answer"]))


def _mmlu_pro_item(base: ConfigurableTask, doc: dict) -> McItem:
    # lm-eval's MMLU-Pro is CoT generation; the docs carry the 10 options and the gold index.
    return McItem(f"Question: {doc['question'].strip()}", tuple(o.strip() for o in doc["options"]),
                  int(doc["answer_index"]))


_AGIEVAL_CHOICES = re.compile(r"\s*Answer Choices:.*$", re.DOTALL)
_AGIEVAL_CUE = re.compile(r"\s*A:\s*Among A through [A-J], the answer is\s*$")
_CHOICE_LABEL = re.compile(r"^\s*\(?[A-J]\)\s*")


def _agieval_item(base: ConfigurableTask, doc: dict) -> McItem:
    # The hails/agieval-* docs hold a ready prompt "Q: ... Answer Choices: (A)x (B)y ...
    # A: Among A through E, the answer is", choices "(A)x" and gold [i]: keep the question part only.
    text = _AGIEVAL_CUE.sub("", doc["query"])
    text = _AGIEVAL_CHOICES.sub("", text).strip()
    text = re.sub(r"^Q:\s*", "", text)
    choices = [_CHOICE_LABEL.sub("", c).strip() for c in doc["choices"]]
    return McItem(f"Question: {text}", tuple(choices), _gold_index(doc["gold"], choices, base.config.task))


# Keys: exact lm-eval task names, or prefixes ending in "_". Tasks not listed use _generic_item.
_MC_ADAPTERS: dict[str, Callable[[Any, dict], McItem]] = {
    "openbookqa": _openbookqa_item,
    "social_iqa": _siqa_item,
    "winogrande": _winogrande_item,
    "commonsense_qa": _csqa_item,
    "mmlu_": _mmlu_item,
    "mmlu_pro_": _mmlu_pro_item,
    "agieval_": _agieval_item,
}
# MMLU-Pro's descriptions end by asking for step-by-step reasoning, which the MC format does not want.
_MC_DESCRIPTIONS: dict[str, Callable[[str], str]] = {
    "mmlu_pro_": lambda text: text.split(" Think step by step")[0].rstrip(".\n ") + ".\n\n",
}


def olmes_mc_render(item: McItem) -> str:
    """`{stem}\\n A. {c1}\\n B. {c2}...\\nAnswer:`, the prompt OLMES's MC format asks."""
    if len(item.choices) > len(LETTERS):
        raise FlexmoreError(f"{len(item.choices)} choices: more than {len(LETTERS)} letters")
    lines = [item.stem] + [f" {LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def olmes_mc_task(base: ConfigurableTask) -> ConfigurableTask:
    """The same questions as `base`, asked in OLMES's MC format and scored on the answer letter.

    The prompt is `{stem}\\n A. {c1}\\n B. {c2}\\n...\\nAnswer:` and the continuations are ' A', ' B', ...;
    few-shot examples are rendered the same way with their answer letter. The new task reuses the base
    task's downloaded data, splits, doc processing, few-shot pool and sampler, description and
    num_fewshot (except that shots drawn from the test split leave out the question being asked); it
    keeps the task name, so results and metric lookups are unchanged. Metric: acc.

    The stem comes from a per-task adapter (_MC_ADAPTERS: MMLU, MMLU-Pro, AGIEval, CSQA, SIQA,
    OpenBookQA, Winogrande) or else from the base prompt with a trailing 'Answer:'/'A:' removed. Limits
    of that generic rule: it fits prompts of the form '<question>\\nAnswer:' (ARC, PIQA, BoolQ,
    HellaSwag, local tasks); a prompt that already lists the choices would list them twice, and a
    multiple-input task (context varies per choice) is refused. A base task whose choices are already the
    letters A, B, ... is returned unchanged. Needs the base task built (its data loaded).
    """
    name = base.config.task
    adapter = _by_prefix(_MC_ADAPTERS, name)
    if adapter is None:
        if base.config.output_type != "multiple_choice":
            raise FlexmoreError(
                f"{name}: OLMES MC format needs a multiple_choice task, got {base.config.output_type}"
            )
        first = base.eval_docs[0]
        if list(base.doc_to_choice(first)) == list(LETTERS[: len(base.doc_to_choice(first))]):
            return base  # already asks for letters: its prompt lists the choices
        adapter = _generic_item

    def item(doc: dict) -> McItem:
        return adapter(base, doc)

    def doc_to_text(doc: dict) -> str:
        return olmes_mc_render(item(doc))

    def doc_to_choice(doc: dict) -> list[str]:
        return list(LETTERS[: len(item(doc).choices)])  # target_delimiter " " makes them " A", " B", ...

    def doc_to_target(doc: dict) -> int:
        return item(doc).gold

    formatting = {"doc_to_text": doc_to_text, "doc_to_choice": doc_to_choice, "doc_to_target": doc_to_target}
    describe = _by_prefix(_MC_DESCRIPTIONS, name)
    cfg = base.config
    config = {
        "task": cfg.task,
        "task_alias": cfg.task_alias,
        "tag": cfg.tag,
        "dataset_path": cfg.dataset_path,
        "dataset_name": cfg.dataset_name,
        "training_split": cfg.training_split,
        "validation_split": cfg.validation_split,
        "test_split": cfg.test_split,
        "fewshot_split": cfg.fewshot_split,
        "process_docs": cfg.process_docs,
        "description": describe(cfg.description) if describe else cfg.description,
        "fewshot_delimiter": cfg.fewshot_delimiter,
        "target_delimiter": " ",
        "fewshot_config": _mc_fewshot_config(base, formatting),
        "num_fewshot": cfg.num_fewshot,
        "output_type": "multiple_choice",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "should_decontaminate": cfg.should_decontaminate,
        "doc_to_decontamination_query": cfg.doc_to_decontamination_query,
        "metadata": {**(cfg.metadata or {}), "flexmore_format": "olmes_mc"},
        **formatting,
    }
    return _loaded_task_class()(config=config, dataset=base.dataset)


def _mc_fewshot_config(base: ConfigurableTask, formatting: dict[str, Callable[[dict], Any]]) -> Any:
    """The base's few-shot pool and sampler kind; only the rendering of the examples changes.

    One fix: a task with no few-shot split, no fixed examples and no train/validation split (AGIEval)
    has lm-eval draw its shots from the questions under test without leaving out the one being asked,
    so a 1-shot prompt can contain its own answer. Naming the test split as the few-shot split turns
    on lm-eval's exclusion of the asked question.
    """
    fewshot = replace(base.fewshot_cfg, target_delimiter=" ", gen_prefix=None, **formatting)
    draws_from_test = (fewshot.split is None and fewshot.samples is None
                       and not base.has_training_docs() and not base.has_validation_docs())
    return replace(fewshot, split=base.config.test_split) if draws_from_test else fewshot


@functools.cache
def _loaded_task_class() -> type:
    """ConfigurableTask over data already in memory: the MC view reuses what the base task downloaded.

    (lm-eval's `custom_dataset` hook would do the same but logs a warning per task, 57 for MMLU.)
    """
    from lm_eval.api.task import ConfigurableTask

    class LoadedTask(ConfigurableTask):
        def __init__(self, config: dict, dataset: Any) -> None:
            self._loaded_dataset = dataset
            super().__init__(config=config)

        def download(self, dataset_kwargs: dict | None = None, **kwargs: Any) -> None:
            self.dataset = self._loaded_dataset

    return LoadedTask


# --- building a group's lm-eval tasks ------------------------------------------------------------


def _identity(task: Task) -> Task:
    return task


_FORMAT_BUILDERS: dict[str, Callable[[Any], Any]] = {
    "mc": olmes_mc_task,
    "rc": _identity,  # lm-eval's multiple_choice tasks already use the cloze format
    "gen": _identity,
    "cot": _identity,
}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def _normalize_answer(text: str) -> list[str]:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between one prediction and one gold answer."""
    pred, ref = _normalize_answer(prediction), _normalize_answer(gold)
    if not pred or not ref:
        return float(pred == ref)
    common = sum(min(pred.count(t), ref.count(t)) for t in set(pred) & set(ref))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def add_token_f1(task: Task) -> Task:
    """Also score `task` (generation, gold answer or list of aliases) by its best SQuAD token F1.

    lm-eval 0.4.13's nq_open and triviaqa report exact match only, and its multi-target path would
    round any other metric to 0/1; the F1 is added to each document's scores here instead.
    """
    from lm_eval.api.metrics import mean

    inner = task.process_results

    def process_results(doc: dict, results: list) -> dict:
        scores = dict(inner(doc, results))
        golds = task.doc_to_target(doc)
        golds = golds if isinstance(golds, list) else [golds]
        prediction = results[0] if isinstance(results[0], str) else str(results[0])
        scores["f1"] = max(token_f1(prediction, str(g)) for g in golds)
        return scores

    task.process_results = process_results  # the instance attribute shadows the method
    # lm-eval looks aggregation up in these per-task dicts, which its methods return as they are.
    task._aggregation_list["f1"] = mean
    task._higher_is_better["f1"] = True
    return task


# (task or "prefix_", group metric) -> what build_group_tasks must add for lm-eval to report it.
_METRIC_PATCHES: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("nq_open", "f1"): add_token_f1,
    ("triviaqa", "f1"): add_token_f1,
}


def provide_squad_metrics() -> None:
    """Make `transformers.data.metrics.squad_metrics` importable for lm-eval 0.4.13's coqa scorer.

    That scorer imports SQuAD's compute_exact / compute_f1 from there, and transformers 5 (which
    flexmore needs) removed the module, so coqa fails to load before it reaches its data. When the
    module is missing, the same two functions (SQuAD's normalization and token F1) are registered
    under that name; an installed original is left alone.
    """
    name = "transformers.data.metrics.squad_metrics"
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    try:
        import transformers.data
    except ImportError:
        return  # no transformers at all: lm-eval's own import error will say so
    squad = types.ModuleType(name, "SQuAD answer metrics, provided by flexmore for lm-eval's coqa")
    squad.normalize_answer = lambda text: " ".join(_normalize_answer(text))
    squad.compute_exact = lambda gold, pred: int(_normalize_answer(gold) == _normalize_answer(pred))
    squad.compute_f1 = lambda gold, pred: token_f1(pred, gold)  # transformers' order: gold first
    package = types.ModuleType("transformers.data.metrics")
    package.squad_metrics = squad
    sys.modules.setdefault(package.__name__, package)
    sys.modules.setdefault(name, squad)
    transformers.data.metrics = sys.modules[package.__name__]


# task -> what must be in place before lm-eval can load it here (its YAML imports the scorer).
_LOAD_PREREQUISITES: dict[str, Callable[[], None]] = {"coqa": provide_squad_metrics}


def cap_eval_docs(task: Task, limit: int, seed: int = SUBSAMPLE_SEED) -> Task:
    """Evaluate `task` on a fixed-seed random `limit` of its questions (the paper capped each at 1000).

    The same questions come back on every call, in their original order. The few-shot pool is drawn
    when the task is built, so capping afterwards leaves it whole.
    """
    split = "test_docs" if task.has_test_docs() else "validation_docs"
    full = getattr(task, split)

    def capped():
        docs = full()
        if docs is None or len(docs) <= limit:
            return docs
        keep = sorted(random.Random(seed).sample(range(len(docs)), limit))
        return docs.select(keep) if hasattr(docs, "select") else [docs[i] for i in keep]

    setattr(task, split, capped)  # eval_docs (a property) calls this method, so shadow the method
    return task


def task_manager_for(*groups: BenchmarkGroup) -> TaskManager:
    """An lm-eval TaskManager indexing only the folders these groups' tasks live in (fast)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    dirs = sorted({d for g in groups for d in g.task_dirs})
    return TaskManager(include_defaults=False, include_path=[str(root / d) for d in dirs])


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What loading a dataset raises when the hub cannot be reached (datasets wraps most as
    ConnectionError, an OSError; huggingface_hub's own errors are included in case one escapes)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        from huggingface_hub import errors as hub_errors

        errors += [getattr(hub_errors, n) for n in ("HfHubHTTPError", "OfflineModeIsEnabled")
                   if hasattr(hub_errors, n)]
    except ImportError:
        pass
    return tuple(errors)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _offline_flag() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return var
    return None


def build_group_tasks(
    group: BenchmarkGroup | str,
    task_manager: TaskManager | None = None,
    limit: int | None = None,
) -> list[Task]:
    """The group's lm-eval tasks, ready for `lm_eval.simple_evaluate(tasks=...)`.

    Each task is loaded by lm-eval (which downloads its data from the Hugging Face dataset hub), put in
    the group's format (OLMES MC for "mc"), given the group's few-shot count, extended with any metric
    the group reads that lm-eval lacks (F1 for nq_open/triviaqa), and capped at `limit` questions.
    Fails with one FlexmoreError naming the first task whose data cannot be fetched, or whose scorer
    cannot be imported (minerva_math needs sympy, math_verify and antlr4-python3-runtime==4.11).
    """
    _require_lm_eval()
    group = get_group(group) if isinstance(group, str) else group
    if limit is not None and limit < 1:
        raise FlexmoreError(f"limit must be a positive number of questions, got {limit}")
    task_manager = task_manager or task_manager_for(group)
    unknown = [t for t in group.tasks if t not in task_manager.all_tasks]
    if unknown:
        raise FlexmoreError(f"benchmark group {group.name}: lm-eval has no task {', '.join(unknown[:5])}")

    built = []
    for name in group.tasks:
        prerequisite = _LOAD_PREREQUISITES.get(name)
        if prerequisite is not None:
            prerequisite()
        try:
            task = task_manager.load([name])["tasks"][name]
        except ImportError as error:  # a scorer's optional dependency, e.g. minerva_math's sympy
            raise FlexmoreError(
                f"benchmark group {group.name}: lm-eval cannot load {name} ({_short(error)})"
            ) from error
        except _hub_errors() as error:
            flag = _offline_flag()
            reason = f"{flag} is set; {_short(error)}" if flag else _short(error)
            raise FlexmoreError(
                f"benchmark group {group.name} needs the Hugging Face dataset hub, which is unreachable "
                f"({name}: {reason}); use local task files instead"
            ) from error
        task = _FORMAT_BUILDERS[group.format](task)
        if group.shots is not None:
            task.set_config("num_fewshot", group.shots)
        patch = _by_prefix(_METRIC_PATCHES, name, group.metric)
        if patch is not None:
            task = patch(task)
        if limit is not None:
            task = cap_eval_docs(task, limit)
        built.append(task)
    return built


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise FlexmoreError("benchmark groups run through lm-eval: pip install 'lm_eval==0.4.13'") from error
