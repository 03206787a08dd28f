"""One-shot federated expert collection on Flower's Message API (REFERENCE §6, §8).

Each data owner holds the public model and their own data. The server sends ONE message per owner's
node; each owner trains their domain expert locally and answers ONCE; the server checks every answer
and assembles the mixture. No data, token ids or text ever leave an owner:

    server -> owner   "federation" ConfigRecord {public_hash, compression}
                      "train"      ConfigRecord {training hyperparameters}
    owner  -> server  "expert"     ArrayRecord  expert 1 of the owner's 2-expert checkpoint, one layer at
                                   a time: gate/up/down [I, H]/[H, I] (full) or their PHLoRA factors
                                   _b [out, r], _a [r, in] (low-rank), plus the owner's router row [1, H]
                      "meta"       ConfigRecord {owner, rank, public_hash, bytes}
                   or "meta"       ConfigRecord {owner, error} when the owner refuses (wrong public model)

The public model is identified by `public_hash`: sha256 over its tensors (name, dtype, shape, bytes) in
name order, independent of sharding. An owner whose public model differs never trains. The server
refuses, naming the owner, any answer with another public hash, unexpected tensor names or shapes, or
non-finite values; with `allow_missing` it assembles the owners it accepted and reports the others,
otherwise nothing is written.

Assembly streams: expert 0 and every shared tensor come from the server's public model, each accepted
owner's expert from the spilled upload, router rows [public row 0; owners' rows] — the same tensors
`flexmore merge` would write from the owners' 2-expert checkpoints, without holding N models on disk.

Plain functions carry the logic (`owner_reply`, `run_server`, `check_upload`, `assemble`); the Flower
objects are thin: `server_app` / `client_app` (deployment: settings from the run config, owners from each
SuperNode's node config) and `simulation_apps` (simulation: owners bound in a closure by partition id).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.app import Array as FlowerArray
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("flexmore.federated needs Flower: pip install 'flexmore[federated]'") from exc

from ..checkpoint import _ST_DTYPE_NAMES, CheckpointReader, CheckpointWriter, read_safetensors_header
from ..config import FULL, FlexMoREConfig, dtype_bytes
from ..convert import _EXPERT_KEY, _ROUTER_KEY, expected_shapes, expert_key, flexolmo_config, open_checkpoint
from ..errors import FlexmoreError
from ..experts import PROJECTIONS

# A child of Flower's logger: owners and the coordinator see flexmore's lines in Flower's own log stream
# (in a simulation, Ray forwards the owners' lines to the driver).
log = logging.getLogger("flwr").getChild("flexmore")

FEDERATION = "federation"  # server -> owner: what to train on and how to upload
TRAIN = "train"  # server -> owner: training hyperparameters
EXPERT = "expert"  # owner -> server: the expert's tensors
META = "meta"  # owner -> server: who, which rank, which public model, how many bytes (or an error)
META_KEYS = ("owner", "rank", "public_hash", "bytes")
ERROR_META_KEYS = ("owner", "error")
ROUTER_ROW = "model.layers.{layer}.mlp.gate.weight.row1"  # the owner's router row: [1, H]
WIRE_STYPE = "flexmore.raw-le"  # Array.data = the tensor's little-endian bytes, C order
_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
_OWNER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_TTL_S = 7 * 24 * 3600.0  # a message lives as long as the longest wait for a reply


# --------------------------------------------------------------------------------------------------
# The public model's identity


def public_hash(path: str | os.PathLike) -> str:
    """sha256 over the checkpoint's tensors in name order: name, dtype, shape, then the raw bytes.

    Streams the bytes straight from the safetensors files (16 MiB at a time), so it costs no memory
    and does not depend on how the checkpoint is sharded or which library wrote it.
    """
    reader = CheckpointReader(path)
    digest = hashlib.sha256()
    headers: dict[str, tuple[dict, int]] = {}  # file name -> (header, offset of the data section)
    for name in sorted(reader.keys()):
        file_name = reader.weight_map[name]
        if file_name not in headers:
            file = reader.path / file_name
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
            headers[file_name] = (read_safetensors_header(file), 8 + header_len)
        header, data_start = headers[file_name]
        info = header[name]
        digest.update(f"{name}\0{info['dtype']}\0{json.dumps(info['shape'])}\0".encode())
        start, end = info["data_offsets"]
        with open(reader.path / file_name, "rb") as f:
            f.seek(data_start + start)
            left = end - start
            while left:
                chunk = f.read(min(left, 16 << 20))
                if not chunk:
                    raise FlexmoreError(f"{reader.path / file_name}: truncated while reading tensor {name}")
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()


def stored_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype of the public expert's weights, read from the header (no tensor loaded)."""
    name = reader.dtype(expert_key(0, 0, PROJECTIONS[0]))
    return {v: k for k, v in _ST_DTYPE_NAMES.items()}[name]


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Compression:
    """How an owner uploads a full expert: as is, or PHLoRA factors of W1 - W0 at a rank or energy."""

    kind: str  # "full" | "rank" | "energy"
    value: float = 0.0  # the rank (kind "rank") or the energy fraction (kind "energy")

    def __str__(self) -> str:
        return "full" if self.kind == "full" else f"{self.kind}:{self.value:g}"


def parse_compression(text: str, max_rank: int | None = None, option: str = "--compress") -> Compression:
    """'full' | 'rank:R' (R >= 1) | 'energy:F' (0 < F <= 1)."""
    t = str(text).strip().lower()
    if t == "full":
        return Compression("full")
    kind, _, value = t.partition(":")
    if kind == "rank" and value.isdigit() and int(value) >= 1:
        rank = int(value)
        if max_rank is not None and rank > max_rank:
            raise FlexmoreError(f"{option} {text}: rank {rank} exceeds min(hidden, intermediate) = {max_rank}")
        return Compression("rank", rank)
    if kind == "energy":
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if 0 < fraction <= 1:
            return Compression("energy", fraction)
    raise FlexmoreError(f"{option} {text!r}: expected 'full', 'rank:R' (R >= 1) or 'energy:F' (0 < F <= 1)")


@dataclass
class FederationSettings:
    """Everything the server needs; in deployment it travels as the run config (`to_run_config`)."""

    public: str  # the server's copy of the public model
    out: str  # the mixture to write
    owners: list[str]  # expected owners, in expert order (expert i = owners[i - 1])
    compression: str = "full"
    train: dict = field(default_factory=dict)  # training hyperparameters (TrainConfig fields), sent to every owner
    allow_missing: bool = False
    top_k: int | None = None  # active experts per token in the mixture (default: min(2, experts))
    node_timeout: float = 120.0  # seconds to wait for every owner's node to register
    reply_timeout: float | None = None  # seconds to wait for the uploads (None: as long as the message lives)
    overwrite: bool = False
    error_file: str | None = None  # where a failed run writes its one-line error (the deployment runner reads it)

    def to_run_config(self) -> dict:
        """Flat str/int/float/bool values, as Flower's run config holds them."""
        out = {
            "public": self.public, "out": self.out, "owners": ",".join(self.owners), "compression": self.compression,
            "allow-missing": self.allow_missing, "top-k": self.top_k or 0, "node-timeout": float(self.node_timeout),
            "reply-timeout": float(self.reply_timeout or 0.0), "overwrite": self.overwrite,
            "error-file": self.error_file or "",
        }
        out.update({f"train-{key}": value for key, value in self.train.items()})
        return out

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederationSettings:
        missing = [key for key in ("public", "out", "owners") if not run_config.get(key)]
        if missing:
            raise FlexmoreError(f"run config: missing {', '.join(missing)}")
        return cls(
            public=str(run_config["public"]),
            out=str(run_config["out"]),
            owners=[x.strip() for x in str(run_config["owners"]).split(",") if x.strip()],
            compression=str(run_config.get("compression", "full")),
            train={key[len("train-"):]: value for key, value in run_config.items() if key.startswith("train-")},
            allow_missing=bool(run_config.get("allow-missing", False)),
            top_k=int(run_config.get("top-k", 0)) or None,
            node_timeout=float(run_config.get("node-timeout", 120.0)),
            reply_timeout=float(run_config.get("reply-timeout", 0.0)) or None,
            overwrite=bool(run_config.get("overwrite", False)),
            error_file=str(run_config.get("error-file", "")) or None,
        )


def check_owner_names(owners: Sequence[str]) -> None:
    if not owners:
        raise FlexmoreError("--owner: give at least one owner (NAME=DATA_PATH)")
    for name in owners:
        if not _OWNER_NAME.match(name):
            raise FlexmoreError(
                f"--owner {name!r}: owner names are 1-64 letters, digits, '_', '.', '-', starting with a letter or "
                "digit"
            )
        if name == "public":
            raise FlexmoreError("--owner public: 'public' is the name of expert 0; choose another")
    dupes = sorted({n for n in owners if list(owners).count(n) > 1})
    if dupes:
        raise FlexmoreError(f"--owner {dupes[0]}: given twice")


def summary_path(out: str | os.PathLike) -> Path:
    """The JSON summary written next to the mixture: OUT.federation.json."""
    out = Path(out)
    return out.parent / f"{out.name}.federation.json"


# --------------------------------------------------------------------------------------------------
# Wire format: one tensor <-> one flwr Array (raw bytes, any float dtype incl. bfloat16)


def to_array(tensor: torch.Tensor) -> FlowerArray:
    t = tensor.detach().contiguous().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _WIRE_DTYPES:
        raise FlexmoreError(f"cannot upload a {dtype} tensor (floating point only)")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return FlowerArray(dtype=dtype, shape=tuple(int(d) for d in t.shape), stype=WIRE_STYPE, data=data)


def from_array(array: FlowerArray, name: str) -> torch.Tensor:
    """The tensor an Array carries; anything malformed is a FlexmoreError naming the tensor."""
    if array.stype != WIRE_STYPE:
        raise FlexmoreError(f"tensor {name}: unknown encoding {array.stype!r}")
    if array.dtype not in _WIRE_DTYPES:
        raise FlexmoreError(f"tensor {name}: dtype {array.dtype!r} is not a floating point type")
    dtype = _WIRE_DTYPES[array.dtype]
    shape = tuple(int(d) for d in array.shape)
    if any(d < 0 for d in shape):
        raise FlexmoreError(f"tensor {name}: negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if len(array.data) != count * torch.empty((), dtype=dtype).element_size():
        raise FlexmoreError(f"tensor {name}: {len(array.data)} bytes do not fit shape {list(shape)} of {array.dtype}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(array.data), dtype=dtype).reshape(shape)


def payload_shapes(config: FlexMoREConfig, rank: int) -> dict[str, tuple[int, ...]]:
    """The exact tensors an owner uploads: expert 1 (full or factors of `rank`) and the router row, per layer."""
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(config.num_hidden_layers):
        for proj in PROJECTIONS:
            out_dim, in_dim = (h, i) if proj == "down_proj" else (i, h)
            if rank == FULL:
                shapes[expert_key(layer, 1, proj)] = (out_dim, in_dim)
            else:
                shapes[expert_key(layer, 1, proj, "_b")] = (out_dim, rank)
                shapes[expert_key(layer, 1, proj, "_a")] = (rank, in_dim)
        shapes[ROUTER_ROW.format(layer=layer)] = (1, h)
    return shapes


# --------------------------------------------------------------------------------------------------
# Owner side


class OwnerRefusal(FlexmoreError):
    """An owner's reason not to upload, safe to tell the server (names no data, no local path)."""


@dataclass(frozen=True)
class OwnerSetup:
    owner: str
    data_paths: tuple[str, ...]
    public: str  # the owner's own copy of the public model
    device: str | None = None  # where the owner trains (their choice, not the server's)
    trainer: str | None = None  # "module:function" replacing the default trainer (the owner's own recipe)


# TrainConfig fields only the owner sets: the server's hyperparameters may not touch them.
OWNER_ONLY_OPTIONS = ("expert_name", "device", "router_init")


# train_fn(public, data_paths, out_dir, hyperparameters, owner, device) -> the owner's 2-expert checkpoint
TrainFn = Callable[[str, list[str], Path, dict, str, "str | None"], Path]


def default_trainer(public: str, data_paths: list[str], out_dir: Path, hyperparameters: dict, owner: str,
                    device: str | None = None) -> Path:
    """Train with flexmore.training.expert (FlexOlmo recipe): TrainConfig from the server's hyperparameters."""
    import dataclasses

    from ..training.expert import TrainConfig, train_expert

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(hyperparameters) - known)
    if unknown:
        raise OwnerRefusal(f"unknown training option {unknown[0]!r} (this owner runs another flexmore version?)")
    config = TrainConfig(**{**hyperparameters, "expert_name": owner, **({"device": device} if device else {})})
    every = max(1, config.steps // 10)

    def on_step(step: int, loss: float, tokens_per_s: float) -> None:
        if step % every == 0 or step == config.steps:
            log.info("%s: step %d/%d, loss %.4f, %s tokens/s", owner, step, config.steps, loss, f"{tokens_per_s:,.0f}")

    return Path(train_expert(public, list(data_paths), out_dir, config, on_step=on_step))


def owner_reply(message: Message, setup: OwnerSetup, train_fn: TrainFn | None = None) -> Message:
    """Everything an owner does: check the public model, train locally, compress, answer once.

    The answer holds expert 1's tensors, the router row and four metadata values; a refusal holds the
    owner's name and one line. Failures that are not refusals are logged here and reported to the server
    by type only (their text could quote local data).
    """
    try:
        meta, arrays = _train_and_pack(message, setup, train_fn or _trainer(setup))
    except OwnerRefusal as exc:
        log.error("%s: refusing: %s", setup.owner, exc)
        return _refusal(message, setup.owner, str(exc))
    except Exception as exc:  # noqa: BLE001 - anything else stays on this machine, only its type travels
        log.error("%s: training failed:\n%s", setup.owner, traceback.format_exc())
        return _refusal(message, setup.owner, f"training failed on the owner's machine ({type(exc).__name__}); "
                                              "details are in the owner's log")
    return Message(RecordDict({EXPERT: arrays, META: ConfigRecord(meta)}), reply_to=message)


def _trainer(setup: OwnerSetup) -> TrainFn:
    if not setup.trainer:
        return default_trainer
    import importlib

    module, _, attr = setup.trainer.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise OwnerRefusal("the owner's node config names a trainer that cannot be imported") from None


def _refusal(message: Message, owner: str, reason: str) -> Message:
    return Message(RecordDict({META: ConfigRecord({"owner": owner, "error": reason[:500]})}), reply_to=message)


def _train_and_pack(message: Message, setup: OwnerSetup, train_fn: TrainFn) -> tuple[dict, ArrayRecord]:
    content = message.content
    if FEDERATION not in content.config_records:
        raise OwnerRefusal("the server's message has no 'federation' record (not a flexmore federation?)")
    instruction = content.config_records[FEDERATION]
    hyperparameters = dict(content.config_records[TRAIN]) if TRAIN in content.config_records else {}
    if forbidden := sorted(set(hyperparameters) & set(OWNER_ONLY_OPTIONS)):
        raise OwnerRefusal(f"the server may not set the training option {forbidden[0]!r}")
    expected_hash = str(instruction.get("public_hash", ""))
    try:
        got_hash = public_hash(setup.public)
    except FlexmoreError as exc:
        log.error("%s: cannot read the public model: %s", setup.owner, exc)
        raise OwnerRefusal("this owner's public model cannot be read (details are in the owner's log)") from None
    if got_hash != expected_hash:
        raise OwnerRefusal(
            f"this owner's public model (sha256 {got_hash[:16]}) is not the server's (sha256 {expected_hash[:16]}); "
            "nothing was trained"
        )
    public_reader, public_config = open_checkpoint(setup.public)
    compression = parse_compression(str(instruction.get("compression", "full")), public_config.max_rank,
                                    option="compression")
    with tempfile.TemporaryDirectory(prefix=f"flexmore-{setup.owner}-") as tmp:
        trained = train_fn(setup.public, list(setup.data_paths), Path(tmp) / "expert", hyperparameters, setup.owner,
                           setup.device)
        tensors, rank = expert_payload(trained, public_reader, compression, device=setup.device)
    arrays = ArrayRecord({name: to_array(t) for name, t in tensors.items()})
    nbytes = sum(len(a.data) for a in arrays.values())
    meta = {"owner": setup.owner, "rank": int(rank), "public_hash": got_hash, "bytes": int(nbytes)}
    log.info("%s: uploading expert (rank %s, %d bytes)", setup.owner, rank or "full", nbytes)
    return meta, arrays


def expert_payload(
    trained: str | os.PathLike, public: CheckpointReader, compression: Compression, device: str | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Expert 1 and router row 1 of the owner's 2-expert checkpoint, PHLoRA-compressed as asked; its rank.

    The SVDs run on `device` (the owner's training device; default cpu), as `flexmore extract` runs them.
    Checks first that training left every frozen tensor (shared weights, expert 0, router row 0) exactly
    as the public model has it: the server rebuilds them from its own copy.
    """
    reader, config = open_checkpoint(trained)
    if config.num_experts != 2:
        raise OwnerRefusal(f"training produced {config.num_experts} experts, expected 2 (public, domain)")
    check_frozen(reader, public)
    trained_rank = config.expert_ranks[1]
    layers = config.num_hidden_layers
    dtype = stored_dtype(public)

    def delta(layer: int, proj: str) -> torch.Tensor:
        """W1 - W0 in fp32: [out, in]."""
        get = lambda part, e=1: reader.get(expert_key(layer, e, proj, part)).to(device or "cpu").float()  # noqa: E731
        if trained_rank == FULL:
            return get("") - get("", 0)
        return get("_b") @ get("_a")  # [out, R] @ [R, in]

    rank = _upload_rank(compression, trained_rank, layers, delta)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for proj in PROJECTIONS:
            if rank == trained_rank:  # upload what training produced, untouched
                parts = ("",) if rank == FULL else ("_b", "_a")
                for part in parts:
                    tensors[expert_key(layer, 1, proj, part)] = reader.get(expert_key(layer, 1, proj, part))
                continue
            from ..extract.svd import truncated_svd

            b, a = truncated_svd(delta(layer, proj), rank).factors(rank, dtype=dtype)  # [out, r], [r, in]
            tensors[expert_key(layer, 1, proj, "_b")] = b.cpu()
            tensors[expert_key(layer, 1, proj, "_a")] = a.cpu()
        tensors[ROUTER_ROW.format(layer=layer)] = reader.get(f"model.layers.{layer}.mlp.gate.weight")[1:2].clone()
    return tensors, rank


def _upload_rank(compression: Compression, trained_rank: int, layers: int, delta) -> int:
    """The rank of the upload: the trained one, unless compression asks for less."""
    if compression.kind == "full":
        return trained_rank
    if compression.kind == "rank":
        rank = int(compression.value)
    else:  # energy: one rank per expert, pooled over all its matrices (as `flexmore extract` does)
        from ..extract.ranks import Spectrum, energy_rank

        squares, energy = [], 0.0
        for layer in range(layers):
            for proj in PROJECTIONS:
                d = delta(layer, proj)
                squares.append(torch.linalg.svdvals(d.double()).square().cpu())
                energy += float(d.double().square().sum())
        rank = energy_rank(Spectrum(squares=squares, energy=energy, complete=True), compression.value, 1)
    return rank if trained_rank == FULL or rank < trained_rank else trained_rank


def check_frozen(trained: CheckpointReader, public: CheckpointReader) -> None:
    """Every public tensor unchanged in the trained checkpoint (the router: row 0 only)."""
    for name in public.keys():
        if name not in trained:
            raise OwnerRefusal(f"the trained checkpoint lacks the public tensor {name}")
        a, b = public.get(name), trained.get(name)
        if _ROUTER_KEY.match(name):
            b = b[: a.shape[0]]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            raise OwnerRefusal(f"training changed the frozen public tensor {name}; the server could not rebuild it")


# --------------------------------------------------------------------------------------------------
# Server side


@dataclass
class Plan:
    """What the server fixed before sending anything."""

    settings: FederationSettings
    public: CheckpointReader
    config: FlexMoREConfig  # the public model's (1 expert)
    public_hash: str
    compression: Compression
    dtype: torch.dtype  # the public model's weights: uploads are stored in it

    @property
    def full_bytes(self) -> int:
        """What one uncompressed upload costs: every layer's 3 full matrices and a router row."""
        c = self.config
        per_layer = 3 * c.hidden_size * c.intermediate_size + c.hidden_size
        return c.num_hidden_layers * per_layer * dtype_bytes(self.dtype)


@dataclass
class Upload:
    owner: str
    rank: int
    bytes: int  # measured on arrival: the tensors' bytes as sent
    file: Path  # spilled to disk, in the public model's dtype


@dataclass
class FederationResult:
    out: Path | None
    summary: dict
    summary_file: Path | None


def plan_federation(settings: FederationSettings) -> Plan:
    """Check the settings and the public model; fix the hash the owners must match."""
    reader, config, compression = check_settings(settings)
    return Plan(settings, reader, config, public_hash(settings.public), compression, stored_dtype(reader))


def check_settings(settings: FederationSettings) -> tuple[CheckpointReader, FlexMoREConfig, Compression]:
    """Everything about the settings that can be checked before any node is involved (cheap)."""
    check_owner_names(settings.owners)
    out = Path(settings.out)
    if out.exists() and not settings.overwrite:
        raise FlexmoreError(f"{out}: already exists (pass --overwrite to replace it)")
    reader, config = open_checkpoint(settings.public)
    if config.num_experts != 1:
        raise FlexmoreError(
            f"{settings.public}: has {config.num_experts} experts; the federation starts from the public model "
            "(a 1-expert checkpoint)"
        )
    if settings.top_k is not None and not 1 <= settings.top_k <= len(settings.owners) + 1:
        raise FlexmoreError(f"--top-k {settings.top_k}: must be between 1 and {len(settings.owners) + 1}")
    compression = parse_compression(settings.compression, config.max_rank)
    _check_hyperparameters(settings.train)
    return reader, config, compression


def _check_hyperparameters(train: dict) -> None:
    for key, value in train.items():
        if not isinstance(value, (bool, int, float, str)):
            raise FlexmoreError(f"training option {key}: {value!r} is not a number, string or boolean")
    try:
        import dataclasses

        from ..training.expert import TrainConfig
    except ImportError:  # the owners check against their own flexmore
        return
    for key in set(train) & set(OWNER_ONLY_OPTIONS):
        raise FlexmoreError(f"training option {key!r}: set by each owner on their machine, not by the server")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(OWNER_ONLY_OPTIONS)
    unknown = sorted(set(train) - known)
    if unknown:
        raise FlexmoreError(f"training option {unknown[0]!r}: unknown; expected some of {', '.join(sorted(known))}")
    try:
        TrainConfig(**train).validate()
    except TypeError as exc:
        raise FlexmoreError(f"training options: {exc}") from None


def instruction(plan: Plan) -> RecordDict:
    """The one message every owner receives."""
    return RecordDict({
        FEDERATION: ConfigRecord({"public_hash": plan.public_hash, "compression": str(plan.compression)}),
        TRAIN: ConfigRecord(dict(plan.settings.train)),
    })


def check_upload(plan: Plan, owner: str, meta: dict, arrays: ArrayRecord | None) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of one owner's upload, or a FlexmoreError naming the owner and what is wrong."""
    where = f"owner {owner!r}"
    got = str(meta.get("public_hash", ""))
    if got != plan.public_hash:
        raise FlexmoreError(
            f"{where}: expert trained on another public model (sha256 {got[:16] or 'missing'}, expected "
            f"{plan.public_hash[:16]})"
        )
    rank = meta.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= plan.config.max_rank:
        raise FlexmoreError(f"{where}: rank {rank!r} is not 0 (full) or 1..{plan.config.max_rank}")
    if arrays is None:
        raise FlexmoreError(f"{where}: the upload holds no '{EXPERT}' tensors")
    expected = payload_shapes(plan.config, rank)
    names = set(arrays.keys())
    if extra := sorted(names - set(expected)):
        raise FlexmoreError(f"{where}: unexpected tensor {extra[0]} in the upload (only expert 1 and its router row "
                            "may be sent)")
    if missing := [n for n in expected if n not in names]:
        raise FlexmoreError(f"{where}: tensor {missing[0]} is missing from the upload")
    tensors = {}
    for name, shape in expected.items():
        try:
            tensor = from_array(arrays[name], name)
        except FlexmoreError as exc:
            raise FlexmoreError(f"{where}: {exc}") from None
        if tuple(tensor.shape) != shape:
            raise FlexmoreError(f"{where}: tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}")
        if not torch.isfinite(tensor).all():
            raise FlexmoreError(f"{where}: tensor {name} contains NaN or Inf values")
        tensors[name] = tensor.to(plan.dtype)
    return tensors, rank


def wait_for_nodes(grid: Grid, expected: int, timeout: float, allow_missing: bool = False,
                   poll: float = 0.5) -> list[int]:
    """The registered nodes once `expected` are there; fewer after `timeout` is an error (unless allow_missing)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    if nodes and allow_missing:
        log.warning("only %d of %d owners' nodes registered within %g s; going on without the others",
                    len(nodes), expected, timeout)
        return nodes
    raise FlexmoreError(
        f"only {len(nodes)} of {expected} owners' nodes registered within {timeout:g} s; check that every owner's "
        "SuperNode is running and reaches the SuperLink (or pass --allow-missing)"
    )


def collect(grid: Grid, plan: Plan, nodes: Iterable[int], workdir: Path, poll: float = 0.5
            ) -> tuple[dict[str, Upload], dict[str, str]]:
    """Send the instruction to every node and take in the answers as they come (one in memory at a time).

    Returns the accepted uploads by owner and the rejections by owner (or by node, for a node whose
    ClientApp failed before it could say who it is).
    """
    settings = plan.settings
    ttl = settings.reply_timeout or DEFAULT_TTL_S
    messages = [Message(instruction(plan), dst_node_id=node, message_type=MessageType.TRAIN, ttl=ttl)
                for node in nodes]
    pending = set(grid.push_messages(messages))
    if len(pending) != len(messages):
        raise FlexmoreError(f"the SuperLink accepted {len(pending)} of {len(messages)} messages")
    deadline = time.monotonic() + ttl
    accepted: dict[str, Upload] = {}
    rejected: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            _take_reply(plan, reply, workdir, accepted, rejected)
        if pending:
            time.sleep(poll)
    return accepted, rejected


def _take_reply(plan: Plan, reply: Message, workdir: Path, accepted: dict, rejected: dict) -> None:
    node = reply.metadata.src_node_id
    if reply.has_error():
        rejected[f"node {node}"] = f"node {node}: the owner's ClientApp failed ({reply.error.reason})"
        return
    content = reply.content
    meta = dict(content.config_records[META]) if META in content.config_records else {}
    owner = meta.get("owner")
    if not isinstance(owner, str) or owner not in plan.settings.owners:
        why = meta["error"] if "error" in meta else f"answered as {owner!r}, which is not an expected owner"
        rejected[f"node {node}"] = f"node {node}: {why}"
        return
    if owner in accepted or owner in rejected:
        rejected[f"node {node}"] = f"node {node}: answered as {owner!r}, who has already answered"
        return
    if "error" in meta:
        rejected[owner] = f"owner {owner!r}: {meta['error']}"
        return
    arrays = content.array_records.get(EXPERT)
    try:
        tensors, rank = check_upload(plan, owner, meta, arrays)
    except FlexmoreError as exc:
        rejected[owner] = str(exc)
        return
    from safetensors.torch import save_file

    file = workdir / f"{owner}.safetensors"
    save_file(tensors, str(file))
    nbytes = sum(len(a.data) for a in arrays.values())
    accepted[owner] = Upload(owner=owner, rank=rank, bytes=nbytes, file=file)
    log.info("accepted %s's expert (rank %s, %d bytes)", owner, rank or "full", nbytes)


def assemble(plan: Plan, uploads: Sequence[Upload], out: Path, meta: dict) -> FlexMoREConfig:
    """Write the mixture: expert 0 and shared tensors from the public model, expert i from uploads[i-1]."""
    from safetensors import safe_open

    n = len(uploads)
    ranks = [FULL] + [u.rank for u in uploads]
    names = ["public"] + [u.owner for u in uploads]
    k = plan.settings.top_k or min(2, n + 1)
    base = plan.config.to_dict()
    base.update(num_experts=n + 1, num_experts_per_tok=min(k, n + 1))
    target = FlexMoREConfig.from_flexolmo(base, expert_ranks=ranks, expert_names=names)
    all_full = all(r == FULL for r in ranks)
    files = [safe_open(str(u.file), framework="pt") for u in uploads]

    def produce(name: str) -> torch.Tensor:
        if m := _ROUTER_KEY.match(name):
            rows = [plan.public.get(name)[0:1]]  # [1, H]
            rows += [f.get_tensor(ROUTER_ROW.format(layer=int(m[1]))) for f in files]
            return torch.cat(rows)  # [n+1, H]
        if m := _EXPERT_KEY.match(name):
            layer, slot, proj, part = int(m[1]), int(m[2]), m[3], m[4] or ""
            if slot > 0:
                return files[slot - 1].get_tensor(expert_key(layer, 1, proj, part))
        return plan.public.get(name)

    with CheckpointWriter(out, overwrite=plan.settings.overwrite) as writer:
        for name in expected_shapes(target):
            writer.add(name, produce(name))
        (flexolmo_config(target) if all_full else target).save_pretrained(writer.tmp)
        for file in plan.public.extra_files():
            writer.copy_file(file)
        writer.commit({"operation": "federate", "public": str(plan.settings.public),
                       "expert_names": target.expert_names, "expert_ranks": target.expert_ranks,
                       "num_experts_per_tok": target.num_experts_per_tok, **meta})
    return target


def run_server(grid: Grid, settings: FederationSettings) -> FederationResult:
    """The whole server side: plan, wait for the owners' nodes, one message each, check, assemble, report."""
    try:
        return _run_server(grid, settings)
    except Exception as exc:
        if settings.error_file:
            Path(settings.error_file).write_text(
                (str(exc) if isinstance(exc, FlexmoreError) else f"{type(exc).__name__}: {exc}") + "\n")
        raise


def _run_server(grid: Grid, settings: FederationSettings) -> FederationResult:
    plan = plan_federation(settings)
    out = Path(settings.out)
    log.info("public model sha256 %s; waiting for %d owners' nodes", plan.public_hash, len(settings.owners))
    nodes = wait_for_nodes(grid, len(settings.owners), settings.node_timeout, settings.allow_missing)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.uploads-", dir=out.parent))
    try:
        accepted, rejected = collect(grid, plan, nodes, workdir)
        missing = [o for o in settings.owners if o not in accepted and o not in rejected]
        problems = list(rejected.values()) + [f"owner {o!r}: no upload arrived" for o in missing]
        if problems and not settings.allow_missing:
            raise FlexmoreError("; ".join(problems) + " — nothing written (pass --allow-missing to assemble the "
                                "rest)")
        uploads = [accepted[o] for o in settings.owners if o in accepted]
        if not uploads:
            raise FlexmoreError("no owner's expert was accepted: " + "; ".join(problems))
        summary = {
            "out": str(out),
            "public": str(settings.public),
            "public_hash": plan.public_hash,
            "compression": str(plan.compression),
            "training": dict(settings.train),
            "full_expert_bytes": plan.full_bytes,
            "owners": {
                u.owner: {"status": "accepted", "rank": u.rank, "bytes": u.bytes,
                          "fraction_of_full": u.bytes / plan.full_bytes}
                for u in uploads
            },
            "rejected": rejected,
            "missing": missing,
            "uploaded_bytes": sum(u.bytes for u in uploads),
        }
        config = assemble(plan, uploads, out, {"federation": {k: summary[k] for k in
                                                              ("public_hash", "compression", "rejected", "missing")}})
        summary["expert_names"] = config.expert_names
        summary["expert_ranks"] = config.expert_ranks
        summary["num_experts_per_tok"] = config.num_experts_per_tok
        file = summary_path(out)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")  # owners stay in expert order
        tmp.replace(file)
        log.info("wrote %s (%d experts) and %s", out, len(config.expert_names), file)
        return FederationResult(out=out, summary=summary, summary_file=file)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Flower apps


def _owner_from_node_config(context: Context) -> OwnerSetup:
    """Deployment: each owner's SuperNode says who it is and where its data is (--node-config)."""
    node, run = context.node_config, context.run_config
    owner = str(node.get("owner", "")).strip()
    data = str(node.get("data-path", "")).strip()
    public = str(node.get("public-path", "") or run.get("public", "")).strip()
    if not owner or not data or not public:
        lacking = [k for k, v in (("owner", owner), ("data-path", data), ("public-path", public)) if not v]
        raise FlexmoreError(f"SuperNode node config lacks {', '.join(lacking)} (flower-supernode --node-config "
                            "'owner=NAME data-path=/path/to/data public-path=/path/to/public')")
    device = str(node.get("device", "")).strip() or None
    trainer = str(node.get("trainer", "")).strip() or None
    return OwnerSetup(owner=owner, data_paths=tuple(p.strip() for p in data.split(",") if p.strip()), public=public,
                      device=device, trainer=trainer)


def make_client_app(resolve: Callable[[Context], OwnerSetup], train_fn: TrainFn | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        try:
            setup = resolve(context)
        except FlexmoreError as exc:  # a misconfigured node: say so, with no name to give
            log.error("%s", exc)
            return _refusal(message, "", str(exc))
        return owner_reply(message, setup, train_fn)

    return app


def make_server_app(settings_of: Callable[[Context], FederationSettings],
                    on_result: Callable[[FederationResult], None] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_server(grid, settings_of(context))
        if on_result is not None:
            on_result(result)

    return app


@dataclass(frozen=True)
class _SimulationOwners:
    """Simulation: virtual SuperNode i (node config partition-id = i) is owners[i]."""

    owners: tuple[tuple[str, tuple[str, ...]], ...]  # (name, data paths)
    public: str
    device: str | None = None

    def __call__(self, context: Context) -> OwnerSetup:
        index = int(context.node_config["partition-id"])
        name, data = self.owners[index]
        return OwnerSetup(owner=name, data_paths=data, public=self.public, device=self.device)


def simulation_apps(settings: FederationSettings, owners: Sequence[tuple[str, Sequence[str]]],
                    train_fn: TrainFn | None = None,
                    on_result: Callable[[FederationResult], None] | None = None,
                    device: str | None = None) -> tuple[ServerApp, ClientApp]:
    """The server and client apps of a simulation: one virtual SuperNode per owner, in `owners` order."""
    resolve = _SimulationOwners(tuple((name, tuple(str(p) for p in paths)) for name, paths in owners),
                                public=str(settings.public), device=device)
    return make_server_app(lambda _context: settings, on_result), make_client_app(resolve, train_fn)


# Deployment: `flwr run` loads these (components of the generated app's pyproject.toml).
server_app = make_server_app(lambda context: FederationSettings.from_run_config(dict(context.run_config)))
client_app = make_client_app(_owner_from_node_config)


def result_dict(result: FederationResult) -> dict:
    return {**asdict(result), "out": str(result.out) if result.out else None,
            "summary_file": str(result.summary_file) if result.summary_file else None}
