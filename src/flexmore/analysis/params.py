"""Parameter accounting of a mixture, from its architecture alone (REFERENCE §3): what `flexmore params` prints.

The source is a preset (`flexolmo-7x7b`: transformers' default FlexOlmoConfig, V=100352, H=4096, I=11008,
L=32, 7 experts; `flexolmo-2x7b`: the same with 2), a config.json, or a checkpoint directory. A rank spec
describes the same architecture with low-rank domain experts; nothing is built or read but the config.

Active parameters per token at k (`active_max`, `active_mean`) count the weights a token's output depends
on: everything outside the experts (embeddings, lm_head, attention, norms: conventionally all "active"),
every router row (each token scores all experts), and the FFN weights of the k experts it is routed to,
where each weight tensor counts once. A low-rank expert computes (W_public + B A) x, so routing to one or
more public/low-rank experts reads the public FFN once plus each low-rank expert's factors; a full-size
domain expert reads its own FFN. FlexOlmo's router picks k of ALL experts (the public one included), so
  active_max   the largest such count over every set of k experts (worst case);
  active_mean  its mean over all sets of k experts (uniform routing).
With every expert full-size both reduce to shared + router + k full experts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..config import FULL, FlexMoREConfig, apply_rank_spec, break_even_rank, count_parameters, dtype_bytes
from ..errors import FlexmoreError

PAPER_NAMES = ["public", "code", "creative", "math", "news", "pes2o", "reddit"]  # REFERENCE §2, released order
PRESETS = {  # name -> (num_experts, default names, active k); dimensions are FlexOlmoConfig's defaults
    "flexolmo-7x7b": (7, PAPER_NAMES, 5),
    "flexolmo-2x7b": (2, None, 2),
}
DTYPES = ("float32", "bfloat16", "float16")


def load_config(source: str | Path, names: list[str] | None = None, option: str = "source") -> FlexMoREConfig:
    """A FlexMoREConfig from a preset name, a config.json file or a checkpoint directory (hub ids too).

    `names` (public first) overrides the expert names; it must have one entry per expert.
    """
    from ..convert import check_expert_names, read_config

    text = str(source).strip()
    if text.lower() in PRESETS:
        num_experts, default_names, k = PRESETS[text.lower()]
        if names is not None:
            check_expert_names(names, num_experts)
        return FlexMoREConfig(num_experts=num_experts, num_experts_per_tok=k,
                              expert_names=names if names is not None else default_names)
    path = Path(text)
    if path.is_file():
        try:
            config_dict = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FlexmoreError(f"{path}: not a JSON config ({exc})") from None
        if not isinstance(config_dict, dict) or config_dict.get("model_type") not in ("flex_olmo", "flexmore"):
            kind = config_dict.get("model_type") if isinstance(config_dict, dict) else None
            raise FlexmoreError(f"{path}: model_type {kind!r} is not a FlexOlmo or FlexMoRE config")
        # read_config wants a reader; it uses only these two attributes (and looks for the export metadata
        # next to config.json, which is where it lives).
        return read_config(SimpleNamespace(path=path.parent, config_dict=config_dict), names)
    if path.is_dir() and (path / "config.json").is_file():
        return load_config(path / "config.json", names, option)
    if path.exists() or text.startswith((".", "/")) or text.count("/") != 1:
        presets = ", ".join(PRESETS)
        raise FlexmoreError(f"{option} {text!r}: not a preset ({presets}), a config.json or a checkpoint directory")
    from ..checkpoint import CheckpointReader  # a hub id

    return read_config(CheckpointReader(text), names)


@dataclass(frozen=True)
class ExpertParams:
    index: int
    name: str
    rank: int  # 0 = full
    parameters: int  # over all layers


@dataclass(frozen=True)
class ParamsReport:
    """Parameter counts of one mixture, by part, with active counts at top_k and bytes per dtype."""

    source: str
    experts: list[ExpertParams]
    shared: int
    router: int
    total: int
    all_full_total: int
    top_k: int
    active_max: int
    active_mean: float
    hidden_size: int
    intermediate_size: int
    num_layers: int
    notes: list[str] = field(default_factory=list)

    @property
    def saving(self) -> float:
        """Fraction of the all-full mixture's parameters saved."""
        return 1 - self.total / self.all_full_total

    def nbytes(self, dtype: str) -> int:
        return self.total * dtype_bytes(dtype)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size, "num_layers": self.num_layers,
            "experts": [{"index": x.index, "name": x.name, "rank": "full" if x.rank == FULL else x.rank,
                         "parameters": x.parameters} for x in self.experts],
            "shared": self.shared, "router": self.router, "parameters": self.total,
            "top_k": self.top_k, "active_max": self.active_max, "active_mean": self.active_mean,
            "bytes": {d: self.nbytes(d) for d in DTYPES},
            "parameters_all_full": self.all_full_total,
            "bytes_all_full": {d: self.all_full_total * dtype_bytes(d) for d in DTYPES},
            "saved_parameters": self.all_full_total - self.total, "saving": self.saving,
            "notes": list(self.notes),
        }


def active_parameters(config: FlexMoREConfig, expert_ranks: list[int], top_k: int) -> tuple[int, float]:
    """(worst case, mean over uniformly random k-sets) of the parameters one token uses; see the module doc."""
    count = count_parameters(config, expert_ranks)
    n = len(expert_ranks)
    if not 1 <= top_k <= n:
        raise FlexmoreError(f"--top-k {top_k}: must be between 1 and the number of experts ({n})")
    public_ffn = count.full_expert  # read once by any set holding the public or a low-rank expert
    # Cost of each expert beyond the public FFN: 0 for the public, factors for low-rank, all for full domain.
    sharing = [e for e in range(n) if e == 0 or expert_ranks[e] != FULL]  # share the public FFN
    extra = {e: 0 if e == 0 else count.experts[e] for e in sharing}
    full_domain = [e for e in range(n) if e not in extra]
    base = count.shared + count.router
    # Worst case: j experts from the sharing set (the j largest extras) and k - j full domain experts.
    best = 0
    by_size = sorted(extra.values(), reverse=True)
    for j in range(0, min(top_k, len(sharing)) + 1):
        if top_k - j > len(full_domain):
            continue
        ffn = (top_k - j) * count.full_expert + (public_ffn + sum(by_size[:j]) if j else 0)
        best = max(best, ffn)
    # Mean: linearity for the per-expert parts, plus the public FFN times P(the set meets the sharing set).
    p_none = math.comb(len(full_domain), top_k) / math.comb(n, top_k)
    mean = top_k / n * (len(full_domain) * count.full_expert + sum(extra.values())) + (1 - p_none) * public_ffn
    return base + best, base + mean


def describe_parameters(source: str | Path, ranks: str | None = None, names: list[str] | None = None,
                        top_k: int | None = None) -> ParamsReport:
    """Parameter report of `source` (preset, config.json or checkpoint directory), optionally with a rank spec."""
    config = load_config(source, names)
    expert_ranks = config.expert_ranks if ranks is None else apply_rank_spec(config, ranks)
    count = count_parameters(config, expert_ranks)
    k = config.num_experts_per_tok if top_k is None else top_k
    active_max, active_mean = active_parameters(config, expert_ranks, k)
    even = break_even_rank(config.hidden_size, config.intermediate_size)
    notes = [f"{name}: rank {rank} is at or above the break-even rank {even}; its factors cost more than a "
             "full-size expert (extract stores such experts full-size)"
             for name, rank in zip(config.expert_names, expert_ranks) if rank != FULL and rank >= even]
    return ParamsReport(
        source=str(source),
        experts=[ExpertParams(e, n, r, p) for e, (n, r, p) in
                 enumerate(zip(config.expert_names, expert_ranks, count.experts))],
        shared=count.shared, router=count.router, total=count.total, all_full_total=count.all_full_total,
        top_k=k, active_max=active_max, active_mean=active_mean, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers, notes=notes,
    )
