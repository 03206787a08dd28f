"""`flexmore demo --preset quick`: the whole study on the tiny world, end to end (a few minutes)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from transformers import AutoModelForCausalLM

import flexmore  # noqa: F401 - registers the Auto classes
from flexmore.world.corpora import build_world_text
from flexmore.world.pipeline import run_demo

DOMAINS = ("code", "chat", "math", "facts")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "demo"
    messages = []
    run_demo(out, preset="quick", seed=0, log=messages.append)
    return out, messages


def test_world_text_is_deterministic_and_real():
    public_a, domains_a = build_world_text(seed=3, docs_per_domain=30)
    public_b, domains_b = build_world_text(seed=3, docs_per_domain=30)
    assert public_a == public_b and all(domains_a[n].train == domains_b[n].train for n in DOMAINS)
    assert {d.kind for d in domains_a.values()} == {"knowledge", "reasoning"}
    assert any("def " in doc for doc in domains_a["code"].train)  # Python's own sources
    assert all(doc.startswith("A: ") for doc in domains_a["chat"].train)  # human conversations
    assert not set(domains_a["math"].train) & set(domains_a["math"].heldout)


def test_demo_writes_every_artefact(demo):
    out, messages = demo
    steps = json.loads((out / "steps.json").read_text())["done"]
    assert list(steps) == ["text", "tokenizer", "public", "federate", "svd", "sweep", "select", "selections",
                           "final", "report"]
    model = AutoModelForCausalLM.from_pretrained(out / "final-flexmore")
    assert type(model).__name__ == "FlexMoREForCausalLM" and model.config.num_experts == 5
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
    report = (out / "report" / "report.md").read_text()
    assert "## Headline" in report and "public model alone" in report and "all experts full-size" in report
    assert "heterogeneous: best-All" in report and "heterogeneous: best-math" in report
    for figure in ("fig2_average_vs_rank.png", "fig3_peak_ranks.png", "fig4_group_vs_rank.png"):
        assert (out / "report" / figure).stat().st_size > 10_000
    summary = json.loads((out / "flexolmo.federation.json").read_text())
    assert summary  # the Flower server's per-owner upload report


def test_experts_beat_the_public_model_on_their_own_domain(demo):
    out, _ = demo
    con = sqlite3.connect(out / "results.sqlite")
    bits = {}
    for kind, expert, task, value in con.execute(
            "SELECT kind, expert_under_test, task, value FROM results WHERE metric = 'bpb' AND is_main = 1 "
            "AND (kind = 'public' OR (kind = 'pair' AND rank_label = 'full'))"):
        bits[(expert if kind == "pair" else "public", task)] = value
    for domain in DOMAINS:
        assert bits[(domain, f"{domain}-bpb")] < bits[("public", f"{domain}-bpb")], domain


def test_rerun_resumes_finished_steps(demo):
    out, _ = demo
    messages = []
    run_demo(out, preset="quick", seed=0, log=messages.append)
    assert sum("skipped" in m for m in messages) == 10
    with pytest.raises(flexmore.FlexmoreError, match="other settings"):
        run_demo(out, preset="quick", seed=1, log=None)


def test_same_seed_same_numbers(demo, tmp_path):
    out, _ = demo
    again = tmp_path / "again"
    run_demo(again, preset="quick", seed=0, log=None)

    def values(path):
        con = sqlite3.connect(path)
        try:
            return {(m, t, metric): v for m, t, metric, v in con.execute("SELECT mixture, task, metric, value FROM results")}
        finally:
            con.close()

    first, second = values(out / "results.sqlite"), values(again / "results.sqlite")
    assert first and first == second
    for name in ("public/model.safetensors", "final-flexmore/model.safetensors", "tokenizer/tokenizer.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
