"""Rank policies: how each domain expert's rank is chosen from its spectrum.

Per expert (in `--ranks`):   64 | full | energy:0.9
Across experts (`--budget`): the experts the spec leaves open share a parameter budget.

Energy of an expert is pooled over all its matrices (every layer's gate/up/down): one rank per expert,
as the checkpoint format and the paper have it.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field

import torch

from ..config import FULL, break_even_rank
from ..errors import FlexmoreError


@dataclass(frozen=True)
class Fixed:
    rank: int

    def __str__(self) -> str:
        return str(self.rank)


@dataclass(frozen=True)
class Full:
    def __str__(self) -> str:
        return "full"


@dataclass(frozen=True)
class Energy:
    fraction: float  # keep the smallest rank retaining this fraction of the delta's squared Frobenius norm

    def __str__(self) -> str:
        return f"energy:{self.fraction:g}"


@dataclass(frozen=True)
class Budget:
    def __str__(self) -> str:
        return "budget"


Policy = Fixed | Full | Energy | Budget

_ENERGY = re.compile(r"^energy:(.+)$")


def parse_policy(text: str, where: str) -> Policy:
    """One value of an extraction rank spec: a rank >= 1, 'full', or 'energy:F' with 0 < F <= 1."""
    text = text.strip().lower()
    if text == "full":
        return Full()
    if m := _ENERGY.match(text):
        try:
            fraction = float(m[1])
        except ValueError:
            raise FlexmoreError(f"{where}: energy {m[1]!r} is not a number") from None
        if not 0 < fraction <= 1:
            raise FlexmoreError(f"{where}: energy {fraction:g} must be in (0, 1]")
        return Energy(fraction)
    if re.fullmatch(r"-?\d+", text):
        rank = int(text)
        if rank <= 0:
            raise FlexmoreError(f"{where}: rank {rank} must be at least 1 (write 'full' for a full-size expert)")
        return Fixed(rank)
    raise FlexmoreError(f"{where}: {text!r} is not a rank, 'full' or 'energy:F'")


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_budget(text: str, option: str = "--budget") -> int:
    """Parameter count such as 10.75B, 500M, 3e9."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m:
        raise FlexmoreError(f"{option}: {text!r} is not a parameter count (e.g. 10.75B, 500M, 3e9)")
    return int(float(m[1]) * _UNITS[m[2]])


@dataclass
class Spectrum:
    """Squared singular values of all matrices of one expert, for choosing its rank."""

    squares: list[torch.Tensor]  # per matrix: S^2, descending (all of them for exact SVD, top q otherwise)
    energy: float  # sum over matrices of ||D||_F^2
    complete: bool  # every singular value known (exact SVD)

    def max_known_rank(self) -> int:
        return min(len(s) for s in self.squares)

    def retained(self, rank: int) -> float:
        if self.energy <= 0:
            return 1.0
        return min(1.0, sum(float(s[:rank].sum()) for s in self.squares) / self.energy)

    def gains(self) -> torch.Tensor:
        """gains[r] = retained(r + 1) - retained(r): non-increasing, so greedy allocation is exact."""
        n = self.max_known_rank()
        total = torch.stack([s[:n].double() for s in self.squares]).sum(0)
        return total / self.energy if self.energy > 0 else torch.zeros(n, dtype=torch.float64)


@dataclass
class Resolution:
    ranks: list[int]  # per expert, 0 = full-size
    notes: dict[int, str] = field(default_factory=dict)  # expert -> why its rank differs from the request


def resolve_ranks(
    policies: dict[int, Policy],
    spectra: dict[int, Spectrum],
    num_experts: int,
    hidden: int,
    intermediate: int,
    layers: int,
    budget: int | None = None,
    base_parameters: int = 0,
) -> Resolution:
    """Turn per-expert policies (experts not named are full-size, or share `budget` when one is given)
    into ranks; caps ranks at min(hidden, intermediate) and stores experts at or above the break-even
    rank full-size, saying so in `notes`.

    `base_parameters`: what the mixture costs apart from its domain experts (shared weights, routers,
    the public expert), for the budget.
    """
    max_rank = min(hidden, intermediate)
    even = break_even_rank(hidden, intermediate)
    unit = 3 * (hidden + intermediate) * layers  # parameters per unit of rank of one expert
    full_cost = 3 * hidden * intermediate * layers
    ranks = [FULL] * num_experts
    notes: dict[int, str] = {}
    open_experts = []
    for e in range(1, num_experts):
        policy = policies.get(e, Budget() if budget is not None else Full())
        if isinstance(policy, Full):
            ranks[e] = FULL
        elif isinstance(policy, Fixed):
            ranks[e] = policy.rank
        elif isinstance(policy, Energy):
            ranks[e] = energy_rank(spectra[e], policy.fraction, e)
        else:
            open_experts.append(e)
    if budget is not None:
        if not open_experts:
            raise FlexmoreError("--budget: every expert already has a rank in --ranks; nothing left to choose")
        fixed_cost = sum(full_cost if r == FULL else unit * min(r, max_rank) for e, r in enumerate(ranks)
                         if e > 0 and e not in open_experts)
        units = (budget - base_parameters - fixed_cost) // unit
        if units < len(open_experts):
            need = base_parameters + fixed_cost + unit * len(open_experts)
            raise FlexmoreError(f"--budget: {budget:,} parameters is too small; rank 1 for every open expert needs {need:,}")
        for e, r in allocate_budget({e: spectra[e] for e in open_experts}, units, cap=even).items():
            ranks[e] = r
    for e in range(1, num_experts):
        r = ranks[e]
        if r == FULL:
            continue
        if r > max_rank:
            notes[e] = f"rank {r} capped at min(hidden, intermediate) = {max_rank}"
            r = max_rank
        if r >= even:
            notes[e] = (notes.get(e, f"rank {r}") + f" is at or above the break-even rank {even}: stored full-size")
            r = FULL
        ranks[e] = r
    return Resolution(ranks=ranks, notes=notes)


def energy_rank(spectrum: Spectrum, fraction: float, expert: int) -> int:
    """Smallest rank whose pooled retained energy reaches `fraction`."""
    cumulative = torch.cumsum(spectrum.gains(), 0)
    hits = (cumulative >= fraction - 1e-12).nonzero()
    if len(hits):
        return int(hits[0]) + 1
    if spectrum.complete:
        return spectrum.max_known_rank()
    raise FlexmoreError(
        f"energy:{fraction:g} for expert {expert}: not reached within the {spectrum.max_known_rank()} singular values "
        "of a randomized SVD; use --method exact"
    )


def allocate_budget(spectra: dict[int, Spectrum], units: int, cap: int) -> dict[int, int]:
    """Ranks (>= 1 each, sum <= units) maximising the summed retained energy.

    Each expert's retained energy is concave in its rank (singular values are sorted), and every unit of
    rank costs the same, so taking the largest marginal gain first is optimal, not just a heuristic.
    """
    gains = {e: s.gains() for e, s in spectra.items()}
    ranks = {e: 1 for e in spectra}
    left = units - len(spectra)
    heap = [(-float(g[1]), e) for e, g in gains.items() if len(g) > 1 and cap > 1]
    heapq.heapify(heap)
    while left > 0 and heap:
        neg_gain, e = heapq.heappop(heap)
        if -neg_gain <= 0:
            break
        ranks[e] += 1
        left -= 1
        r = ranks[e]
        if r < len(gains[e]) and r < cap:
            heapq.heappush(heap, (-float(gains[e][r]), e))
    return ranks
