"""The Ray scale-out of the sweep: same rows as the local loop, resumable, failures named (flexmore[ray])."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import warnings

import pytest

ray = pytest.importorskip("ray")

from flexmore.convert import convert_checkpoint  # noqa: E402
from flexmore.errors import FlexmoreError  # noqa: E402
from flexmore.eval.engine import resolve_tasks  # noqa: E402
from flexmore.eval.ray_sweep import parse_address, run_on_ray  # noqa: E402
from flexmore.eval.store import Mixture, ResultStore  # noqa: E402
from flexmore.eval.sweep import run_sweep  # noqa: E402
from flexmore.tiny import build_flexolmo, build_tokenizer, stdlib_text, tiny_flexolmo_config  # noqa: E402

NAMES = ["public", "code", "math"]
SWEEP = dict(ranks="1,full", ks="2", include=("public", "pair"))  # 5 mixtures: public, 2 experts x 2 ranks


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (start-up costs seconds); run_on_ray joins it as it is."""
    os.environ["RAY_DEDUP_LOGS"] = "0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's note on a default that will change
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-sweep")
    tok = build_tokenizer(stdlib_text(60_000), vocab_size=300)
    build_flexolmo(tiny_flexolmo_config(vocab_size=len(tok), num_experts=3), seed=0).save_pretrained(root / "raw")
    tok.save_pretrained(root / "raw")
    convert_checkpoint(root / "raw", root / "source", to="flexolmo", expert_names=NAMES)
    rc = [{"task": {"name": "letters", "format": "rc"}}] + [
        {"question": f"Which word has {i + 1} letters?", "choices": ["a", "bb", "ccc"], "answer": i} for i in range(3)]
    gen = [{"task": {"name": "echo", "format": "gen"}}] + [
        {"question": f"Say {w}.", "answer": w} for w in ("yes", "no")]
    tasks = []
    for name, rows in (("letters", rc), ("echo", gen)):
        path = root / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        tasks.append(str(path))
    return root, tasks


def table(db) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return sorted(con.execute("SELECT mixture, task, metric, value FROM results").fetchall())


def counts(db) -> tuple[int, int]:
    with sqlite3.connect(db) as con:
        return (con.execute("SELECT COUNT(*) FROM results").fetchone()[0],
                con.execute("SELECT COUNT(*) FROM finished").fetchone()[0])


def test_ray_sweep_matches_local_and_resumes(world, ray_local):
    root, tasks = world
    source = root / "source"
    local = run_sweep(source, tasks, root / "local.db", **SWEEP)
    seen = []
    on_ray = run_sweep(source, tasks, root / "ray.db", **SWEEP, ray_address="local:2",
                       on_progress=lambda done, total, message: seen.append((done, total, message)))
    assert (on_ray.mixtures, on_ray.tasks, on_ray.evaluated, on_ray.skipped) == (5, 2, 10, 0)
    assert (local.mixtures, local.tasks, local.evaluated) == (5, 2, 10)
    ray_rows, local_rows = table(root / "ray.db"), table(root / "local.db")
    assert {r[0] for r in ray_rows} == {r[0] for r in local_rows} and len({r[0] for r in ray_rows}) == 5
    assert ray_rows == local_rows  # same mixtures, tasks, metrics and values, bit for bit
    assert counts(root / "ray.db") == counts(root / "local.db") == (5 * (4 + 2), 10)  # rc: 4 metrics, gen: 2
    evaluated = [(done, message) for done, total, message in seen if " / " in message]  # not svd / done
    assert [done for done, _ in evaluated] == list(range(1, 11)) and all(total == 10 for _, total, _ in seen)
    assert {message.split(" / ")[1] for _, message in evaluated} == {"letters", "echo"}

    again = run_sweep(source, tasks, root / "ray.db", **SWEEP, ray_address="local:2")
    assert (again.evaluated, again.skipped) == (0, 10)
    assert table(root / "ray.db") == ray_rows and counts(root / "ray.db") == (30, 10)

    # a sweep killed before one (mixture, task) was stored: the rerun evaluates exactly that pair
    lost = "pair|public:full,math:1|k=2"
    with sqlite3.connect(root / "ray.db") as con:
        con.execute("DELETE FROM results WHERE mixture = ? AND task = 'echo'", (lost,))
        con.execute("DELETE FROM finished WHERE mixture = ? AND task = 'echo'", (lost,))
    resumed = run_sweep(source, tasks, root / "ray.db", **SWEEP, ray_address="local:2")
    assert (resumed.evaluated, resumed.skipped) == (1, 9)
    assert table(root / "ray.db") == ray_rows and counts(root / "ray.db") == (30, 10)


def test_worker_failure_is_one_error_naming_the_mixture(world, ray_local, tmp_path):
    root, tasks = world
    store = ResultStore(tmp_path / "fail.db")
    store.record(Mixture("public", ("public",), (0,), 1, "public"), "earlier", "g", {"acc": 0.5}, "acc", 3)
    broken = Mixture("pair", ("public", "code"), (0, 0), 2, "full", "code")
    todo = [(broken, [0, 1], resolve_tasks(tasks))]
    with pytest.raises(FlexmoreError, match=r"mixture pair\|public:full,code:full\|k=2: evaluation failed on Ray "
                                            r"\(.*missing.*\)") as info:
        run_on_ray("local:2", str(root / "missing"), None, todo, store, None, 1, "cpu", 0, 2, None)
    assert "\n" not in str(info.value)
    assert store.finished() == {(Mixture("public", ("public",), (0,), 1, "public").id, "earlier")}
    store.close()


def test_address_forms_and_missing_ray(monkeypatch):
    assert parse_address("local") == {"address": "local"}
    assert parse_address("local:3") == {"address": "local", "num_cpus": 3}
    assert parse_address("auto") == {"address": "auto", "runtime_env": {"py_executable": sys.executable}}
    assert parse_address("ray://head:10001") == {"address": "ray://head:10001"}
    for bad in ("local:0", "local:x", " "):
        with pytest.raises(FlexmoreError, match="--ray"):
            parse_address(bad)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(FlexmoreError, match=r"^--ray needs Ray: pip install 'flexmore\[ray\]'$"):
        run_on_ray("local", "src", None, [], None, None, 1, "cpu", 0, 0, None)
