"""Streaming PHLoRA extraction: FlexOlmo (or FlexMoRE) checkpoint -> SVD cache -> FlexMoRE checkpoints.

1. `build_svd_cache`: for every domain expert e, layer l and projection p, D = W[e] - W[0] is read
   tensor by tensor, factorised once, and its top singular triplets stored in one safetensors file per
   (expert, layer), written atomically. A rerun reuses every file whose source tensors are unchanged
   (a digest of their bytes is stored with them), so an interrupted extraction resumes.
2. `resolve_ranks` (ranks.py) picks each expert's rank from the cached spectra.
3. `assemble_checkpoint` writes a FlexMoRE checkpoint: shared tensors and full experts from the
   source, low-rank experts from the cache — any mixture of ranks, in seconds, without another SVD.
Peak memory: the public expert's three matrices of one layer, one expert matrix, its delta and one
SVD's workspace, whatever the model's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..checkpoint import CheckpointReader, CheckpointWriter
from ..config import FULL, FlexMoREConfig, break_even_rank, count_parameters, dtype_bytes, parse_rank_spec
from ..convert import _EXPERT_KEY, expected_shapes, expert_key, mixture_config, open_checkpoint
from ..errors import FlexmoreError
from ..experts import PROJECTIONS
from .ranks import Energy, Fixed, Full, Policy, Resolution, Spectrum, parse_budget, parse_policy, resolve_ranks
from .svd import Factorization, truncated_svd

CACHE_META = "cache.json"
_SETTINGS = ("rank", "method", "compute_dtype", "oversample", "power_iters", "seed")


@dataclass
class SvdSettings:
    rank: int  # singular triplets kept per matrix
    method: str = "auto"
    compute_dtype: str = "float32"
    oversample: int | None = None  # None: max(10, rank / 4)
    power_iters: int = 2
    seed: int = 0
    device: str = "cpu"  # where SVDs run; not part of the cache identity

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in _SETTINGS}


def read_matrix(reader: CheckpointReader, name: str) -> torch.Tensor:
    """One weight from disk, refused if it holds NaN or Inf."""
    t = reader.get(name)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise FlexmoreError(f"{reader.file_of(name)}: tensor {name} contains NaN or Inf")
    return t


def expert_weight(reader: CheckpointReader, config: FlexMoREConfig, layer: int, e: int, proj: str) -> torch.Tensor:
    """Dense weight of expert e (a low-rank source expert is materialised on top of the public one)."""
    if config.expert_ranks[e] == FULL:
        return read_matrix(reader, expert_key(layer, e, proj))
    b = read_matrix(reader, expert_key(layer, e, proj, "_b")).float()
    a = read_matrix(reader, expert_key(layer, e, proj, "_a")).float()
    return read_matrix(reader, expert_key(layer, 0, proj)).float() + b @ a


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SvdCache:
    """A directory of `expert{e}-layer{l}.safetensors` files ({proj}.U/.S/.Vh/.energy) and `cache.json`."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta

    @classmethod
    def open(cls, path: str | os.PathLike) -> SvdCache:
        path = Path(path)
        file = path / CACHE_META
        if not file.is_file():
            raise FlexmoreError(f"{path}: not an SVD cache (no {CACHE_META})")
        return cls(path, json.loads(file.read_text()))

    @classmethod
    def create_or_reuse(cls, path: Path, settings: SvdSettings, source: Path, expert_names: list[str]) -> SvdCache:
        meta = {"flexmore_version": __version__, "source": str(source), "expert_names": expert_names,
                "settings": settings.identity(), "digests": {}}
        if (path / CACHE_META).is_file():
            old = json.loads((path / CACHE_META).read_text())
            if old.get("settings") != meta["settings"]:
                raise FlexmoreError(
                    f"{path}: an SVD cache built with other settings ({old.get('settings')}); "
                    "use another --cache directory or delete it"
                )
            meta["digests"] = old.get("digests", {})
        path.mkdir(parents=True, exist_ok=True)
        cache = cls(path, meta)
        cache._save_meta()
        return cache

    def _save_meta(self) -> None:
        tmp = self.path / f".{CACHE_META}.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path / CACHE_META)

    @property
    def source(self) -> str:
        return self.meta["source"]

    def file(self, e: int, layer: int) -> Path:
        return self.path / f"expert{e:02d}-layer{layer:03d}.safetensors"

    def has(self, e: int, layer: int, source_digest: str) -> bool:
        return self.file(e, layer).is_file() and self.meta["digests"].get(f"{e}/{layer}") == source_digest

    def write(self, e: int, layer: int, factors: dict[str, Factorization], source_digest: str) -> None:
        tensors = {}
        for proj, f in factors.items():
            tensors.update({f"{proj}.U": f.U, f"{proj}.S": f.S, f"{proj}.Vh": f.Vh,
                            f"{proj}.energy": torch.tensor([f.energy], dtype=torch.float64)})
        methods = {proj: f.method for proj, f in factors.items()}
        tmp = self.file(e, layer).with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"methods": json.dumps(methods)})
        os.replace(tmp, self.file(e, layer))
        self.meta["digests"][f"{e}/{layer}"] = source_digest
        self._save_meta()

    def load(self, e: int, layer: int, parts: tuple[str, ...] = ("U", "S", "Vh")) -> dict[str, Factorization]:
        file = self.file(e, layer)
        if not file.is_file():
            raise FlexmoreError(f"{self.path}: SVD cache has no entry for expert {e}, layer {layer}")
        out = {}
        with safe_open(file, framework="pt") as f:
            methods = json.loads(f.metadata()["methods"])
            for proj in PROJECTIONS:
                get = {p: f.get_tensor(f"{proj}.{p}") if p in parts else torch.empty(0, 0) for p in ("U", "S", "Vh")}
                out[proj] = Factorization(get["U"], get["S"], get["Vh"], float(f.get_tensor(f"{proj}.energy")[0]),
                                          methods[proj])
        return out

    def spectrum(self, e: int, layers: int) -> Spectrum:
        squares, energy, complete = [], 0.0, True
        for layer in range(layers):
            for f in self.load(e, layer, parts=("S",)).values():
                squares.append(f.S.double().square())
                energy += f.energy
                complete &= f.method == "exact"
        return Spectrum(squares=squares, energy=energy, complete=complete)


def build_svd_cache(
    reader: CheckpointReader,
    config: FlexMoREConfig,
    cache_dir: Path,
    settings: SvdSettings,
    experts: list[int] | None = None,
    on_matrix: Callable[[str], None] | None = None,
) -> tuple[SvdCache, dict]:
    """Factorise every (expert, layer, projection) delta not already cached; returns the cache and timings."""
    cache = SvdCache.create_or_reuse(cache_dir, settings, reader.path, config.expert_names)
    experts = list(range(1, config.num_experts)) if experts is None else experts
    compute_dtype = getattr(torch, settings.compute_dtype)
    timings = {"svd_seconds": 0.0, "matrices": 0, "reused": 0, "per_expert_seconds": {}}
    for layer in range(config.num_hidden_layers):
        public = {p: read_matrix(reader, expert_key(layer, 0, p)) for p in PROJECTIONS}  # 3 matrices per layer
        for e in experts:
            weights = {p: expert_weight(reader, config, layer, e, p) for p in PROJECTIONS}
            source_digest = digest([*public.values(), *weights.values()])
            if cache.has(e, layer, source_digest):
                timings["reused"] += 3
                for p in PROJECTIONS:
                    on_matrix and on_matrix(f"{config.expert_names[e]} layer {layer} {p} (cached)")
                continue
            factors = {}
            for p in PROJECTIONS:
                delta = weights.pop(p).to(compute_dtype) - public[p].to(compute_dtype)  # [out, in]
                start = time.perf_counter()
                f = truncated_svd(delta.to(settings.device), settings.rank, settings.method, compute_dtype,
                                  settings.oversample, settings.power_iters, settings.seed)
                del delta
                f = Factorization(f.U.cpu(), f.S.cpu(), f.Vh.cpu(), f.energy, f.method)
                seconds = time.perf_counter() - start
                timings["svd_seconds"] += seconds
                timings["matrices"] += 1
                name = config.expert_names[e]
                timings["per_expert_seconds"][name] = timings["per_expert_seconds"].get(name, 0.0) + seconds
                factors[p] = f
                on_matrix and on_matrix(f"{config.expert_names[e]} layer {layer} {p}")
            cache.write(e, layer, factors, source_digest)
        del public
    return cache, timings


def assemble_checkpoint(
    reader: CheckpointReader,
    config: FlexMoREConfig,
    cache: SvdCache | None,
    out: Path,
    ranks: list[int],
    dtype: str | None = None,
    overwrite: bool = False,
    meta: dict | None = None,
    on_tensor: Callable[[str], None] | None = None,
    report: dict | None = None,
) -> FlexMoREConfig:
    """Write the FlexMoRE checkpoint with these ranks: low-rank experts from the cache, the rest from source."""
    target = mixture_config(config, list(range(config.num_experts)), ranks, None)
    out_dtype = getattr(torch, dtype) if dtype else None
    loaded: dict[tuple[int, int], dict[str, Factorization]] = {}

    def factors(e: int, layer: int) -> dict[str, Factorization]:
        if (e, layer) not in loaded:
            loaded.clear()  # one (expert, layer) at a time
            loaded[(e, layer)] = cache.load(e, layer)
        return loaded[(e, layer)]

    with CheckpointWriter(out, overwrite=overwrite) as writer:
        for name in expected_shapes(target):
            m = _EXPERT_KEY.match(name)
            if m is None:
                tensor = read_matrix(reader, name)
            else:
                layer, e, proj, part = int(m[1]), int(m[2]), m[3], m[4] or ""
                stored = reader.dtype(expert_key(layer, 0, proj))
                if ranks[e] == FULL:
                    tensor = expert_weight(reader, config, layer, e, proj)
                else:
                    b, a = factors(e, layer)[proj].factors(ranks[e])
                    tensor = b if part == "_b" else a
                tensor = tensor.to(_TORCH_DTYPES[stored])
            writer.add(name, tensor if out_dtype is None else tensor.to(out_dtype))
            on_tensor and on_tensor(name)
        if out_dtype is not None:
            target.dtype = dtype
        target.save_pretrained(writer.tmp)
        for file in reader.extra_files():
            writer.copy_file(file)
        if report is not None:
            writer.write_json("extraction_report.json", report)
        writer.commit(meta or {"operation": "extract"})
    return target


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class ExtractionResult:
    outputs: list[Path]
    ranks: dict[str, list[int]]  # output name -> ranks
    report: dict
    cache: Path | None
    timings: dict = field(default_factory=dict)


def extraction_report(config: FlexMoREConfig, cache: SvdCache | None, resolution: Resolution, requested: dict,
                      dtype: str) -> dict:
    """Per expert and matrix: rank, retained energy, relative Frobenius error; totals against all-full."""
    experts = []
    for e in range(1, config.num_experts):
        rank = resolution.ranks[e]
        row = {"index": e, "name": config.expert_names[e], "requested": str(requested.get(e, "full")),
               "rank": "full" if rank == FULL else rank, "note": resolution.notes.get(e), "matrices": []}
        if rank != FULL and cache is not None:
            kept, total = 0.0, 0.0
            for layer in range(config.num_hidden_layers):
                for proj, f in cache.load(e, layer, parts=("S",)).items():
                    row["matrices"].append({"layer": layer, "proj": proj, "method": f.method,
                                            "retained_energy": f.retained_energy(rank),
                                            "relative_error": f.relative_error(rank)})
                    kept += f.retained_energy(rank) * f.energy
                    total += f.energy
            row["retained_energy"] = kept / total if total > 0 else 1.0
            row["relative_error"] = max(0.0, 1 - row["retained_energy"]) ** 0.5
        else:
            row["retained_energy"], row["relative_error"] = 1.0, 0.0
        experts.append(row)
    count = count_parameters(config, resolution.ranks)
    size = dtype_bytes(dtype)
    return {
        "flexmore_version": __version__,
        "experts": experts,
        "expert_ranks": resolution.ranks,
        "parameters": count.total,
        "parameters_all_full": count.all_full_total,
        "dtype": dtype,
        "bytes": count.total * size,
        "bytes_all_full": count.all_full_total * size,
        "saving": 1 - count.total / count.all_full_total,
    }


def parse_sweep(text: str, max_rank: int) -> list[int]:
    """'1,2,4,full' -> [1, 2, 4, 0]; ranks must be >= 1."""
    out = []
    for item in text.split(","):
        policy = parse_policy(item, "--sweep")
        if not isinstance(policy, (Fixed, Full)):
            raise FlexmoreError(f"--sweep: {item.strip()!r}: a sweep lists ranks and 'full'")
        out.append(FULL if isinstance(policy, Full) else min(policy.rank, max_rank))
    return list(dict.fromkeys(out))


def extract(
    src: str | os.PathLike,
    out: str | os.PathLike,
    ranks: str | None = None,
    budget: str | None = None,
    sweep: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_only: bool = False,
    settings: SvdSettings | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> ExtractionResult:
    """PHLoRA extraction (see module docstring).

    Single mixture: `ranks` (spec of per-expert policies) and/or `budget` -> OUT is a FlexMoRE checkpoint;
    the cache defaults to a sibling `OUT.svd-cache`, removed after success unless `cache_dir` was given.
    Sweep: `sweep` ("1,2,4,full") -> OUT/svd-cache plus OUT/rank-{r} per rank (homogeneous mixtures),
    or only the cache with `cache_only`.
    """
    started = time.perf_counter()
    reader, config = open_checkpoint(src)
    if config.num_experts < 2:
        raise FlexmoreError(f"{reader.path}: has no domain expert to extract (num_experts = {config.num_experts})")
    out = Path(out)
    if dtype is not None:
        dtype_bytes(dtype, "--dtype")
    names = config.expert_names
    max_rank = config.max_rank
    if sweep is not None:
        if ranks is not None or budget is not None:
            raise FlexmoreError("--sweep: give either --sweep or --ranks/--budget, not both")
        sweep_ranks = parse_sweep(sweep, max_rank)
        policies: dict[int, Policy] = {}
        finite = [r for r in sweep_ranks if r != FULL]
        cache_rank = max(finite, default=1)
        if out.exists() and not out.is_dir():
            raise FlexmoreError(f"{out}: exists and is not a directory")
        cache_dir = Path(cache_dir) if cache_dir else out / "svd-cache"
    else:
        if ranks is None and budget is None:
            raise FlexmoreError("extract: give --ranks, --budget or --sweep")
        if out.exists() and not overwrite:
            raise FlexmoreError(f"{out}: already exists (pass --overwrite to replace it)")
        policies = parse_rank_spec(ranks, names, "--ranks", parse_value=parse_policy) if ranks else {}
        if budget is not None:
            parse_budget(budget)  # a bad budget fails before any SVD
        needs_spectrum = budget is not None or any(isinstance(p, Energy) for p in policies.values())
        even = break_even_rank(config.hidden_size, config.intermediate_size)
        fixed = [p.rank for p in policies.values() if isinstance(p, Fixed) and p.rank < even]
        cache_rank = break_even_rank(config.hidden_size, config.intermediate_size) if needs_spectrum else max(fixed, default=1)
        cache_rank = min(cache_rank, max_rank)
        default_cache = cache_dir is None
        cache_dir = Path(cache_dir) if cache_dir else out.parent / f"{out.name}.svd-cache"
    settings = settings or SvdSettings(rank=cache_rank)
    if settings.rank != cache_rank:
        settings = SvdSettings(**{**settings.__dict__, "rank": cache_rank})
    if sweep is None and budget is not None and settings.method == "randomized":
        raise FlexmoreError("--budget needs every singular value: use --method exact or auto")
    if out.exists() and not out.is_dir():
        raise FlexmoreError(f"{out}: exists and is not a directory")

    def factorised(e: int) -> bool:  # does expert e need its SVD? (not when it ends up full-size)
        if sweep is not None:
            return True
        policy = policies.get(e, Full())
        if isinstance(policy, Fixed):
            return policy.rank < break_even_rank(config.hidden_size, config.intermediate_size)
        return not isinstance(policy, Full) or (budget is not None and e not in policies)

    experts = [e for e in range(1, config.num_experts) if factorised(e)]
    cache, timings = (None, {})
    if experts:
        cache, timings = build_svd_cache(reader, config, cache_dir, settings, experts,
                                         on_matrix=on_step and (lambda m: on_step(f"svd {m}")))
    dtype_name = dtype or config.stored_dtype()
    outputs, chosen = [], {}
    if sweep is not None:
        report = {"sweep": [], "cache": str(cache_dir)}
        if not cache_only:
            out.mkdir(parents=True, exist_ok=True)
            for r in sweep_ranks:
                label = "full" if r == FULL else str(r)
                resolution = resolve_ranks({e: Full() if r == FULL else Fixed(r) for e in range(1, config.num_experts)},
                                           {}, config.num_experts, config.hidden_size, config.intermediate_size,
                                           config.num_hidden_layers)
                target = out / f"rank-{label}"
                rep = extraction_report(config, cache, resolution, {}, dtype_name)
                assemble_checkpoint(reader, config, cache, target, resolution.ranks, dtype, overwrite,
                                    meta={"operation": "extract --sweep", "source": str(src), "rank": label,
                                          "svd": settings.identity()}, report=rep)
                outputs.append(target)
                chosen[target.name] = resolution.ranks
                report["sweep"].append({"rank": label, "path": str(target), "parameters": rep["parameters"],
                                        "retained_energy": {x["name"]: x["retained_energy"] for x in rep["experts"]}})
                on_step and on_step(f"wrote {target}")
        report["timings"] = {**timings, "total_seconds": time.perf_counter() - started}
        return ExtractionResult(outputs, chosen, report, cache_dir, timings)

    report = resolve_and_assemble(reader, config, cache, out, policies, budget, dtype, overwrite,
                                  meta={"operation": "extract", "source": str(src), "ranks": ranks, "budget": budget},
                                  extra={"svd": settings.identity(), "timings": timings, "started": started})
    report["timings"]["total_seconds"] = time.perf_counter() - started  # in the returned report only
    resolution_ranks = report["expert_ranks"]
    if default_cache and cache is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return ExtractionResult([out], {out.name: resolution_ranks}, report, None if default_cache else cache_dir, timings)


def resolve_and_assemble(reader: CheckpointReader, config: FlexMoREConfig, cache: SvdCache | None, out: Path,
                         policies: dict[int, Policy], budget: str | None, dtype: str | None, overwrite: bool,
                         meta: dict, extra: dict | None = None) -> dict:
    """Choose every expert's rank (policies, budget) from the cached spectra, write OUT; returns the report.

    `extra` goes into the report: `svd` settings, `timings` of the SVD phase and `started` (perf_counter).
    """
    budget_params = parse_budget(budget) if budget is not None else None
    open_for_budget = [e for e in range(1, config.num_experts) if budget is not None and e not in policies]
    base = count_parameters(config, [FULL] + [1] * (config.num_experts - 1))
    spectra = {e: cache.spectrum(e, config.num_hidden_layers) for e in range(1, config.num_experts)
               if isinstance(policies.get(e), Energy) or e in open_for_budget}
    resolution = resolve_ranks(policies, spectra, config.num_experts, config.hidden_size, config.intermediate_size,
                               config.num_hidden_layers, budget_params, base.shared + base.router + base.experts[0])
    report = extraction_report(config, cache, resolution, policies, dtype or config.stored_dtype())
    extra = dict(extra or {})
    started = extra.pop("started", None)
    report.update(extra)
    if started is not None:  # everything but writing the checkpoint itself
        report["timings"] = {**report.get("timings", {}), "seconds_before_writing": time.perf_counter() - started}
    meta = {**meta, "expert_ranks": resolution.ranks, "expert_names": config.expert_names}
    assemble_checkpoint(reader, config, cache, out, resolution.ranks, dtype, overwrite, meta=meta, report=report)
    return report


def assemble_from_cache(cache_dir: str | os.PathLike, out: str | os.PathLike, ranks: str | None = None,
                        budget: str | None = None, dtype: str | None = None, overwrite: bool = False) -> dict:
    """A FlexMoRE checkpoint with any mixture of ranks from an existing SVD cache, without another SVD."""
    cache = SvdCache.open(cache_dir)
    reader, config = open_checkpoint(cache.source)
    if ranks is None and budget is None:
        raise FlexmoreError("assemble: give --ranks or --budget")
    policies = parse_rank_spec(ranks, config.expert_names, "--ranks", parse_value=parse_policy) if ranks else {}
    kept = cache.meta["settings"]["rank"]
    for e, p in policies.items():
        if isinstance(p, Fixed) and p.rank > kept and p.rank < break_even_rank(config.hidden_size, config.intermediate_size):
            raise FlexmoreError(f"--ranks: rank {p.rank} for {config.expert_names[e]!r} exceeds the {kept} singular "
                                f"vectors kept in {cache.path}")
    for e in range(1, config.num_experts):
        needed = isinstance(policies.get(e, Full()), (Fixed, Energy)) or (budget is not None and e not in policies)
        if needed and not all(cache.file(e, layer).is_file() for layer in range(config.num_hidden_layers)):
            raise FlexmoreError(f"{cache.path}: the cache has no factors of expert {config.expert_names[e]!r}")
    return resolve_and_assemble(reader, config, cache, Path(out), policies, budget, dtype, overwrite,
                                meta={"operation": "assemble", "cache": str(cache.path), "ranks": ranks,
                                      "budget": budget})
