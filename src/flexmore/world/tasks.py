"""Held-out local tasks for each domain of the tiny world, in the OLMES styles of eval/local.py.

Per domain two tasks:
  {domain}      RC multiple choice (4 choices, acc_per_char): does the model prefer the right answer?
  {domain}-bpb  bits per byte of held-out text (the gold continuation of a real prompt; lower is better)
The group of both is the domain's name, kept apart by metric in the analysis as "{domain}" and
"{domain}-bpb" groups so accuracies and bits are never averaged together.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .corpora import Domain


def mc_rows(domain: Domain, rng: random.Random, n: int) -> list[dict]:
    items = [x for x in domain.items if x["answer"]]
    answers = [x["answer"] for x in items]
    rows = []
    for item in items[:n]:
        wrong = item.get("distractors") or rng.sample([a for a in answers if a != item["answer"]], 3)
        choices = [item["answer"], *wrong[:3]]
        order = list(range(len(choices)))
        rng.shuffle(order)
        rows.append({"question": item["prompt"], "choices": [choices[i] for i in order], "answer": order.index(0)})
    return rows


def bpb_rows(domain: Domain, n: int, prompt_chars: int = 200, continuation_chars: int = 200) -> list[dict]:
    rows = []
    for text in domain.heldout[:n]:
        if len(text) < 60:
            continue
        cut = min(prompt_chars, len(text) // 2)
        gold = text[cut : cut + continuation_chars].strip()
        if gold:
            # a second choice is required by the format; bpb only scores the gold one
            rows.append({"question": text[:cut], "choices": [gold, gold[::-1]], "answer": 0})
    return rows


def write_tasks(domains: dict[str, Domain], out: Path, seed: int = 0, n: int = 40) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for name, domain in domains.items():
        for task, header, rows in (
            (name, {"name": name, "group": name, "format": "rc", "metric": "acc_per_char"}, mc_rows(domain, rng, n)),
            (f"{name}-bpb", {"name": f"{name}-bpb", "group": f"{name}-bpb", "format": "rc", "metric": "bpb"},
             bpb_rows(domain, n)),
        ):
            path = out / f"{task}.jsonl"
            path.write_text("\n".join(json.dumps(x) for x in [{"task": header}, *rows]) + "\n", encoding="utf-8")
            files.append(path)
    return files
