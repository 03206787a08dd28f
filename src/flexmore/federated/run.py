"""Run a one-shot expert federation: in one process (simulation) or as real Flower processes (deployment).

Every data owner trains a domain expert on their own machine from the same public model and uploads it
once; the server checks the uploads and writes the N-expert mixture (FlexOlmo when every expert is
full-size, FlexMoRE otherwise) plus OUT.federation.json: bytes uploaded per owner against a full expert,
ranks, and any rejected or missing owner. Needs the extra: pip install 'flexmore[federated]'.

Simulation (one machine, one virtual SuperNode per owner on Flower's simulation engine):

    flexmore federate public/ mixture/ --owner math=data/math.jsonl --owner code=data/code.jsonl \
        --simulation --steps 200 --compress rank:64

Deployment on one machine (a real SuperLink and one SuperNode per owner, all on 127.0.0.1: the same
processes and messages as across machines, to try the setup):

    flexmore federate public/ mixture/ --owner math=data/math.jsonl --owner code=data/code.jsonl --deployment

Owners on separate machines
---------------------------
Everyone installs the same flexmore version with the extra (`pip install 'flexmore[federated]'`) and keeps
a copy of the same public model (it is public). The server checks a sha256 of its tensors; an owner whose
copy differs refuses to train, and the server refuses any upload made from another copy. Data never leaves
an owner's machine: only expert 1's weights (or their low-rank factors) and one router row per layer travel.

1. Coordinator, on a machine the owners can reach (Flower's SuperLink serves its Fleet, Control and
   ServerApp APIs on one HTTP port; `--insecure` only inside a trusted network, otherwise give it
   `--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`):

       flower-superlink --insecure --host 0.0.0.0 --port 9092 --disable-runtime-dependency-installation

2. Each owner, on their own machine (their name, their data, their copy of the public model; `device`
   is optional and theirs to choose):

       flower-supernode --insecure --superlink COORDINATOR_HOST:9092 \
           --node-config 'owner="math" data-path="/data/math.jsonl" public-path="/models/public" device="cuda"'

   `data-path` may list several files or directories separated by commas. The node waits for work; the
   owner sees the training log, and on a refusal (wrong public model) the reason. With TLS, replace
   `--insecure` by `--root-certificates ca.pem`.

3. Coordinator, once the nodes run (the run waits up to --node-timeout seconds for all of them):

       flexmore federate /models/public mixture/ --owner math --owner code --superlink 127.0.0.1:9092 \
           --steps 1000 --seq-len 2048 --compress energy:0.9

   This writes a small Flower app (a pyproject.toml whose components are
   `flexmore.federated.app:server_app` / `client_app` and whose run config holds the public model path,
   the output path, the owners and the training options) and starts it with `flwr run` against the
   SuperLink, with runtime dependency installation off: nothing is installed or fetched. Each owner's
   node receives one message, trains, and answers once. The mixture and OUT.federation.json appear on
   the coordinator's machine; a rejected owner is named with the reason (pass --allow-missing to
   assemble the others anyway). `flexmore federate` talks to the SuperLink without TLS; with a TLS
   SuperLink, start the app with `flwr run` and your own Flower configuration instead
   (`write_flower_app` writes the app directory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import FlexmoreError

# No square brackets: the CLI prints errors through rich, whose markup would swallow "[federated]".
EXTRA_HINT = "install flexmore's 'federated' extra (Flower 1.42 with its simulation engine)"
OwnerSpec = tuple[str, "str | os.PathLike | Sequence[str | os.PathLike] | None"]


def _app():
    """flexmore.federated.app, or a one-line error naming the extra when Flower is missing."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower reads it on import: no usage pings
    try:
        from . import app
    except ImportError as exc:
        missing = exc.name or "flwr"
        raise FlexmoreError(f"federated training needs Flower ({missing} is missing): {EXTRA_HINT}") from None
    return app


def _data_paths(name: str, data) -> tuple[str, ...]:
    if data is None:
        return ()
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    paths = tuple(str(p) for item in items for p in str(item).split(",") if str(p).strip())
    for p in paths:
        if not Path(p).exists():
            raise FlexmoreError(f"--owner {name}: data path {p} does not exist")
    return paths


def _settings(public, owners: Sequence[OwnerSpec], out, compression, train, allow_missing, top_k, overwrite,
              node_timeout, reply_timeout, error_file=None):
    app = _app()
    settings = app.FederationSettings(
        public=str(Path(public).resolve()), out=str(Path(out).resolve()), owners=[name for name, _ in owners],
        compression=compression, train=dict(train or {}), allow_missing=allow_missing, top_k=top_k,
        node_timeout=node_timeout, reply_timeout=reply_timeout, overwrite=overwrite, error_file=error_file)
    app.check_settings(settings)
    return app, settings


def run_federation_simulation(
    public: str | os.PathLike,
    owners: Sequence[OwnerSpec],
    out: str | os.PathLike,
    *,
    compression: str = "full",
    train: dict | None = None,
    allow_missing: bool = False,
    top_k: int | None = None,
    overwrite: bool = False,
    train_fn: Callable | None = None,
    num_cpus: int | None = None,
    gpus_per_owner: float = 0.0,
    device: str | None = None,
    node_timeout: float = 60.0,
    reply_timeout: float | None = None,
    verbose: bool = False,
):
    """Federate on Flower's simulation engine: one virtual SuperNode per owner, each training in a Ray actor.

    `owners`: (name, data path or paths) in expert order. `train`: training hyperparameters (TrainConfig
    fields). `train_fn(public, data_paths, out_dir, hyperparameters, owner) -> checkpoint` replaces the
    real trainer (tests). `num_cpus`: CPUs Ray may use (default: one per owner, at most all); each owner's
    training takes one CPU, or `gpus_per_owner` of a GPU (then it trains on `device`, default cuda).
    Returns the FederationResult (out, summary, summary_file).
    """
    owners = [(name, _data_paths(name, data)) for name, data in owners]
    app, settings = _settings(public, owners, out, compression, train, allow_missing, top_k, overwrite,
                              node_timeout, reply_timeout)
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # Flower would exit the process with its own message
        raise FlexmoreError(f"the simulation needs Ray (Flower's simulation extra): {EXTRA_HINT}")
    from flwr.simulation import run_simulation

    results: list = []
    device = device or ("cuda" if gpus_per_owner else None)
    server, client = app.simulation_apps(settings, owners, train_fn, results.append, device=device)
    cpus = num_cpus or max(1, min(len(owners), os.cpu_count() or 1))
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": float(gpus_per_owner)},
        "init_args": {"num_cpus": cpus, **({} if gpus_per_owner else {"num_gpus": 0})},
    }
    def not_deprecation_notice(record: logging.LogRecord) -> bool:
        # run_simulation is Flower's in-process entry point (flwr run needs an app on disk); its notice is noise here
        return "DEPRECATED FEATURE" not in record.getMessage()

    flower_log = logging.getLogger("flwr")
    flower_log.addFilter(not_deprecation_notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            run_simulation(server_app=server, client_app=client, num_supernodes=len(owners),
                           backend_config=backend_config, verbose_logging=verbose)
    finally:
        flower_log.removeFilter(not_deprecation_notice)
    if not results:
        raise FlexmoreError("the simulation ended without a result (see the log above)")
    return results[0]


# --------------------------------------------------------------------------------------------------
# Deployment


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, log_file: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlexmoreError(f"{what} exited with status {proc.returncode}: {_tail(log_file)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlexmoreError(f"{what} did not open port {port} within {timeout:g} s: {_tail(log_file)}")


def _tail(file: Path, lines: int = 5) -> str:
    try:
        text = file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return _toml_str(str(value))


APP_MODULE = "flexmore_federation_app"


def write_flower_app(app_dir: Path, run_config: dict) -> Path:
    """A Flower app directory whose components are flexmore's server and client apps.

    No dependencies are declared: every machine already has flexmore installed, and nothing is fetched.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / f"{APP_MODULE}.py").write_text(
        '"""Flower components of a flexmore expert federation (generated)."""\n'
        "from flexmore.federated.app import client_app, server_app\n\n"
        '__all__ = ["client_app", "server_app"]\n'
    )
    config_lines = "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in run_config.items())
    (app_dir / "pyproject.toml").write_text(
        f"""[project]
name = "flexmore-federation"
version = "1.0.0"
description = "One-shot collection of FlexMoRE domain experts"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "flexmore"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server_app"
clientapp = "{APP_MODULE}:client_app"

[tool.flwr.app.config]
{config_lines}
"""
    )
    return app_dir


def write_flower_home(home: Path, superlink: str, insecure: bool = True) -> Path:
    """FLWR_HOME/config.toml with one SuperLink connection, `flexmore`, as the default."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "flexmore"\n\n[superlink.flexmore]\naddress = {_toml_str(superlink)}\n'
        f"insecure = {'true' if insecure else 'false'}\n"
    )
    return home


def _flwr_env(home: Path) -> dict:
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise FlexmoreError(f"{name} not found: {EXTRA_HINT}")
    return found


class _Processes:
    """Subprocesses started here, each in its own session; all stopped on exit (TERM, then KILL)."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, what: str, cmd: list[str], env: dict, log_file: Path) -> subprocess.Popen:
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append((what, proc))
        return proc

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # the process group of this child only
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        # Their own children (SuperExec, flwr-serverapp/clientapp) share the group: let them finish, then KILL.
        for _, proc in self.procs:
            deadline = time.monotonic() + 5
            while True:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                if time.monotonic() > deadline:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    break
                time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _json_of(text: str):
    """The JSON object a `flwr ... --format json` command printed (after any warning lines)."""
    return json.loads(text[text.index("{"):])


def run_flower_app(app_dir: Path, home: Path, timeout: float, log_dir: Path, poll: float = 1.0) -> str:
    """`flwr run` the app against FLWR_HOME's default SuperLink and wait until the run ends; its final status."""
    env = _flwr_env(home)
    flwr = _bin("flwr")
    started = subprocess.run([flwr, "run", str(app_dir), "--format", "json"], env=env, capture_output=True, text=True,
                             timeout=120)
    (log_dir / "flwr-run.log").write_text(started.stdout + started.stderr)
    try:
        run_id = _json_of(started.stdout)["run-id"]
    except (json.JSONDecodeError, IndexError, KeyError, TypeError):
        said = (started.stdout + started.stderr).strip()[-500:]
        raise FlexmoreError(f"flwr run did not start the run: {said}") from None
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        listed = subprocess.run([flwr, "ls", "--run-id", str(run_id), "--format", "json"], env=env,
                                capture_output=True, text=True, timeout=60)
        try:
            runs = _json_of(listed.stdout)["runs"]
            status = str(runs[0]["status"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            status = ""
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    raise FlexmoreError(f"run {run_id} did not finish within {timeout:g} s (last status {status or 'unknown'})")


def run_federation_deployment(
    public: str | os.PathLike,
    owners: Sequence[OwnerSpec],
    out: str | os.PathLike,
    *,
    compression: str = "full",
    train: dict | None = None,
    allow_missing: bool = False,
    top_k: int | None = None,
    overwrite: bool = False,
    superlink: str | None = None,
    node_timeout: float = 120.0,
    reply_timeout: float | None = None,
    timeout: float = 7 * 24 * 3600.0,
    keep_logs: str | os.PathLike | None = None,
    device: str | None = None,
    trainer: str | None = None,
):
    """Federate with real Flower processes.

    `superlink=None`: start a SuperLink and one SuperNode per owner on 127.0.0.1 (owners: (name, data path)),
    run, and stop them all; `device` and `trainer` ("module:function", the owner-side training hook) go
    into those nodes' configs. `superlink="host:port"`: the SuperLink and the owners' SuperNodes already
    run (see the module docstring); only the run is started, and owners configure their own nodes.
    `keep_logs`: a directory for the SuperLink's, SuperNodes' and flwr's logs (default: discarded).
    Returns the FederationResult rebuilt from OUT.federation.json.
    """
    local = superlink is None
    owners = [(name, _data_paths(name, data) if local else ()) for name, data in owners]
    if local:
        for name, data in owners:
            if not data:
                raise FlexmoreError(f"--owner {name}: give NAME=DATA_PATH (the loopback deployment starts its node)")
    with tempfile.TemporaryDirectory(prefix="flexmore-federation-") as tmp:
        tmp = Path(tmp)
        error_file = tmp / "error.txt"
        app, settings = _settings(public, owners, out, compression, train, allow_missing, top_k, overwrite,
                                  node_timeout, reply_timeout, error_file=str(error_file))
        log_dir = Path(keep_logs) if keep_logs else tmp / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        home = tmp / "flwr-home"
        with _Processes() as procs:
            if local:
                node_extra = {k: v for k, v in (("device", device), ("trainer", trainer)) if v}
                superlink = _start_loopback(procs, home, owners, settings.public, log_dir, node_extra)
            write_flower_home(home, superlink)
            app_dir = write_flower_app(tmp / "app", settings.to_run_config())
            status = run_flower_app(app_dir, home, timeout, log_dir)
        summary = app.summary_path(settings.out)
        if error_file.exists():
            raise FlexmoreError(error_file.read_text().strip())
        if not status.endswith("completed") or not summary.exists():
            raise FlexmoreError(f"the federation run ended as {status!r}; logs: {_tail(log_dir / 'superlink.log')}")
        data = json.loads(summary.read_text())
        return app.FederationResult(out=Path(settings.out), summary=data, summary_file=summary)


def _start_loopback(procs: _Processes, home: Path, owners, public: str, log_dir: Path, node_extra: dict) -> str:
    """A SuperLink and one SuperNode per owner on 127.0.0.1; the SuperLink's address."""
    env = _flwr_env(home)
    port = _free_port()
    link = procs.start("flower-superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                            "--port", str(port), "--disable-runtime-dependency-installation"],
                       env, log_dir / "superlink.log")
    _wait_for_port(port, link, "flower-superlink", log_dir / "superlink.log")
    for name, data in owners:
        node_config = log_dir.parent / f"node-{name}.toml"
        entries = {"owner": name, "data-path": ",".join(data), "public-path": public, **node_extra}
        node_config.write_text("".join(f"{key} = {_toml_str(str(value))}\n" for key, value in entries.items()))
        node_log = log_dir / f"supernode-{name}.log"
        procs.start(f"flower-supernode ({name})",
                    [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                     "--port", str(_free_port()), "--node-config", str(node_config)], env, node_log)
    return f"127.0.0.1:{port}"
