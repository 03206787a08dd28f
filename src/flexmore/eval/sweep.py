"""The paper's study over a user's experts: mixtures x ranks x active experts, resumable, into SQLite.

Mixtures (REFERENCE §7):
  public          the public model alone (its FFN, router of one row; the reference point)
  pair            public + one domain expert at each rank of the list (and full), k = 2
  homogeneous     all experts at one rank, for each k (default 2, 4, N)
  heterogeneous   rank specs (files from `flexmore select`, or given inline), for each k
Every mixture is assembled in memory from the source checkpoint and the SVD cache (no checkpoint per
rank on disk); the shared weights are read once per sweep.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import tokenizer_from_dir
from ..config import FULL, FlexMoREConfig, break_even_rank, count_parameters, parse_rank_spec
from ..convert import _EXPERT_KEY, _ROUTER_KEY, expert_key, mixture_config, open_checkpoint
from ..errors import FlexmoreError
from ..experts import PROJECTIONS
from ..extract.pipeline import SvdCache, SvdSettings, build_svd_cache, expert_weight, read_matrix
from ..extract.ranks import Fixed, Full, parse_policy
from ..modeling import FlexMoREForCausalLM
from .engine import TaskRef, evaluate, make_lm, resolve_tasks
from .store import Mixture, ResultStore

DEFAULT_RANKS = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096,full"


class MixtureBuilder:
    """Builds FlexMoRE models for any subset of experts and ranks from a source checkpoint + SVD cache."""

    def __init__(self, source: str | os.PathLike, cache: SvdCache | None):
        self.reader, self.config = open_checkpoint(source)
        self.cache = cache
        self._shared: dict[str, torch.Tensor] | None = None

    def shared(self) -> dict[str, torch.Tensor]:
        """Everything but the domain experts (embeddings, attention, norms, routers, public expert), once."""
        if self._shared is None:
            self._shared = {}
            for name in self.reader.keys():
                m = _EXPERT_KEY.match(name)
                if m is None or int(m[2]) == 0:
                    self._shared[name] = read_matrix(self.reader, name)
        return self._shared

    def expert_names(self) -> list[str]:
        return list(self.config.expert_names)

    def effective_ranks(self, ranks: list[int]) -> list[int]:
        """Ranks at or above break-even (or min dims) are stored full-size, as extraction does."""
        even = break_even_rank(self.config.hidden_size, self.config.intermediate_size)
        return [FULL if r == FULL or min(r, self.config.max_rank) >= even else r for r in ranks]

    def parameters(self, experts: list[int], ranks: list[int]) -> int:
        cfg = mixture_config(self.config, experts, self.effective_ranks(ranks), None)
        return count_parameters(cfg, cfg.expert_ranks).total

    @torch.no_grad()
    def build(self, experts: list[int], ranks: list[int], k: int) -> FlexMoREForCausalLM:
        """experts: source indices, public first; ranks: one per listed expert (0 = full)."""
        ranks = self.effective_ranks(ranks)
        cfg = mixture_config(self.config, experts, ranks, min(k, len(experts)))
        state: dict[str, torch.Tensor] = {}
        for name, tensor in self.shared().items():
            state[name] = tensor[experts] if _ROUTER_KEY.match(name) else tensor
        for slot, (e, rank) in enumerate(zip(experts[1:], ranks[1:]), start=1):
            for layer in range(cfg.num_hidden_layers):
                factors = self._factors(e, layer) if rank != FULL else None
                for proj in PROJECTIONS:
                    dtype = state[expert_key(layer, 0, proj)].dtype
                    if rank == FULL:
                        state[expert_key(layer, slot, proj)] = expert_weight(self.reader, self.config, layer, e, proj).to(dtype)
                    else:
                        b, a = factors[proj].factors(rank, dtype)
                        state[expert_key(layer, slot, proj, "_b")] = b
                        state[expert_key(layer, slot, proj, "_a")] = a
        with torch.device("meta"):
            model = FlexMoREForCausalLM(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoRotaryEmbedding

        model.model.rotary_emb = FlexOlmoRotaryEmbedding(cfg)  # its buffers are not in the state dict
        return model.eval()

    def _factors(self, e: int, layer: int):
        if self.cache is None:
            raise FlexmoreError("a low-rank mixture needs an SVD cache (--cache)")
        return self.cache.load(e, layer)


def parse_ks(text: str | None, num_experts: int) -> list[int]:
    """'2,4,N' -> [2, 4, num_experts]; default 2, 4, N (those that exist)."""
    items = (text or "2,4,N").split(",")
    ks = []
    for item in items:
        item = item.strip()
        k = num_experts if item.upper() == "N" else int(item) if item.isdigit() else None
        if k is None or not 1 <= k <= num_experts:
            raise FlexmoreError(f"--k: {item!r} must be between 1 and {num_experts} (or N)")
        ks.append(k)
    return list(dict.fromkeys(ks))


def parse_rank_list(text: str) -> list[int]:
    ranks = []
    for item in text.split(","):
        policy = parse_policy(item, "--ranks")
        if not isinstance(policy, (Fixed, Full)):
            raise FlexmoreError(f"--ranks: {item.strip()!r}: a sweep lists ranks and 'full'")
        ranks.append(FULL if isinstance(policy, Full) else policy.rank)
    return list(dict.fromkeys(ranks))


def load_specs(specs: list[str], names: list[str]) -> dict[str, list[int]]:
    """Heterogeneous rank specs: JSON files (label = file's "name" or stem) or inline specs (label = text)."""
    out = {}
    for spec in specs:
        label = spec
        if spec.endswith(".json"):
            path = Path(spec)
            if not path.is_file():
                raise FlexmoreError(f"--spec: rank spec file {spec} does not exist")
            label = json.loads(path.read_text()).get("name", path.stem)
        ranks = [FULL] * len(names)
        for e, rank in parse_rank_spec(spec, names, "--spec").items():
            ranks[e] = rank
        out[label] = ranks
    return out


def plan_mixtures(builder: MixtureBuilder, ranks: list[int], ks: list[int], specs: dict[str, list[int]],
                  include: tuple[str, ...] = ("public", "pair", "homogeneous", "heterogeneous")) -> list[tuple[Mixture, list[int]]]:
    """(mixture, source expert indices) for the whole study, in a stable order."""
    names = builder.expert_names()
    n = len(names)
    label = lambda r: "full" if r == FULL else str(r)  # noqa: E731
    plan: list[tuple[Mixture, list[int]]] = []

    def add(kind, experts, mixture_ranks, k, rank_label, under_test=None):
        eff = builder.effective_ranks(mixture_ranks)
        mixture = Mixture(kind, tuple(names[e] for e in experts), tuple(eff), k, rank_label, under_test,
                          parameters=builder.parameters(experts, mixture_ranks))
        if mixture.id not in {m.id for m, _ in plan}:
            plan.append((mixture, experts))

    if "public" in include:
        add("public", [0], [FULL], 1, "public")
    if "pair" in include:
        for e in range(1, n):
            for r in ranks:
                add("pair", [0, e], [FULL, r], 2, label(r), names[e])
    if "homogeneous" in include:
        for r in ranks:
            for k in ks:
                add("homogeneous", list(range(n)), [FULL] + [r] * (n - 1), k, label(r))
    if "heterogeneous" in include:
        for spec_label, spec_ranks in specs.items():
            for k in ks:
                add("heterogeneous", list(range(n)), spec_ranks, k, spec_label)
    return plan


@dataclass
class SweepSummary:
    mixtures: int
    tasks: int
    evaluated: int  # (mixture, task) pairs run now
    skipped: int  # already in the database
    seconds: float


def run_sweep(
    source: str | os.PathLike,
    tasks: list[str],
    db: str | os.PathLike,
    ranks: str = DEFAULT_RANKS,
    ks: str | None = None,
    specs: list[str] = (),
    cache_dir: str | os.PathLike | None = None,
    include: tuple[str, ...] = ("public", "pair", "homogeneous", "heterogeneous"),
    limit: int | None = None,
    batch_size: int | str = 8,
    device: str = "cpu",
    ray_address: str | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    settings: SvdSettings | None = None,
) -> SweepSummary:
    """Evaluate every planned (mixture, task) not yet in `db`; see module docstring."""
    started = time.perf_counter()
    refs = resolve_tasks(list(tasks))
    builder = MixtureBuilder(source, None)
    names = builder.expert_names()
    rank_list = parse_rank_list(ranks)
    k_list = parse_ks(ks, len(names))
    spec_ranks = load_specs(list(specs), names)
    plan = plan_mixtures(builder, rank_list, k_list, spec_ranks, include)
    # opened only once every argument has been checked: a bad call creates no file
    with contextlib.closing(ResultStore(db)) as store:
        finished = store.finished()
        todo = [(m, experts, [r for r in refs if (m.id, r.name) not in finished]) for m, experts in plan]
        todo = [t for t in todo if t[2]]
        total = len(plan) * len(refs)
        done = total - sum(len(t[2]) for t in todo)

        needed = sorted({r for m, _, _ in todo for r in m.ranks if r != FULL})
        if needed:
            cache_dir = Path(cache_dir) if cache_dir else Path(f"{db}.svd-cache")
            svd = settings or SvdSettings(rank=max(needed), device=device)
            if (cache_dir / "cache.json").is_file():  # reuse its settings; a rank beyond what it keeps is an error
                kept = SvdCache.open(cache_dir).meta["settings"]
                if kept["rank"] < max(needed):
                    raise FlexmoreError(f"{cache_dir}: the SVD cache keeps {kept['rank']} singular vectors; "
                                        f"the sweep needs {max(needed)}")
                svd = SvdSettings(**kept, device=svd.device)
            else:
                svd = SvdSettings(**{**svd.__dict__, "rank": max(needed)})
            experts = sorted({names.index(x) for m, _, _ in todo for x, r in zip(m.experts, m.ranks) if r != FULL})
            # factorises only what the cache lacks (or what changed in the source)
            builder.cache, _ = build_svd_cache(builder.reader, builder.config, cache_dir, svd, experts,
                                               on_matrix=on_progress and (lambda m: on_progress(done, total, f"svd {m}")))

        evaluated = 0
        if ray_address is not None:
            from .ray_sweep import run_on_ray

            evaluated = run_on_ray(ray_address, str(source), str(builder.cache.path) if builder.cache else None, todo,
                                   store, limit, batch_size, device, done, total, on_progress)
        else:
            tokenizer = tokenizer_from_dir(builder.reader.path)
            for mixture, experts, pending in todo:
                model = builder.build(experts, list(mixture.ranks), mixture.k).to(device)
                for result in evaluate_each(model, tokenizer, pending, limit, batch_size, device):
                    store.record(mixture, result.task, result.group, result.metrics, result.main_metric, result.n)
                    done += 1
                    evaluated += 1
                    on_progress and on_progress(done, total, f"{mixture.id} / {result.task}")
                del model
        on_progress and on_progress(done, total, "done")
        return SweepSummary(len(plan), len(refs), evaluated, total - evaluated, time.perf_counter() - started)


def evaluate_each(model, tokenizer, refs: list[TaskRef], limit, batch_size, device):
    """Results one task at a time, so each can be stored the moment it is known."""
    lm = make_lm(model, tokenizer, batch_size, device, progress=False)  # the sweep shows its own progress
    for ref in refs:
        (result,) = evaluate(model, tokenizer, [ref], limit=limit, lm=lm, progress=False)
        yield result


def evaluate_mixture(source: str, cache_path: str | None, experts: list[int], mixture: Mixture, refs: list[TaskRef],
                     limit: int | None, batch_size, device: str) -> list[tuple]:
    """One mixture on its pending tasks, in a fresh process (Ray workers): rows for ResultStore.record."""
    builder = MixtureBuilder(source, SvdCache.open(cache_path) if cache_path else None)
    model = builder.build(experts, list(mixture.ranks), mixture.k).to(device)
    return [(r.task, r.group, r.metrics, r.main_metric, r.n)
            for r in evaluate_each(model, tokenizer_from_dir(builder.reader.path), refs, limit, batch_size, device)]
