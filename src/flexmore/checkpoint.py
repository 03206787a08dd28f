"""Streaming safetensors checkpoints: read one tensor at a time, write shard by shard, atomically.

A checkpoint is a directory with `config.json` and either `model.safetensors` or sharded
`model-XXXXX-of-YYYYY.safetensors` files listed in `model.safetensors.index.json` (the HF layout).
Nothing here ever holds a whole model in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from . import __version__
from .errors import FlexmoreError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
META_NAME = "flexmore.json"  # provenance: flexmore version, operation, source, options
KNOWN_MODEL_TYPES = ("flex_olmo", "flexmore")
# Files of a source checkpoint that travel unchanged with every conversion.
_WEIGHT_OR_CONFIG = {"config.json", INDEX_NAME, META_NAME}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id (`org/name`) fetched into the HF cache (safetensors only)."""
    path = Path(path_or_id)
    if path.exists():
        if not path.is_dir():
            raise FlexmoreError(f"{path}: not a directory (a checkpoint is a directory with config.json)")
        return path
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise FlexmoreError(f"{text}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # hub errors come in many types; the user needs one line
        raise FlexmoreError(f"{text}: not a local directory and not fetchable from the hub ({type(exc).__name__})") from exc


class CheckpointReader:
    """Lazy, per-tensor access to a FlexOlmo or FlexMoRE checkpoint directory."""

    def __init__(self, path_or_id: str | os.PathLike):
        self.path = resolve_checkpoint(path_or_id)
        self.config_dict = self._read_config()
        self.model_type = self.config_dict.get("model_type")
        if self.model_type not in KNOWN_MODEL_TYPES:
            raise FlexmoreError(
                f"{self.path / 'config.json'}: model_type {self.model_type!r} is not a FlexOlmo or FlexMoRE checkpoint"
            )
        self._headers: dict[str, dict] = {}  # file name -> parsed safetensors header
        self.weight_map = self._read_weight_map()  # tensor name -> file name

    def _read_config(self) -> dict:
        file = self.path / "config.json"
        if not file.is_file():
            raise FlexmoreError(f"{self.path}: not a checkpoint (no config.json)")
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise FlexmoreError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise FlexmoreError(f"{index}: not a safetensors index (needs a 'weight_map')") from exc
            for name in sorted(set(weight_map.values())):
                if not (self.path / name).is_file():
                    raise FlexmoreError(f"{index}: lists shard {name}, which is missing")
            return dict(weight_map)
        single = self.path / WEIGHTS_NAME
        if single.is_file():
            return {name: WEIGHTS_NAME for name in self._header(WEIGHTS_NAME)}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise FlexmoreError(f"{self.path}: only pickle weights (.bin/.pt) found; flexmore reads safetensors only")
        raise FlexmoreError(f"{self.path}: no {WEIGHTS_NAME} or {INDEX_NAME}")

    def _header(self, file_name: str) -> dict:
        """Tensor name -> {dtype, shape, data_offsets}, checked against the file's size."""
        if file_name not in self._headers:
            file = self.path / file_name
            self._headers[file_name] = read_safetensors_header(file)
        return self._headers[file_name]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> Path:
        return self.path / self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.weight_map:
            raise FlexmoreError(f"{self.path}: tensor {name} is missing")
        info = self._header(self.weight_map[name]).get(name)
        if info is None:
            raise FlexmoreError(f"{self.file_of(name)}: tensor {name} is listed in the index but not in the file")
        return tuple(info["shape"])

    def dtype(self, name: str) -> str:
        self.shape(name)
        return self._header(self.weight_map[name])[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (nothing else of the file is loaded)."""
        self.shape(name)
        file = self.file_of(name)
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name)
        except Exception as exc:
            raise FlexmoreError(f"{file}: cannot read tensor {name} ({exc})") from exc

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every expected tensor present with its shape; names the first one at fault."""
        for name, shape in expected.items():
            if name not in self.weight_map:
                raise FlexmoreError(f"{self.path}: tensor {name} is missing")
            got = self.shape(name)
            if got != tuple(shape):
                raise FlexmoreError(f"{self.file_of(name)}: tensor {name} has shape {list(got)}, expected {list(shape)}")

    def extra_files(self) -> list[Path]:
        """Tokenizer, generation config and other small files that travel with the weights."""
        return sorted(
            p
            for p in self.path.iterdir()
            if p.is_file() and p.name not in _WEIGHT_OR_CONFIG and not p.name.endswith((".safetensors", ".bin", ".pt"))
        )


_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_safetensors_header(file: Path) -> dict:
    """Parse a safetensors header without loading data; a truncated or corrupt file is a clear error."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise FlexmoreError(f"{file}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise FlexmoreError(f"{file}: truncated safetensors file (header runs past the end)")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FlexmoreError(f"{file}: corrupt safetensors header") from exc
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    for name, info in header.items():
        start, end = info["data_offsets"]
        if end > data_len:
            raise FlexmoreError(f"{file}: truncated safetensors file (tensor {name} runs past the end)")
        n = _ST_DTYPE_BYTES.get(info["dtype"], 0)
        count = 1
        for d in info["shape"]:
            count *= d
        if n and end - start != n * count:
            raise FlexmoreError(f"{file}: corrupt safetensors entry for tensor {name}")
    return header


_ST_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                   torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                   torch.bool: "BOOL"}


class _ShardStream:
    """One safetensors shard written tensor by tensor: data bytes go to a side file as they arrive; on
    close the header (now known) is written and the data appended after it. Memory: one tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_suffix(".data")
        self.data = open(self.data_path, "wb")
        self.entries: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in _ST_DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors here")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self.data.write(raw)
        size = t.numel() * t.element_size()
        self.entries[name] = {"dtype": _ST_DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.nbytes, self.nbytes + size]}
        self.nbytes += size

    def close(self) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format allows space padding; keeps data 8-byte aligned
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
        self.data_path.unlink()


class CheckpointWriter:
    """Write tensors shard by shard into a temporary sibling of `out`; `commit()` renames it into place.

    Tensors go to disk as they are added (never more than one held here), so writing a checkpoint
    costs no memory beyond the tensor at hand. Used as a context manager: an exception leaves `out`
    untouched and removes the temporary directory.
    """

    def __init__(self, out: str | os.PathLike, max_shard_bytes: int = 4 << 30, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FlexmoreError(f"{self.out}: already exists (pass --overwrite to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise FlexmoreError(f"{self.out}: exists and is not a directory")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.max_shard_bytes = max_shard_bytes
        self._shard: _ShardStream | None = None
        self._shards: list[list[str]] = []
        self._total_bytes = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard is not None and self._shard.nbytes and self._shard.nbytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._shard is None:
            self._shard = _ShardStream(self.tmp / f"shard-{len(self._shards):05d}.safetensors")
        self._shard.add(name, tensor)
        self._total_bytes += nbytes

    def _close_shard(self) -> None:
        if self._shard is None:
            return
        self._shard.close()
        self._shards.append(list(self._shard.entries))
        self._shard = None

    def write_json(self, name: str, obj) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def copy_file(self, src: Path) -> None:
        shutil.copy2(src, self.tmp / src.name)

    def commit(self, meta: dict) -> Path:
        self._close_shard()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.tmp / f"shard-{i:05d}.safetensors").rename(self.tmp / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            self.write_json(INDEX_NAME, {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map})
        write_meta(self.tmp, meta)
        replace_dir(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.data.close()
            self._shard = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


def write_meta(directory: Path, meta: dict) -> None:
    """Provenance file of every output directory: the flexmore version that wrote it and how."""
    text = json.dumps({"flexmore_version": __version__, **meta}, indent=2, sort_keys=True)
    (directory / META_NAME).write_text(text + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`; an existing `dst` is moved aside first and deleted only afterwards."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old)
    else:
        src.rename(dst)


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling directory renamed to `out` when the block succeeds (for non-checkpoint outputs)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FlexmoreError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def tokenizer_from_dir(path: str | Path):
    """The tokenizer saved in a checkpoint directory; failure names the directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizer loading fails in many ways; the user needs the directory named
        raise FlexmoreError(f"{path}: no usable tokenizer ({type(exc).__name__})") from exc
