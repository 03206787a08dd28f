"""The sweep fanned out on Ray: one task per mixture, results back to the driver, which alone writes SQLite.

    flexmore sweep ... --ray local:8      # a Ray instance on this machine with 8 CPUs
    flexmore sweep ... --ray auto         # the running cluster (`ray start --head` on the same venv)

Each Ray task builds its mixture from the source checkpoint and the SVD cache (so both must be readable
at the same paths on every node: a shared filesystem) and returns plain rows; the driver records them
one (mixture, task) at a time as tasks complete, exactly as the local loop does, so a killed sweep
resumes the same way. Workers run the driver's Python (`sys.executable`): on a local instance they
inherit it, on a cluster it is requested through the job's runtime_env.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace

from ..errors import FlexmoreError
from .engine import TaskRef
from .store import Mixture, ResultStore

MISSING = "--ray needs Ray: pip install 'flexmore[ray]'"


def import_ray():
    try:
        import ray
    except ImportError:
        raise FlexmoreError(MISSING) from None
    return ray


def parse_address(address: str) -> dict:
    """ray.init keyword arguments for --ray: 'auto', 'local' / 'local:N' (N CPUs), or a cluster address."""
    address = address.strip()
    if address == "local" or address.startswith("local:"):
        count = address.partition(":")[2]
        if count and not (count.isdigit() and int(count) > 0):
            raise FlexmoreError(f"--ray {address!r}: expected local:N with N a positive number of CPUs")
        # address="local": a new instance even where `ray start` left one running; workers inherit
        # this process's interpreter and environment
        return {"address": "local", **({"num_cpus": int(count)} if count else {})}
    if not address:
        raise FlexmoreError("--ray: expected 'auto', 'local[:N]' or a cluster address")
    if address.startswith("ray://"):  # Ray Client: this machine's interpreter path means nothing there
        return {"address": address}
    # a cluster: its workers run this venv's interpreter (same paths on every node, as Ray itself assumes)
    return {"address": address, "runtime_env": {"py_executable": sys.executable}}


def connect(ray, address: str) -> bool:
    """Start or join Ray; True when this call did it (and so must shut it down). An existing
    connection in this process (a notebook, a test) is used as it is."""
    kwargs = parse_address(address)  # validated even when joining, so a typo never passes silently
    if ray.is_initialized():
        return False
    try:
        # worker output (lm-eval's progress bars, one per task) would garble the driver's progress
        # display; it stays in Ray's session logs, and failures come back as exceptions
        with warnings.catch_warnings():  # Ray's FutureWarning about a default to change, on every start
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(**kwargs, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FlexmoreError(f"--ray {address}: cannot start or reach Ray ({exc})") from None
    return True


def run_on_ray(
    address: str,
    source: str,
    cache_path: str | None,
    todo: list[tuple[Mixture, list[int], list[TaskRef]]],
    store: ResultStore,
    limit: int | None,
    batch_size: int | str,
    device: str,
    done: int,
    total: int,
    on_progress: Callable[[int, int, str], None] | None,
    *,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
) -> int:
    """Evaluate every (mixture, pending tasks) of `todo` as Ray tasks; returns the (mixture, task) pairs run.

    Each task asks for 1 GPU when `device` is CUDA (plus Ray's usual 1 CPU), else 1 CPU; num_gpus /
    num_cpus override (e.g. num_gpus=0.5 packs two small mixtures per GPU). The first failing mixture
    stops the sweep with one FlexmoreError naming it; results already recorded, and those of mixtures
    that finished alongside it, stay in the store.
    """
    ray = import_ray()
    if not todo:
        return 0
    cuda = device.startswith("cuda")
    num_gpus = (1 if cuda else 0) if num_gpus is None else num_gpus
    num_cpus = 1 if num_cpus is None else num_cpus
    # Ray shows each task only the GPUs it was granted (CUDA_VISIBLE_DEVICES): "cuda:3" would not exist there
    worker_device = "cuda" if cuda and num_gpus > 0 else device
    from .sweep import evaluate_mixture  # pickled by reference: workers import their own flexmore

    # cluster workers start elsewhere than this process: ship absolute paths (a hub id stays as it is)
    source = os.path.abspath(source) if os.path.exists(source) else source
    cache_path = os.path.abspath(cache_path) if cache_path else None
    todo = [(m, experts, [replace(r, path=r.path.resolve()) if r.path else r for r in refs])
            for m, experts, refs in todo]

    started_here = connect(ray, address)
    remote = ray.remote(evaluate_mixture)
    running: dict = {}
    evaluated = 0

    def record(ref) -> None:
        nonlocal done, evaluated
        mixture = running.pop(ref)
        for task, group, metrics, main_metric, n in ray.get(ref):
            store.record(mixture, task, group, metrics, main_metric, n)
            done += 1
            evaluated += 1
            if on_progress:
                on_progress(done, total, f"{mixture.id} / {task}")

    try:
        for mixture, experts, refs in todo:
            ref = remote.options(num_gpus=num_gpus, num_cpus=num_cpus, name=f"flexmore-sweep {mixture.id}").remote(
                source, cache_path, experts, mixture, refs, limit, batch_size, worker_device)
            running[ref] = mixture
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            mixture = running[ref]
            try:
                record(ref)
            except ray.exceptions.RayError as exc:
                keep_finished(ray, running, record)
                # chained: --debug shows the worker's traceback
                raise FlexmoreError(f"mixture {mixture.id}: evaluation failed on Ray ({describe(exc)})") from exc
        return evaluated
    finally:
        for ref in running:  # after a failure or Ctrl-C: free the cluster
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already gone; the error that brought us here matters
                pass
        if started_here:
            ray.shutdown()


def keep_finished(ray, running: dict, record: Callable) -> None:
    """After a failure, store what other mixtures have already finished (their work is paid for)."""
    ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0) if running else ([], [])
    for ref in ready:
        try:
            record(ref)
        except ray.exceptions.RayError:
            pass  # record() already dropped it from `running`; the first failure is the one reported


def describe(exc: BaseException) -> str:
    """One line for a Ray failure: the worker's own exception when there is one, else Ray's reason."""
    cause = getattr(exc, "cause", None)
    if not isinstance(cause, BaseException):
        cause = exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if isinstance(cause, FlexmoreError):
        return first
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__
