"""Local tasks: JSONL files in the OLMES styles, evaluated offline through lm-evaluation-harness.

File format (one JSON object per line; blank lines ignored):

    {"task": {"name": "capitals", "group": "facts", "format": "rc", "shots": 2, "metric": "acc_per_char"}}
    {"question": "What is the capital of France?", "choices": ["Paris", "Lyon", "Nice"], "answer": 0}
    {"question": "...", "choices": [...], "answer": 2, "split": "fewshot"}
    {"context": "optional passage", "question": "...", "answer": "Paris"}          (format "gen")

The first line may be a header (`"task"`): name (default: the file's stem), group (default: the name),
format, shots (few-shot examples, drawn from rows with `"split": "fewshot"`), metric (the task's
headline metric). Formats and what they score (REFERENCE §7):

  rc   cloze:  "Question: {q}\\nAnswer:" + " {choice}"            acc_raw acc_per_char acc_uncond bpb
  mc   letters: "Question: {q}\\n A. {c1}\\n B. {c2}...\\nAnswer:" + " A"   (same metrics, over the letters)
  gen  "Question: {q}\\nAnswer:" then greedy generation to the end of the line     exact_match f1

  acc_raw       the choice with the highest summed log-probability of its continuation
  acc_per_char  ... divided by the continuation's length in characters
  acc_uncond    ... minus the log-probability of the same continuation after a bare "Answer:"
  bpb           bits per byte of the gold continuation: -log2 p(gold | prompt) / UTF-8 bytes (lower is better)
  exact_match   normalised answer equals one of the gold answers (SQuAD normalisation)
  f1            best token-overlap F1 against the gold answers
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FlexmoreError
from ..jsonl import jsonl_objects

FORMATS = ("rc", "mc", "gen")
CHOICE_METRICS = ("acc_raw", "acc_per_char", "acc_uncond", "bpb")
GEN_METRICS = ("exact_match", "f1")
DEFAULT_METRIC = {"rc": "acc_per_char", "mc": "acc_raw", "gen": "exact_match"}
LOWER_IS_BETTER = {"bpb"}
UNCOND_CONTEXT = "Answer:"  # OLMES's unconditional prompt for acc_uncond
LETTERS = string.ascii_uppercase


@dataclass
class LocalTaskSpec:
    """A parsed task file: header fields plus its test and few-shot rows."""

    path: Path
    name: str
    group: str
    format: str
    shots: int
    metric: str
    docs: list[dict] = field(default_factory=list)
    fewshot: list[dict] = field(default_factory=list)

    @property
    def metrics(self) -> tuple[str, ...]:
        return GEN_METRICS if self.format == "gen" else CHOICE_METRICS


def read_task_file(path: str | Path) -> LocalTaskSpec:
    """Parse and validate a task file; any problem is one FlexmoreError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FlexmoreError(f"{path}: no such task file")
    header: dict = {}
    rows: list[tuple[int, dict]] = []
    for lineno, obj in jsonl_objects(path.read_text(encoding="utf-8"), path):
        if "task" in obj:
            if rows or header:
                raise FlexmoreError(f"{path}:{lineno}: the 'task' header must be the first line")
            header = obj["task"] if isinstance(obj["task"], dict) else {}
            continue
        rows.append((lineno, obj))
    fmt = header.get("format", "rc")
    if fmt not in FORMATS:
        raise FlexmoreError(f"{path}:1: format {fmt!r} is not one of {', '.join(FORMATS)}")
    name = str(header.get("name", path.stem))
    spec = LocalTaskSpec(path=path, name=name, group=str(header.get("group", name)), format=fmt,
                         shots=int(header.get("shots", 0)), metric=str(header.get("metric", DEFAULT_METRIC[fmt])))
    if spec.metric not in spec.metrics:
        raise FlexmoreError(f"{path}:1: metric {spec.metric!r} is not one of {', '.join(spec.metrics)} for {fmt}")
    for lineno, row in rows:
        doc = _check_row(path, lineno, row, fmt)
        (spec.fewshot if row.get("split") == "fewshot" else spec.docs).append(doc)
    if not spec.docs:
        raise FlexmoreError(f"{path}: no test rows")
    if spec.shots > len(spec.fewshot):
        raise FlexmoreError(f"{path}:1: shots={spec.shots} but only {len(spec.fewshot)} rows have \"split\": \"fewshot\"")
    return spec


def _check_row(path: Path, lineno: int, row: dict, fmt: str) -> dict:
    where = f"{path}:{lineno}"
    if not isinstance(row.get("question"), str):
        raise FlexmoreError(f"{where}: missing 'question' (a string)")
    doc = {"question": row["question"], "context": str(row.get("context", "")), "line": lineno}
    if fmt == "gen":
        answer = row.get("answer")
        answers = [answer] if isinstance(answer, str) else answer
        if not answers or not all(isinstance(a, str) for a in answers):
            raise FlexmoreError(f"{where}: 'answer' must be a string or a list of strings for a gen task")
        doc["answers"] = answers
        return doc
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise FlexmoreError(f"{where}: 'choices' must be a list of at least two strings")
    if fmt == "mc" and len(choices) > len(LETTERS):
        raise FlexmoreError(f"{where}: at most {len(LETTERS)} choices in the letter format")
    answer = row.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise FlexmoreError(f"{where}: 'answer' must be the index of the right choice (0..{len(choices) - 1})")
    doc.update(choices=choices, answer=answer)
    return doc


# --------------------------------------------------------------------------------------- formatting


def prompt(doc: dict, fmt: str) -> str:
    head = f"{doc['context']}\n" if doc.get("context") else ""
    if fmt == "mc":
        listed = "".join(f"\n {LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"]))
        return f"{head}Question: {doc['question']}{listed}\nAnswer:"
    return f"{head}Question: {doc['question']}\nAnswer:"


def continuations(doc: dict, fmt: str) -> list[str]:
    """What is scored after the prompt, leading space included."""
    if fmt == "mc":
        return [f" {LETTERS[i]}" for i in range(len(doc["choices"]))]
    return [f" {c}" for c in doc["choices"]]


# ---------------------------------------------------------------------------------------- metrics


def choice_metrics(doc: dict, fmt: str, loglikelihoods: list[float], unconditional: list[float]) -> dict[str, float]:
    """The four choice metrics of one instance from summed continuation log-probabilities (natural log)."""
    conts = continuations(doc, fmt)
    gold = doc["answer"]

    def argmax(scores: list[float]) -> int:
        return max(range(len(scores)), key=scores.__getitem__)

    return {
        "acc_raw": float(argmax(loglikelihoods) == gold),
        "acc_per_char": float(argmax([ll / len(c) for ll, c in zip(loglikelihoods, conts)]) == gold),
        "acc_uncond": float(argmax([ll - u for ll, u in zip(loglikelihoods, unconditional)]) == gold),
        "bpb": -loglikelihoods[gold] / (math.log(2) * len(conts[gold].encode("utf-8"))),
    }


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(doc: dict, generated: str) -> dict[str, float]:
    answer = generated.split("\n")[0].strip()
    return {
        "exact_match": float(any(normalize_answer(answer) == normalize_answer(g) for g in doc["answers"])),
        "f1": max(token_f1(answer, g) for g in doc["answers"]),
    }


# ------------------------------------------------------------------------------------- lm-eval task


def build_lm_eval_task(spec: LocalTaskSpec):
    """An lm-eval task over the spec's rows (held in memory: no dataset download, no cache)."""
    import datasets
    from lm_eval.api.instance import Instance
    from lm_eval.api.task import ConfigurableTask

    fmt = spec.format

    def dataset(**_kwargs):
        splits = {"test": datasets.Dataset.from_list(spec.docs)}
        if spec.fewshot:
            splits["train"] = datasets.Dataset.from_list(spec.fewshot)
        return datasets.DatasetDict(splits)

    def doc_to_target(doc: dict):
        if fmt == "gen":
            return " " + doc["answers"][0]  # few-shot examples show the first answer
        return doc["answer"]

    def process_results(doc: dict, results: list) -> dict[str, float]:
        if fmt == "gen":
            return generation_metrics(doc, results[0])
        n = len(doc["choices"])
        lls = [r[0] for r in results[:n]]
        unconditional = [r[0] for r in results[n : 2 * n]]
        return choice_metrics(doc, fmt, lls, unconditional)

    class LocalTask(ConfigurableTask):
        def construct_requests(self, doc, ctx, **kwargs):
            requests = super().construct_requests(doc, ctx, **kwargs)
            if fmt == "gen":
                return requests
            kwargs.pop("apply_chat_template", None)
            kwargs.pop("chat_template", None)
            extra = [
                Instance(request_type="loglikelihood", doc=doc, arguments=(UNCOND_CONTEXT, cont),
                         idx=len(requests) + i, **kwargs)
                for i, cont in enumerate(continuations(doc, fmt))
            ]
            return requests + extra

    config = {
        "task": spec.name,
        "custom_dataset": dataset,
        "test_split": "test",
        "fewshot_split": "train" if spec.fewshot else None,
        "num_fewshot": spec.shots,
        "output_type": "generate_until" if fmt == "gen" else "multiple_choice",
        "doc_to_text": lambda doc: prompt(doc, fmt),
        "doc_to_target": doc_to_target,
        "target_delimiter": "" if fmt == "gen" else " ",
        "fewshot_delimiter": "\n\n",
        "process_results": process_results,
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": m not in LOWER_IS_BETTER} for m in spec.metrics
        ],
        "metadata": {"version": 1},
    }
    if fmt != "gen":
        # choices as continuations; lm-eval adds its target_delimiter (" ") in front
        config["doc_to_choice"] = lambda doc: [c[1:] for c in continuations(doc, fmt)]
    else:
        config["generation_kwargs"] = {"until": ["\n"], "do_sample": False, "max_gen_toks": 32}
    return LocalTask(config=config)
