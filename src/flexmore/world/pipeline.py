"""`flexmore demo`: the whole FlexMoRE study, offline, on a tiny world built on the spot.

Steps (each recorded in OUT/steps.json when finished; a rerun into the same OUT resumes after the last
finished step, and every step's outputs are written atomically):
  text        public corpus + four owners' domains (corpora.py) and their held-out tasks (tasks.py)
  tokenizer   a byte-level BPE tokenizer trained on all of it
  public      the public model, pretrained from scratch (OLMo-2 architecture, 1 expert)
  federate    each owner trains its expert on its own data through Flower (simulation engine), and the
              server merges the answers into one N-expert model
  svd         one SVD cache for ranks 2^0 .. max (every matrix factorised once)
  sweep       public alone, public + each expert at each rank (k=2), all experts at each rank x k
  select      heterogeneous ranks from the 2-expert results: "All" and one group
  selections  the selected mixtures evaluated at each k
  final       the best selection written as a FlexMoRE checkpoint (AutoModelForCausalLM after import flexmore)
  report      report.md with figures and a headline table
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checkpoint import atomic_dir
from ..errors import FlexmoreError


@dataclass
class Preset:
    docs_per_domain: int
    vocab_size: int
    pretrain_steps: int
    expert_steps: int
    hidden_size: int
    intermediate_size: int
    layers: int
    seq_len: int
    ranks: str
    ks: str
    task_size: int
    batch_size: int = 16
    expert_lr: float = 2e-3
    pretrain_lr: float = 3e-3
    group_for_selection: str = "math"
    extra: dict = field(default_factory=dict)


PRESETS = {
    "quick": Preset(docs_per_domain=150, vocab_size=1024, pretrain_steps=150, expert_steps=60, hidden_size=64,
                    intermediate_size=176, layers=2, seq_len=96, ranks="1,4,16,full", ks="2,N", task_size=24),
    "full": Preset(docs_per_domain=600, vocab_size=2048, pretrain_steps=1500, expert_steps=400, hidden_size=128,
                   intermediate_size=352, layers=4, seq_len=128, ranks="1,2,4,8,16,32,64,full", ks="2,4,N",
                   task_size=60),
}

KINDS = {"code": "reasoning", "math": "reasoning", "chat": "knowledge", "facts": "knowledge"}


def run_demo(out: str | Path, preset: str = "quick", seed: int = 0,
             log: Callable[[str], None] | None = print) -> dict:
    if preset not in PRESETS:
        raise FlexmoreError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    log = log or (lambda _m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "steps.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    settings = {"preset": preset, "seed": seed, **asdict(p)}
    if state.get("settings", settings) != settings:
        raise FlexmoreError(f"{out}: holds a demo run with other settings ({state['settings']['preset']}, seed "
                            f"{state['settings']['seed']}); use another --out")
    state["settings"] = settings

    def step(name: str, work: Callable[[], dict | None]) -> dict:
        if name in state.get("done", {}):
            log(f"[{name}] done before, skipped")
            return state["done"][name]
        log(f"[{name}] ...")
        start = time.perf_counter()
        result = work() or {}
        result["seconds"] = round(time.perf_counter() - start, 1)
        state.setdefault("done", {})[name] = result
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(state_file)
        log(f"[{name}] finished in {result['seconds']} s")
        return result

    def progress(name: str) -> Callable[[int, int, str], None]:
        """A progress callback printing about every tenth of a step's work (and its last item)."""
        shown = 0

        def tick(done: int, total: int, what: str = "") -> None:
            nonlocal shown
            if done >= total or done - shown >= max(1, total // 10):
                shown = done
                log(f"[{name}] {done}/{total}" + (f" {what}" if what else ""))

        return tick

    from .corpora import build_world_text, write_jsonl
    from .tasks import write_tasks

    world_text: dict = {}

    def text_step():
        public, domains = build_world_text(seed, p.docs_per_domain)
        with atomic_dir(out / "data", overwrite=True) as tmp:
            write_jsonl(tmp / "public.jsonl", public)
            for name, d in domains.items():
                write_jsonl(tmp / name / "train.jsonl", d.train)
                write_jsonl(tmp / name / "heldout.jsonl", d.heldout)
        with atomic_dir(out / "tasks", overwrite=True) as tmp:
            write_tasks(domains, tmp, seed=seed, n=p.task_size)
        return {"domains": {n: {"kind": d.kind, "source": d.source, "train_docs": len(d.train)}
                            for n, d in domains.items()}, "public_docs": len(public)}

    world_text.update(step("text", text_step))
    domains = list(world_text["domains"])

    def read_jsonl(path: Path) -> list[str]:
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def tokenizer_step():
        from ..tiny import build_tokenizer

        texts = read_jsonl(out / "data" / "public.jsonl")
        for name in domains:
            texts += read_jsonl(out / "data" / name / "train.jsonl")
        tok = build_tokenizer(texts, vocab_size=p.vocab_size)
        with atomic_dir(out / "tokenizer", overwrite=True) as tmp:
            tok.save_pretrained(tmp)
        return {"vocab_size": len(tok)}

    step("tokenizer", tokenizer_step)

    def public_step():
        from transformers import AutoTokenizer

        from .pretrain import PretrainConfig, pretrain_public

        tok = AutoTokenizer.from_pretrained(out / "tokenizer")
        config = PretrainConfig(hidden_size=p.hidden_size, intermediate_size=p.intermediate_size, layers=p.layers,
                                seq_len=p.seq_len, batch_size=p.batch_size, steps=p.pretrain_steps,
                                lr=p.pretrain_lr, seed=seed)
        losses = []
        tick = progress("public")

        def on_step(done: int, loss: float, tokens_per_s: float) -> None:
            losses.append(loss)
            tick(done, p.pretrain_steps, f"loss {loss:.3f}, {tokens_per_s:,.0f} tokens/s")

        pretrain_public(read_jsonl(out / "data" / "public.jsonl"), tok, out / "public", config, on_step=on_step)
        return {"first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3)}

    step("public", public_step)

    def federate_step():
        from ..federated.run import run_federation_simulation

        owners = [(name, str(out / "data" / name / "train.jsonl")) for name in domains]
        train = {"steps": p.expert_steps, "batch_size": p.batch_size, "seq_len": p.seq_len, "lr": p.expert_lr,
                 "warmup_steps": max(1, p.expert_steps // 10), "seed": seed, "checkpoint_every": 0,
                 "max_docs_embed": 200}
        result = run_federation_simulation(out / "public", owners, out / "flexolmo", train=train, overwrite=True,
                                           num_cpus=2)
        return {"summary": result.summary if hasattr(result, "summary") else None}

    step("federate", federate_step)

    def svd_step():
        from ..extract import extract

        config = json.loads((out / "flexolmo" / "config.json").read_text())
        total = (config["num_experts"] - 1) * config["num_hidden_layers"] * 3
        tick, seen = progress("svd"), []

        def on_step(what: str) -> None:
            seen.append(what)
            tick(len(seen), total, what)

        result = extract(out / "flexolmo", out / "extract", sweep=p.ranks, cache_only=True, cache_dir=out / "svd-cache",
                         on_step=on_step)
        return {"timings": result.timings}

    step("svd", svd_step)
    tasks = [str(out / "tasks")]

    def sweep_step():
        from ..eval.sweep import run_sweep

        s = run_sweep(out / "flexolmo", tasks, out / "results.sqlite", ranks=p.ranks, ks=p.ks,
                      cache_dir=out / "svd-cache", include=("public", "pair", "homogeneous"), batch_size=16,
                      on_progress=progress("sweep"))
        return {"mixtures": s.mixtures, "evaluated": s.evaluated}

    step("sweep", sweep_step)

    def select_step():
        from ..analysis.selection import select_ranks

        picks = {}
        for by in ("All", p.group_for_selection):
            path = out / "selections" / f"best-{by}.json"
            path.parent.mkdir(exist_ok=True)
            selection = select_ranks(out / "results.sqlite", path, by=by, overwrite=True)
            picks[by] = selection.to_dict()["ranks"] if hasattr(selection, "to_dict") else str(path)
        return {"selections": picks}

    picks = step("select", select_step)

    def selections_step():
        from ..eval.sweep import run_sweep

        specs = [str(out / "selections" / f"best-{by}.json") for by in ("All", p.group_for_selection)]
        s = run_sweep(out / "flexolmo", tasks, out / "results.sqlite", ranks=p.ranks, ks=p.ks, specs=specs,
                      cache_dir=out / "svd-cache", include=("heterogeneous",), batch_size=16,
                      on_progress=progress("selections"))
        return {"evaluated": s.evaluated}

    step("selections", selections_step)

    def final_step():
        from ..extract.pipeline import assemble_from_cache

        report = assemble_from_cache(out / "svd-cache", out / "final-flexmore",
                                     ranks=str(out / "selections" / "best-All.json"), overwrite=True)
        return {"expert_ranks": report["expert_ranks"], "parameters": report["parameters"]}

    step("final", final_step)

    def report_step():
        from ..analysis.report import write_report

        kinds = {}
        for name in domains:
            kinds[name] = KINDS.get(name, "knowledge")
            kinds[f"{name}-bpb"] = KINDS.get(name, "knowledge")
        write_report(out / "results.sqlite", out / "report", kinds=kinds, overwrite=True)
        return {"report": str(out / "report" / "report.md")}

    step("report", report_step)
    log(f"done: {out / 'report' / 'report.md'}; final model {out / 'final-flexmore'}")
    return state
