"""FlexMoRE configuration, rank specs and parameter accounting.

`FlexMoREConfig` is a `FlexOlmoConfig` plus two lists, one entry per expert:
  expert_ranks  0 = full-size expert; r > 0 = public FFN + rank-r correction B A per gate/up/down
  expert_names  human names ("public", "math", ...), used by rank specs and opt-out
Expert 0 is the public expert and is always full-size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers import FlexOlmoConfig

from .errors import FlexmoreError

PUBLIC = 0  # index of the public expert in every mixture
FULL = 0  # rank value meaning "full-size expert"

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def default_expert_names(num_experts: int) -> list[str]:
    return ["public"] + [f"expert{i}" for i in range(1, num_experts)]


class FlexMoREConfig(FlexOlmoConfig):
    """FlexOlmo configuration with rank-heterogeneous experts (see module docstring)."""

    model_type = "flexmore"

    expert_ranks: list[int] | None = None
    expert_names: list[str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.expert_ranks is None:
            self.expert_ranks = [FULL] * self.num_experts
        if self.expert_names is None:
            self.expert_names = default_expert_names(self.num_experts)
        self.expert_ranks = [int(r) for r in self.expert_ranks]
        self.expert_names = [str(n) for n in self.expert_names]
        self.validate_experts()

    @property
    def max_rank(self) -> int:
        """The largest meaningful rank of a delta: min(hidden, intermediate)."""
        return min(self.hidden_size, self.intermediate_size)

    def validate_experts(self) -> None:
        e = self.num_experts
        if len(self.expert_ranks) != e:
            raise FlexmoreError(f"config: expert_ranks has {len(self.expert_ranks)} entries but num_experts is {e}")
        if len(self.expert_names) != e:
            raise FlexmoreError(f"config: expert_names has {len(self.expert_names)} entries but num_experts is {e}")
        if len(set(self.expert_names)) != e:
            raise FlexmoreError(f"config: expert_names must be unique, got {self.expert_names}")
        if self.expert_ranks[PUBLIC] != FULL:
            raise FlexmoreError(
                f"config: expert 0 ({self.expert_names[0]!r}) is the public expert and must be full-size (rank 0), "
                f"got rank {self.expert_ranks[PUBLIC]}"
            )
        for name, rank in zip(self.expert_names, self.expert_ranks):
            if rank < 0:
                raise FlexmoreError(f"config: expert {name!r} has negative rank {rank}")
            if rank > self.max_rank:
                raise FlexmoreError(
                    f"config: expert {name!r} has rank {rank} above min(hidden_size, intermediate_size) = {self.max_rank}"
                )
        if not 1 <= self.num_experts_per_tok <= e:
            raise FlexmoreError(f"config: num_experts_per_tok={self.num_experts_per_tok} must be between 1 and {e}")

    @classmethod
    def from_flexolmo(
        cls,
        config: FlexOlmoConfig | dict,
        expert_ranks: list[int] | None = None,
        expert_names: list[str] | None = None,
    ) -> FlexMoREConfig:
        """A FlexMoRE config with the architecture of a FlexOlmo (or FlexMoRE) config."""
        d = config.to_dict() if not isinstance(config, dict) else dict(config)
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            d.pop(key, None)
        if expert_ranks is not None:
            d["expert_ranks"] = list(expert_ranks)
        if expert_names is not None:
            d["expert_names"] = list(expert_names)
        out = cls(**d)
        out.architectures = ["FlexMoREForCausalLM"]
        return out

    def parameter_count(self, expert_ranks: list[int] | None = None) -> ParamCount:
        """Exact parameter count of the model this config builds, without building it."""
        return count_parameters(self, self.expert_ranks if expert_ranks is None else expert_ranks)

    def stored_dtype(self) -> str:
        dtype = getattr(self, "dtype", None) or getattr(self, "torch_dtype", None) or "float32"
        return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------------
# Parameter accounting


@dataclass(frozen=True)
class ParamCount:
    """Exact parameter counts of one mixture, by part."""

    shared: int  # embeddings, lm_head, attention, norms: what every expert shares
    router: int  # all layers' router rows
    experts: list[int] = field(default_factory=list)  # per expert, over all layers
    full_expert: int = 0  # what one full-size expert costs, for savings

    @property
    def total(self) -> int:
        return self.shared + self.router + sum(self.experts)

    @property
    def all_full_total(self) -> int:
        """The same mixture with every expert full-size (the FlexOlmo model)."""
        return self.shared + self.router + self.full_expert * len(self.experts)

    def nbytes(self, dtype: str | torch.dtype = "float32") -> int:
        return self.total * dtype_bytes(dtype)


def dtype_bytes(dtype: str | torch.dtype, option: str = "dtype") -> int:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise FlexmoreError(f"{option}: unknown dtype {name!r}; expected one of {', '.join(sorted(_DTYPE_BYTES))}")
    return _DTYPE_BYTES[name]


def count_parameters(config: FlexOlmoConfig, expert_ranks: list[int] | None = None) -> ParamCount:
    """Count parameters from the architecture alone (REFERENCE §3); works for FlexOlmo configs too."""
    h, i, v, n_layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    ranks = list(expert_ranks) if expert_ranks is not None else [FULL] * config.num_experts
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    attn = h * q_width + 2 * h * kv_width + q_width * h  # q, k, v, o
    if config.attention_bias:
        attn += q_width + 2 * kv_width + h
    attn += q_width + kv_width  # q_norm, k_norm over the full projection width
    norms = 2 * h  # post-attention and post-feedforward RMSNorm
    embeddings = v * h * (1 if config.tie_word_embeddings else 2)
    shared = embeddings + h + n_layers * (attn + norms)  # + final norm
    full_expert = n_layers * 3 * h * i
    experts = [full_expert if r == FULL else n_layers * 3 * r * (h + i) for r in ranks]
    return ParamCount(shared=shared, router=n_layers * len(ranks) * h, experts=experts, full_expert=full_expert)


def break_even_rank(hidden_size: int, intermediate_size: int) -> int:
    """Smallest rank at which the factors B, A cost at least as much as the dense delta."""
    return -(-hidden_size * intermediate_size // (hidden_size + intermediate_size))


# --------------------------------------------------------------------------------------------------
# Rank specs: "64" | "math=2048,code=256,news=full" | "1=8,2=full"

_RANK_TOKEN = re.compile(r"^(full|\d+)$")


def parse_rank_value(text: str, where: str) -> int:
    text = text.strip().lower()
    if not _RANK_TOKEN.match(text):
        raise FlexmoreError(f"{where}: rank {text!r} is not a non-negative integer or 'full'")
    return FULL if text == "full" else int(text)


def parse_rank_spec(spec: str, expert_names: list[str], option: str = "--ranks", parse_value=parse_rank_value) -> dict:
    """Parse a rank spec into {expert index: value} for the non-public experts it names.

    A bare value applies to every domain expert; `name=value` or `index=value` pairs set one each.
    A path to a JSON file (as `flexmore select` writes: {"ranks": {"math": 64, "code": "full"}}) works too.
    `parse_value(text, where)` turns one value into a rank (default: an integer or 'full', 0 = full).
    """
    spec = spec.strip()
    if not spec:
        raise FlexmoreError(f"{option}: empty rank spec")
    if spec.endswith(".json"):
        spec = rank_spec_from_file(spec, option)
    if "=" not in spec:
        value = parse_value(spec, option)
        return {e: value for e in range(1, len(expert_names))}
    out: dict = {}
    for item in spec.split(","):
        if "=" not in item:
            raise FlexmoreError(f"{option}: {item.strip()!r} is not of the form expert=rank")
        key, value = (s.strip() for s in item.split("=", 1))
        e = resolve_expert(key, expert_names, option)
        if e == PUBLIC:
            raise FlexmoreError(f"{option}: expert {key!r} is the public expert; it is always full-size")
        if e in out:
            raise FlexmoreError(f"{option}: expert {key!r} is given twice")
        out[e] = parse_value(value, f"{option} {key}")
    return out


def rank_spec_from_file(path: str, option: str) -> str:
    """The inline form of a rank-spec file: {"ranks": {name: rank or "full", ...}, ...}."""
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FlexmoreError(f"{option}: rank spec file {path} does not exist")
    try:
        ranks = json.loads(file.read_text())["ranks"]
        return ",".join(f"{name}={value}" for name, value in ranks.items())
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
        raise FlexmoreError(f"{path}: not a rank spec file (expected {{\"ranks\": {{expert: rank}}}})") from exc


def resolve_expert(key: str, expert_names: list[str], option: str) -> int:
    """An expert index from a name or an index string."""
    if key in expert_names:
        return expert_names.index(key)
    if key.isdigit() and int(key) < len(expert_names):
        return int(key)
    raise FlexmoreError(f"{option}: unknown expert {key!r}; the experts are {', '.join(expert_names)}")


def apply_rank_spec(config: FlexMoREConfig, spec: str, option: str = "--ranks") -> list[int]:
    """The config's ranks with a spec applied, validated against the config's dimensions."""
    ranks = list(config.expert_ranks)
    for e, rank in parse_rank_spec(spec, config.expert_names, option).items():
        if rank > config.max_rank:
            raise FlexmoreError(
                f"{option}: rank {rank} for expert {config.expert_names[e]!r} exceeds min(hidden, intermediate) = "
                f"{config.max_rank}"
            )
        ranks[e] = rank
    return ranks
