"""Conversions between FlexOlmo and FlexMoRE checkpoints, opt-out and top-k, and model loading.

Every conversion streams: it reads one tensor at a time from the source and writes shard by shard
into a temporary sibling of the output, renamed at the end (checkpoint.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import FlexOlmoConfig

from .checkpoint import META_NAME, CheckpointReader, CheckpointWriter
from .config import FULL, FlexMoREConfig, dtype_bytes
from .errors import FlexmoreError
from .experts import PROJECTIONS
from .modeling import FlexMoREForCausalLM, experts_to_keep

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)(_a|_b)?\.weight$")
_ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")
_CONFIG_ONLY = ("model_type", "architectures", "transformers_version", "auto_map", "expert_ranks", "expert_names")


def expert_key(layer: int, expert: int, proj: str, part: str = "") -> str:
    """On-disk name of an expert tensor; part is "" (full weight), "_a" or "_b" (low-rank factors)."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}{part}.weight"


def expected_shapes(config: FlexMoREConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = FlexMoREForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def read_config(reader: CheckpointReader, expert_names: list[str] | None = None) -> FlexMoREConfig:
    """The checkpoint's config as a FlexMoREConfig (a FlexOlmo checkpoint has all experts full)."""
    d = dict(reader.config_dict)
    meta_file = reader.path / META_NAME
    if expert_names is None and "expert_names" not in d and meta_file.is_file():
        expert_names = json.loads(meta_file.read_text()).get("expert_names")  # kept by a FlexOlmo export
    if expert_names is not None:
        check_expert_names(expert_names, d.get("num_experts"))
        d["expert_names"] = list(expert_names)
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        d.pop(key, None)
    try:
        config = FlexMoREConfig(**d)
    except FlexmoreError as exc:
        raise FlexmoreError(f"{reader.path / 'config.json'}: {str(exc).removeprefix('config: ')}") from exc
    except (TypeError, ValueError) as exc:
        raise FlexmoreError(f"{reader.path / 'config.json'}: invalid config ({str(exc).splitlines()[0]})") from exc
    config.architectures = ["FlexMoREForCausalLM"]
    return config


def check_expert_names(names: list[str], num_experts: int | None, option: str = "--names") -> None:
    if len(names) != num_experts:
        raise FlexmoreError(f"{option}: {len(names)} names given but the checkpoint has {num_experts} experts")
    if len(set(names)) != len(names):
        raise FlexmoreError(f"{option}: names must be unique, got {','.join(names)}")


def open_checkpoint(path_or_id: str | os.PathLike, expert_names: list[str] | None = None):
    """Reader and config of a checkpoint whose tensors have all been checked against the config."""
    reader = CheckpointReader(path_or_id)
    config = read_config(reader, expert_names)
    reader.check_shapes(expected_shapes(config))
    return reader, config


def mixture_config(
    config: FlexMoREConfig, keep: list[int], expert_ranks: list[int], top_k: int | None
) -> FlexMoREConfig:
    """The config of `config` restricted to experts `keep` with new ranks and active k."""
    num_experts = len(keep)
    k = config.num_experts_per_tok if top_k is None else top_k
    if top_k is not None and not 1 <= top_k <= num_experts:
        raise FlexmoreError(f"--top-k {top_k}: must be between 1 and the number of experts ({num_experts})")
    d = {key: v for key, v in config.to_dict().items() if key not in _CONFIG_ONLY}
    d.update(num_experts=num_experts, num_experts_per_tok=min(k, num_experts))
    out = FlexMoREConfig(**d, expert_ranks=expert_ranks, expert_names=[config.expert_names[e] for e in keep])
    out.architectures = ["FlexMoREForCausalLM"]
    return out


def flexolmo_config(config: FlexMoREConfig) -> FlexOlmoConfig:
    d = {key: v for key, v in config.to_dict().items() if key not in _CONFIG_ONLY}
    out = FlexOlmoConfig(**d)
    out.architectures = ["FlexOlmoForCausalLM"]
    return out


@dataclass
class ConversionResult:
    out: Path
    config: FlexMoREConfig
    target: str  # "flexmore" | "flexolmo"


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    to: str = "flexmore",
    top_k: int | None = None,
    drop_experts: list[str] | tuple[str, ...] = (),
    expert_names: list[str] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 4 << 30,
    on_tensor: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert a FlexOlmo/FlexMoRE checkpoint, streaming.

    to="flexmore": FlexMoRE checkpoint, low-rank experts kept as factors (a FlexOlmo source gives all full).
    to="flexolmo": dense FlexOlmo checkpoint that stock `FlexOlmoForCausalLM` loads; each low-rank expert
                   is materialised as W_public + B A (computed in fp32).
    drop_experts opts experts out (FFN and router row); top_k sets the active experts per token.
    """
    if to not in ("flexmore", "flexolmo"):
        raise FlexmoreError(f"--to {to!r}: expected 'flexmore' or 'flexolmo'")
    out_dtype = None
    if dtype is not None:
        dtype_bytes(dtype, "--dtype")
        out_dtype = getattr(torch, dtype)
    reader, config = open_checkpoint(src, expert_names)
    keep = experts_to_keep(config.expert_names, drop_experts)
    ranks = [config.expert_ranks[e] if to == "flexmore" else FULL for e in keep]
    target = mixture_config(config, keep, ranks, top_k)
    if out_dtype is not None:
        target.dtype = dtype
    public_cache: dict[str, torch.Tensor] = {}  # the current layer's public weights, for materialising

    def public_weight(layer: int, proj: str) -> torch.Tensor:
        key = expert_key(layer, 0, proj)
        if key not in public_cache:
            if len(public_cache) >= len(PROJECTIONS):
                public_cache.clear()
            public_cache[key] = reader.get(key)
        return public_cache[key]

    def produce(name: str) -> torch.Tensor:
        if m := _ROUTER_KEY.match(name):
            return reader.get(name)[keep]
        if m := _EXPERT_KEY.match(name):
            layer, new_e, proj, part = int(m[1]), int(m[2]), m[3], m[4] or ""
            src_e = keep[new_e]
            if part or config.expert_ranks[src_e] == FULL:
                return reader.get(expert_key(layer, src_e, proj, part))
            b = reader.get(expert_key(layer, src_e, proj, "_b"))  # [out, r]
            a = reader.get(expert_key(layer, src_e, proj, "_a"))  # [r, in]
            base = public_weight(layer, proj)  # [out, in]
            return (base.float() + b.float() @ a.float()).to(base.dtype)
        return reader.get(name)

    target_config = target if to == "flexmore" else flexolmo_config(target)
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for name in expected_shapes(target):
            tensor = produce(name)
            writer.add(name, tensor if out_dtype is None else tensor.to(out_dtype))
            if on_tensor is not None:
                on_tensor(name)
        target_config.save_pretrained(writer.tmp)
        for file in reader.extra_files():
            writer.copy_file(file)
        writer.commit(
            {
                "operation": f"convert --to {to}",
                "source": str(src),
                "expert_names": target.expert_names,
                "expert_ranks": target.expert_ranks,
                "dropped_experts": [config.expert_names[e] for e in range(config.num_experts) if e not in keep],
                "num_experts_per_tok": target.num_experts_per_tok,
            }
        )
    return ConversionResult(out=Path(out), config=target, target=to)


def load_model(
    path_or_id: str | os.PathLike,
    top_k: int | None = None,
    drop_experts: list[str] | tuple[str, ...] = (),
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    expert_names: list[str] | None = None,
) -> FlexMoREForCausalLM:
    """Load a FlexMoRE or FlexOlmo checkpoint as a FlexMoREForCausalLM, with opt-out and top-k applied."""
    reader, config = open_checkpoint(path_or_id, expert_names)
    experts_to_keep(config.expert_names, drop_experts)  # validate before the (slow) load
    model = FlexMoREForCausalLM.from_pretrained(reader.path, config=config, dtype=dtype or "auto")
    if drop_experts:
        model.drop_experts(drop_experts)
    if top_k is not None:
        model.set_top_k(top_k)
    if device is not None:
        model = model.to(device)
    return model.eval()


def describe_checkpoint(path_or_id: str | os.PathLike, ranks: str | None = None) -> dict:
    """What `flexmore info` prints: experts, active k, parameters and bytes, saving against all-full.

    `ranks` (a rank spec) describes the same checkpoint with other ranks, without extracting anything.
    """
    from .config import apply_rank_spec

    reader, config = open_checkpoint(path_or_id)
    expert_ranks = config.expert_ranks if ranks is None else apply_rank_spec(config, ranks)
    count = config.parameter_count(expert_ranks)
    stored = {reader.dtype(name) for name in reader.keys()}
    dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}.get(
        stored.pop() if len(stored) == 1 else "", config.stored_dtype()
    )
    return {
        "path": str(reader.path),
        "model_type": reader.model_type,
        "experts": [
            {"index": e, "name": n, "rank": r, "parameters": p}
            for e, (n, r, p) in enumerate(zip(config.expert_names, expert_ranks, count.experts))
        ],
        "num_experts_per_tok": config.num_experts_per_tok,
        "parameters": count.total,
        "parameters_all_full": count.all_full_total,
        "dtype": dtype,
        "bytes": count.nbytes(dtype),
        "bytes_all_full": count.all_full_total * dtype_bytes(dtype),
        "saving": 1 - count.total / count.all_full_total,
    }
