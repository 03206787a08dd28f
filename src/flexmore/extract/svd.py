"""Truncated SVD of an expert's delta D = W_expert - W_public (pure functions, no I/O).

PHLoRA splits the top-`rank` part symmetrically (REFERENCE §4), without any alpha/rank scaling:
    B = U_r sqrt(S_r)   [out, rank]        A = sqrt(S_r) V_r^T   [rank, in]
so that B A = U_r S_r V_r^T, the best rank-r approximation of D in Frobenius norm (Eckart-Young).

Two ways to get U, S, V:
  exact       thin LAPACK SVD (fp32 or fp64): every singular value, slow on large matrices;
  randomized  Halko et al. via `torch.svd_lowrank` with oversampling and power iterations, seeded:
              only the top q singular triplets, 10-100x faster for small ranks.
For both, U_r S_r V_r^T is the orthogonal projection of D onto span(U_r), so the residual satisfies
||D - B A||_F^2 = ||D||_F^2 - sum(S_r^2), which gives the error of every rank without another matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("auto", "exact", "randomized")
# Above this rank (or a quarter of the smaller side) randomized SVD stops paying off: use exact.
RANDOMIZED_MAX_RANK = 256


@dataclass
class Factorization:
    """Top singular triplets of a delta, plus what is needed to judge any truncation of it."""

    U: torch.Tensor  # [out, q]
    S: torch.Tensor  # [q] or longer: exact SVD keeps every singular value, U/V only the top q columns
    Vh: torch.Tensor  # [q, in]
    energy: float  # ||D||_F^2
    method: str

    @property
    def max_rank(self) -> int:
        return self.U.shape[1]

    def factors(self, rank: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, rank], A [rank, in]) with the symmetric split."""
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the {self.max_rank} singular vectors kept")
        root = self.S[:rank].sqrt()
        b = self.U[:, :rank] * root  # [out, r]
        a = root[:, None] * self.Vh[:rank]  # [r, in]
        return (b, a) if dtype is None else (b.to(dtype), a.to(dtype))

    def retained_energy(self, rank: int) -> float:
        """Fraction of ||D||_F^2 kept by the rank-`rank` truncation (1.0 for a zero delta)."""
        if self.energy <= 0:
            return 1.0
        return min(1.0, float(self.S[:rank].double().square().sum()) / self.energy)

    def relative_error(self, rank: int) -> float:
        """||D - B A||_F / ||D||_F."""
        return max(0.0, 1.0 - self.retained_energy(rank)) ** 0.5


def choose_method(rank: int, shape: tuple[int, int], method: str = "auto") -> str:
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r}; expected one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    return "randomized" if rank <= min(RANDOMIZED_MAX_RANK, min(shape) // 4) else "exact"


def default_oversample(rank: int, oversample: int | None = None) -> int:
    return max(10, rank // 4) if oversample is None else oversample


def truncated_svd(
    delta: torch.Tensor,
    rank: int,
    method: str = "auto",
    compute_dtype: torch.dtype = torch.float32,
    oversample: int | None = None,
    power_iters: int = 2,
    seed: int = 0,
) -> Factorization:
    """Top-`rank` SVD of `delta` (upcast to `compute_dtype`, on delta's device); U, S, Vh come back in fp32.

    `oversample` defaults to max(10, rank / 4): a fixed 10 falls short of 1% excess error by rank 256
    on slowly decaying spectra (bench/extract.py), a quarter of the rank keeps it well inside.
    """
    d = delta.to(compute_dtype)
    rank = min(rank, min(d.shape))
    energy = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    chosen = choose_method(rank, tuple(d.shape), method)
    if chosen == "exact":
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        u, vh = u[:, :rank], vh[:rank]
    else:
        q = min(rank + default_oversample(rank, oversample), min(d.shape))
        devices = [d.device] if d.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # reproducible, and the caller's RNG stream untouched
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(d, q=q, niter=power_iters)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    return Factorization(
        U=u.float().contiguous(), S=s.float().contiguous(), Vh=vh.float().contiguous(), energy=energy, method=chosen
    )
