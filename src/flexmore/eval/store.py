"""Results in SQLite: one row per mixture x task x metric, written one (mixture, task) at a time.

Each (mixture, task) is committed in a single transaction together with its entry in `finished`, so a
sweep killed at any moment leaves either all of a task's rows or none, and a rerun skips exactly what
is finished. Primary keys make duplicates impossible.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import FlexmoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    mixture TEXT NOT NULL,            -- stable id of the mixture (see Mixture.id)
    kind TEXT NOT NULL,               -- public | pair | homogeneous | heterogeneous
    experts TEXT NOT NULL,            -- JSON list of expert names, public first
    expert_under_test TEXT,           -- the domain expert of a 2-expert mixture
    ranks TEXT NOT NULL,              -- JSON list, 0 = full-size
    rank_label TEXT NOT NULL,         -- "64", "full", or the name of a heterogeneous spec
    k INTEGER NOT NULL,               -- active experts per token
    task TEXT NOT NULL,
    task_group TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    is_main INTEGER NOT NULL,         -- 1 for the task's headline metric
    n INTEGER NOT NULL,               -- instances evaluated
    parameters INTEGER NOT NULL,      -- total parameters of the mixture
    flexmore_version TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (mixture, task, metric)
);
CREATE TABLE IF NOT EXISTS finished (
    mixture TEXT NOT NULL,
    task TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (mixture, task)
);
"""

COLUMNS = ("mixture", "kind", "experts", "expert_under_test", "ranks", "rank_label", "k", "task", "task_group",
           "metric", "value", "is_main", "n", "parameters", "flexmore_version", "created")


@dataclass(frozen=True)
class Mixture:
    """Which experts, at which ranks, with how many active: everything that identifies a mixture."""

    kind: str
    experts: tuple[str, ...]
    ranks: tuple[int, ...]
    k: int
    rank_label: str
    expert_under_test: str | None = None
    parameters: int = field(default=0, compare=False)

    @property
    def id(self) -> str:
        parts = ",".join(f"{n}:{'full' if r == 0 else r}" for n, r in zip(self.experts, self.ranks))
        # a heterogeneous mixture is a named selection: two selections that pick the same ranks are both reported
        kind = f"{self.kind}:{self.rank_label}" if self.kind == "heterogeneous" else self.kind
        return f"{kind}|{parts}|k={self.k}"


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)  # explicit transactions
            self.db.executescript(SCHEMA)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise FlexmoreError(f"{self.path}: database is locked by another process") from None
            raise FlexmoreError(f"{self.path}: cannot open the results database ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise FlexmoreError(f"{self.path}: not a results database or corrupt ({exc})") from None

    def close(self) -> None:
        self.db.close()

    def finished(self) -> set[tuple[str, str]]:
        return set(self._query("SELECT mixture, task FROM finished"))

    def record(self, mixture: Mixture, task: str, group: str, metrics: dict[str, float], main_metric: str,
               n: int) -> None:
        """All metric rows of one (mixture, task) and its `finished` mark, atomically."""
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        rows = [
            (mixture.id, mixture.kind, json.dumps(list(mixture.experts)), mixture.expert_under_test,
             json.dumps(list(mixture.ranks)), mixture.rank_label, mixture.k, task, group, metric, float(value),
             int(metric == main_metric), n, mixture.parameters, __version__, now)
            for metric, value in sorted(metrics.items())
        ]
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(f"INSERT INTO results VALUES ({','.join('?' * len(COLUMNS))})", rows)
            self.db.execute("INSERT INTO finished VALUES (?, ?, ?)", (mixture.id, task, now))
            self.db.execute("COMMIT")
        except sqlite3.IntegrityError:
            self.db.execute("ROLLBACK")
            raise FlexmoreError(f"{self.path}: results for {mixture.id} / {task} are already stored") from None
        except sqlite3.OperationalError as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise FlexmoreError(f"{self.path}: cannot write results ({exc})") from None

    def _query(self, sql: str, params=()) -> list[tuple]:
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise FlexmoreError(f"{self.path}: cannot read results ({exc})") from None

    def rows(self, main_only: bool = False) -> list[dict]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM results" + (" WHERE is_main = 1" if main_only else "")
        sql += " ORDER BY kind, experts, k, rank_label, task, metric"
        return [dict(zip(COLUMNS, row)) for row in self._query(sql)]


def open_existing(path: str | Path) -> ResultStore:
    if not Path(path).is_file():
        raise FlexmoreError(f"{path}: no such results database")
    return ResultStore(path)


def rows_to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
