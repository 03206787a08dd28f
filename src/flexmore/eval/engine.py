"""Evaluation through lm-evaluation-harness: wrap a model object, run local task files and named groups.

    results = evaluate(model, tokenizer, ["facts.jsonl", "MC9"], limit=1000)

Local tasks run offline (local.py); named benchmark groups (groups.py) need the dataset hub.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

from ..errors import FlexmoreError
from .local import LOWER_IS_BETTER, build_lm_eval_task, read_task_file


@dataclass
class TaskResult:
    task: str
    group: str
    metrics: dict[str, float]  # every metric the task computes, as fractions (bpb in bits per byte)
    main_metric: str  # the task's headline metric
    n: int  # instances evaluated

    @property
    def score(self) -> float:
        return self.metrics[self.main_metric]


@dataclass
class TaskRef:
    """A task to run: built lazily so a sweep parses everything once and builds per mixture."""

    name: str
    group: str
    main_metric: str
    source: str  # "local" or "hub"
    path: Path | None = None
    lm_eval_tasks: list = field(default_factory=list)


def resolve_tasks(items: list[str]) -> list[TaskRef]:
    """Task files (*.jsonl), directories of them, and named benchmark groups, validated up front."""
    refs: list[TaskRef] = []
    for item in items:
        path = Path(item)
        if item.endswith(".jsonl") or path.is_dir():
            files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
            if path.is_dir() and not files:
                raise FlexmoreError(f"{path}: no *.jsonl task files")
            for file in files:
                spec = read_task_file(file)
                refs.append(TaskRef(spec.name, spec.group, spec.metric, "local", path=file))
        else:
            from .groups import get_group

            group = get_group(item)
            for task in group.tasks:
                refs.append(TaskRef(task, group.name, group.metric, "hub"))
    names = [r.name for r in refs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FlexmoreError(f"--tasks: task names must be unique, {', '.join(dupes)} appear twice")
    return refs


def make_lm(model, tokenizer, batch_size: int | str = 8, device: str | None = None, progress: bool = True):
    """lm-eval's HFLM around a model object already in memory (FlexMoRE or FlexOlmo).

    progress=False silences lm-eval's per-request progress bars (a sweep shows its own progress)."""
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()  # before HFLM warns that it was handed a model object, which is what we mean to do
    device = device or str(next(model.parameters()).device)
    cls = HFLM if progress else _quiet_hflm(HFLM)
    return cls(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, device=device)


@cache
def _quiet_hflm(hflm: type) -> type:
    """HFLM whose request methods never draw a progress bar (lm-eval's evaluator gives no way to ask)."""

    class QuietHFLM(hflm):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def lm_eval_tasks(refs: list[TaskRef], limit: int | None = None) -> list:
    """Build the lm-eval task objects (hub groups loaded once per group)."""
    quiet_lm_eval()  # building a local task warns about lm-eval's --metadata option, which we do not use
    tasks = []
    by_group: dict[str, list[TaskRef]] = {}
    for ref in refs:
        if ref.source == "local":
            tasks.append(build_lm_eval_task(read_task_file(ref.path)))
        else:
            by_group.setdefault(ref.group, []).append(ref)
    if by_group:
        from .groups import build_group_tasks, get_group

        for group in by_group:
            tasks.extend(build_group_tasks(get_group(group), limit=limit))
    return tasks


def evaluate(model, tokenizer, tasks: list[str] | list[TaskRef], limit: int | None = None,
             batch_size: int | str = 8, device: str | None = None, lm=None, progress: bool = True) -> list[TaskResult]:
    """Run lm-eval on the tasks; `limit` caps instances per task (the paper used 1000).

    progress=False: no lm-eval progress bars (a caller showing its own progress, like the sweep)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    refs = tasks if tasks and isinstance(tasks[0], TaskRef) else resolve_tasks(list(tasks))
    lm = lm or make_lm(model, tokenizer, batch_size, device, progress=progress)
    built = lm_eval_tasks(refs, limit)  # quiets lm-eval's logging, as make_lm does
    unsafe = any(ref.group == "Code4" for ref in refs)  # code tasks execute generated programs
    with _request_bars(progress):
        out = lm_eval.simple_evaluate(model=lm, tasks=built, limit=limit, bootstrap_iters=0, log_samples=False,
                                      task_manager=TaskManager(include_defaults=False), verbosity="ERROR",
                                      confirm_run_unsafe_code=unsafe)
    return collect(refs, out)


def collect(refs: list[TaskRef], out: dict) -> list[TaskResult]:
    results = []
    for ref in refs:
        raw = out["results"].get(ref.name)
        if raw is None:
            raise FlexmoreError(f"lm-eval returned no result for task {ref.name}")
        if ref.source == "hub":  # read where the group says its metric sits (name, filter, scale)
            from .groups import get_group

            spec = get_group(ref.group).metric_spec(ref.name)
            metrics = {ref.main_metric: float(raw[spec.key]) / spec.scale} if spec.key in raw else {}
            if not metrics:
                raise FlexmoreError(f"{ref.group} {ref.name}: lm-eval results have no {spec.key}")
        else:
            metrics = {key.split(",")[0]: float(v) for key, v in raw.items()
                       if "," in key and not key.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        n = int(out.get("n-samples", {}).get(ref.name, {}).get("effective", 0))
        results.append(TaskResult(ref.name, ref.group, metrics, ref.main_metric, n))
    return results


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


@contextmanager
def _request_bars(shown: bool):
    """lm-eval draws a bar per task while building its requests, with no option to turn it off."""
    import lm_eval.api.task as lm_eval_task

    drawn = lm_eval_task.tqdm
    if not shown:
        lm_eval_task.tqdm = partial(drawn, disable=True)
    try:
        yield
    finally:
        lm_eval_task.tqdm = drawn


def quiet_lm_eval() -> None:
    """lm-eval logs per-task chatter, asks git for a commit hash and collects the whole environment's
    description (0.5 s per call) for its own result files; we write our own provenance instead."""
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lm_eval.evaluator as lm_evaluator

    lm_evaluator.get_git_commit_hash = lambda: None
    lm_evaluator.add_env_info = lambda results: None


def group_scores(results: list[TaskResult], micro: bool = False) -> dict[str, float]:
    """Per group: the unweighted mean of its tasks' headline scores (macro), or instance-weighted (micro)."""
    groups: dict[str, list[TaskResult]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    out = {}
    for group, rs in groups.items():
        if micro:
            total = sum(r.n for r in rs)
            out[group] = sum(r.score * r.n for r in rs) / total if total else float("nan")
        else:
            out[group] = sum(r.score for r in rs) / len(rs)
    return out


def mean_of_group_means(scores: dict[str, float]) -> float:
    """The headline: every group counts once, whatever its number of tasks (REFERENCE §7)."""
    return sum(scores.values()) / len(scores)
