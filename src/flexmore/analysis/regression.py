"""How utility depends on rank: quadratic fits in L = log2(rank) with expert fixed effects.

Works on the 2-expert "pair" rows (public + one expert at one rank, k = 2), one observation per expert,
group and finite rank: the group-mean utility (peaks.rank_curves). Full-size rows are left out (they
have no log2 rank).

    fits = fit_groups(df)             # per group: utility ~ L + I(L ** 2) + C(expert)
    pooled = fit_pooled(df)           # one model, a quadratic per group, shared expert effects
    contrast = fit_kind_contrast(df)  # do reasoning-heavy groups peak at higher rank?
    report = rank_regression(df)      # all three; report.to_dict() is JSON-ready

The fitted optimum of a + b1 L + b2 L^2 is the vertex L* = -b1 / (2 b2), a maximum only when b2 < 0;
a bootstrap (rows resampled within the group, seeded) gives a percentile interval for L*.

Group kinds ("knowledge" / "reasoning") come from the benchmark-group registry (eval/groups.py); groups
it does not know (local task groups) need an explicit `kinds` mapping. statsmodels is imported when a
model is fitted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import FlexmoreError
from ..eval.groups import GROUPS, KINDS
from .peaks import _plain, rank_curves

MIN_RANKS = 3  # distinct finite ranks a quadratic in log2(rank) needs
GROUP_FORMULA = "utility ~ L + I(L ** 2) + C(expert)"
POOLED_FORMULA = "utility ~ C(group) + C(group):L + C(group):I(L ** 2) + C(expert)"
POOLED_RESTRICTED = "utility ~ C(group) + L + I(L ** 2) + C(expert)"
CONTRAST_FORMULA = "utility ~ C(group) + C(expert) + L + I(L ** 2) + L:reasoning + I(L ** 2):reasoning"
_L, _L2 = "L", "I(L ** 2)"


# --- results ----------------------------------------------------------------------------------------


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: nested results become dicts, tuples lists, NaN None."""
        return _jsonable(self)


@dataclass
class Coefficient(_Serializable):
    """One estimate with its confidence interval (level 1 - alpha) and two-sided p-value."""

    estimate: float
    low: float
    high: float
    p_value: float


@dataclass
class VertexBootstrap(_Serializable):
    """Percentile interval for the vertex L* over bootstrap refits (rows resampled with replacement)."""

    draws: int  # refits attempted (B)
    kept: int  # refits with b2 < 0, whose vertex enters the interval
    dropped: int  # refits with b2 >= 0: no maximum, left out
    degenerate: int  # resamples where L and L^2 were not identifiable (too few distinct ranks)
    seed: int
    low: float | None  # log2 rank; None when no refit was kept
    high: float | None


@dataclass
class GroupFit(_Serializable):
    """utility ~ L + I(L ** 2) + C(expert) on one group's group-mean utilities (finite ranks)."""

    group: str
    n: int  # observations: expert x finite rank
    n_experts: int
    ranks: tuple[int, ...]  # the distinct finite ranks
    linear: Coefficient  # b1, coefficient of L
    quadratic: Coefficient  # b2, coefficient of L^2
    r_squared: float
    vertex_log2: float | None  # L* = -b1 / (2 b2) when b2 < 0, else None
    vertex_rank: float | None  # 2 ** L*
    vertex_in_range: bool | None  # L* within the swept ranks (else it is an extrapolation)
    optimum: str  # one line: where the fitted optimum is, or "no interior optimum ..."
    bootstrap: VertexBootstrap
    formula: str = GROUP_FORMULA


@dataclass
class PooledGroupCurve(_Serializable):
    """One group's quadratic inside the pooled model."""

    group: str
    kind: str
    linear: Coefficient
    quadratic: Coefficient
    vertex_log2: float | None


@dataclass
class PooledFit(_Serializable):
    """A quadratic in L per group, group and expert fixed effects, fitted jointly.

    The F test compares it with one quadratic shared by all groups (POOLED_RESTRICTED): a small p
    says the groups' rank curves differ.
    """

    n: int
    r_squared: float
    curves: list[PooledGroupCurve]
    interaction_f: float
    interaction_df: tuple[int, int]  # (numerator, denominator) degrees of freedom
    interaction_p: float
    formula: str = POOLED_FORMULA


@dataclass
class KindContrast(_Serializable):
    """Do reasoning-heavy groups peak at a higher rank than knowledge-heavy ones?

    CONTRAST_FORMULA with reasoning = 1 for reasoning groups: knowledge groups follow b1 L + b2 L^2,
    reasoning groups (b1 + c1) L + (b2 + c2) L^2; c1 is the L:reasoning coefficient.
    """

    n: int
    kinds: dict[str, str]  # group -> kind as used
    linear_reasoning: Coefficient  # c1, L:reasoning
    quadratic_reasoning: Coefficient  # c2, I(L ** 2):reasoning
    vertex_knowledge: float | None  # log2 rank; None without a maximum (curvature >= 0)
    vertex_reasoning: float | None
    vertex_difference: Coefficient | None  # reasoning - knowledge, delta method
    verdict: str
    formula: str = CONTRAST_FORMULA


@dataclass
class RegressionReport(_Serializable):
    groups: list[GroupFit]
    pooled: PooledFit | None  # None with a single group
    contrast: KindContrast | None  # None unless both kinds are present
    kinds: dict[str, str]
    alpha: float
    notes: list[str] = field(default_factory=list)


# --- the data ---------------------------------------------------------------------------------------


def regression_table(df: pd.DataFrame, groups: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per expert, group and finite rank: expert, group, rank, L = log2(rank), utility."""
    curves = rank_curves(df, include_full=False, groups=groups, avg=False)
    table = curves.rename(columns={"log2_rank": "L"})[["expert", "group", "rank", "L", "utility"]]
    return table.astype({"expert": str, "group": str}).reset_index(drop=True)


def resolve_kinds(groups: Sequence[str], kinds: Mapping[str, str] | None = None) -> dict[str, str]:
    """group -> "knowledge" | "reasoning": `kinds` first, then the registry (case-insensitive).

    A group found in neither is an error listing every such group.
    """
    given = dict(kinds or {})
    bad = {g: k for g, k in given.items() if k not in KINDS}
    if bad:
        shown = ", ".join(f"{g}: {k!r}" for g, k in bad.items())
        raise FlexmoreError(f"group kinds must be one of {', '.join(KINDS)}; got {shown}")
    registry = {name.lower(): g.kind for name, g in GROUPS.items()}
    resolved, unknown = {}, []
    for group in groups:
        if group in given:
            resolved[group] = given[group]
        elif group.lower() in registry:
            resolved[group] = registry[group.lower()]
        else:
            unknown.append(group)
    if unknown:
        raise FlexmoreError(
            f"no kind (knowledge or reasoning) for group(s) {', '.join(unknown)}: not registered benchmark "
            f"groups; give them one, e.g. kinds={{{unknown[0]!r}: 'reasoning'}}"
        )
    return resolved


# --- the fits ---------------------------------------------------------------------------------------


def fit_groups(
    df: pd.DataFrame,
    groups: Sequence[str] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[GroupFit]:
    """Per group: utility ~ L + I(L ** 2) + C(expert), the vertex, and its bootstrap interval."""
    _check_alpha(alpha)
    table = regression_table(df, groups)
    return [_fit_group(table[table["group"] == g], g, bootstrap, seed, alpha) for g in pd.unique(table["group"])]


def fit_pooled(
    df: pd.DataFrame,
    kinds: Mapping[str, str] | None = None,
    groups: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> PooledFit:
    """All groups in one model: a quadratic in L per group plus group and expert fixed effects."""
    _check_alpha(alpha)
    table = regression_table(df, groups)
    return _fit_pooled(table, resolve_kinds(list(pd.unique(table["group"])), kinds), alpha)


def fit_kind_contrast(
    df: pd.DataFrame,
    kinds: Mapping[str, str] | None = None,
    groups: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> KindContrast:
    """Test whether reasoning-heavy groups peak at a higher rank than knowledge-heavy ones."""
    _check_alpha(alpha)
    table = regression_table(df, groups)
    return _fit_contrast(table, resolve_kinds(list(pd.unique(table["group"])), kinds), alpha)


def rank_regression(
    df: pd.DataFrame,
    kinds: Mapping[str, str] | None = None,
    groups: Sequence[str] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> RegressionReport:
    """Per-group fits, the pooled model and the kind contrast (when both kinds are present)."""
    _check_alpha(alpha)
    table = regression_table(df, groups)
    names = list(pd.unique(table["group"]))
    resolved = resolve_kinds(names, kinds)
    fits = [_fit_group(table[table["group"] == g], g, bootstrap, seed, alpha) for g in names]
    notes = []
    pooled = _fit_pooled(table, resolved, alpha) if len(names) > 1 else None
    if pooled is None:
        notes.append("one group only: no pooled model")
    present = sorted(set(resolved.values()))
    contrast = _fit_contrast(table, resolved, alpha) if len(present) == 2 else None
    if contrast is None:
        notes.append(f"only {present[0]} groups: no reasoning vs knowledge contrast")
    return RegressionReport(groups=fits, pooled=pooled, contrast=contrast, kinds=resolved, alpha=alpha, notes=notes)


def _fit_group(table: pd.DataFrame, group: str, bootstrap: int, seed: int, alpha: float) -> GroupFit:
    _check_ranks(table, group)
    if bootstrap < 0:
        raise FlexmoreError(f"bootstrap must be a number of draws >= 0, got {bootstrap}")
    result = _ols(GROUP_FORMULA, table, f"group {group}")
    linear, quadratic = _coefficient(result, _L, alpha), _coefficient(result, _L2, alpha)
    vertex = _vertex(linear.estimate, quadratic.estimate)
    ranks = tuple(sorted(int(r) for r in pd.unique(table["rank"])))
    low, high = math.log2(ranks[0]), math.log2(ranks[-1])
    in_range = None if vertex is None else bool(low <= vertex <= high)
    if vertex is None:
        optimum = f"no interior optimum (L^2 coefficient {quadratic.estimate:+.3g} >= 0)"
    else:
        optimum = f"optimum at log2 rank {vertex:.2f} (rank ~{2 ** vertex:.4g})"
        if not in_range:
            optimum += f", outside the swept ranks {ranks[0]}..{ranks[-1]} (an extrapolation)"
    return GroupFit(
        group=group, n=len(table), n_experts=table["expert"].nunique(), ranks=ranks, linear=linear,
        quadratic=quadratic, r_squared=float(result.rsquared), vertex_log2=vertex,
        vertex_rank=None if vertex is None else float(2.0 ** vertex), vertex_in_range=in_range, optimum=optimum,
        bootstrap=_bootstrap_vertex(result, bootstrap, seed, alpha),
    )


def _fit_pooled(table: pd.DataFrame, kinds: dict[str, str], alpha: float) -> PooledFit:
    names = list(pd.unique(table["group"]))
    if len(names) < 2:
        raise FlexmoreError("the pooled model needs at least two groups")
    for group in names:
        _check_ranks(table[table["group"] == group], group)
    full = _ols(POOLED_FORMULA, table, "the pooled model")
    restricted = _ols(POOLED_RESTRICTED, table, "the pooled model")
    f_value, p_value, df_diff = full.compare_f_test(restricted)
    curves = []
    for group in names:
        linear = _coefficient(full, f"C(group)[{group}]:{_L}", alpha)
        quadratic = _coefficient(full, f"C(group)[{group}]:{_L2}", alpha)
        curves.append(PooledGroupCurve(group=group, kind=kinds[group], linear=linear, quadratic=quadratic,
                                       vertex_log2=_vertex(linear.estimate, quadratic.estimate)))
    return PooledFit(n=len(table), r_squared=float(full.rsquared), curves=curves, interaction_f=float(f_value),
                     interaction_df=(int(df_diff), int(full.df_resid)), interaction_p=float(p_value))


def _fit_contrast(table: pd.DataFrame, kinds: dict[str, str], alpha: float) -> KindContrast:
    names = list(pd.unique(table["group"]))
    by_kind = {kind: [g for g in names if kinds[g] == kind] for kind in KINDS}
    lacking = [kind for kind, members in by_kind.items() if not members]
    if lacking:
        raise FlexmoreError(f"the reasoning vs knowledge contrast needs both kinds; no {lacking[0]} group "
                            f"among {', '.join(names)}")
    for group in names:
        _check_ranks(table[table["group"] == group], group)
    data = table.assign(reasoning=[1.0 if kinds[g] == "reasoning" else 0.0 for g in table["group"]])
    result = _ols(CONTRAST_FORMULA, data, "the reasoning vs knowledge contrast")
    c1 = _coefficient(result, f"{_L}:reasoning", alpha)
    c2 = _coefficient(result, f"{_L2}:reasoning", alpha)
    b1, b2 = float(result.params[_L]), float(result.params[_L2])
    vk = _vertex(b1, b2)
    vr = _vertex(b1 + c1.estimate, b2 + c2.estimate)
    difference = None
    if vk is not None and vr is not None:
        # delta method for vr - vk, a function of (b1, b2, c1, c2)
        names_ = [_L, _L2, f"{_L}:reasoning", f"{_L2}:reasoning"]
        cov = result.cov_params().loc[names_, names_].to_numpy()
        sr, sk = b2 + c2.estimate, b2
        g_vr = np.array([-1 / (2 * sr), (b1 + c1.estimate) / (2 * sr ** 2)])
        g_vk = np.array([-1 / (2 * sk), b1 / (2 * sk ** 2)])
        grad = np.concatenate([g_vr - g_vk, g_vr])
        difference = _wald(vr - vk, float(np.sqrt(max(grad @ cov @ grad, 0.0))), result.df_resid, alpha)
    return KindContrast(
        n=len(data), kinds={g: kinds[g] for g in names}, linear_reasoning=c1, quadratic_reasoning=c2,
        vertex_knowledge=vk, vertex_reasoning=vr, vertex_difference=difference,
        verdict=_verdict(c1, vk, vr, alpha),
    )


def _verdict(c1: Coefficient, vk: float | None, vr: float | None, alpha: float) -> str:
    test = f"L:reasoning = {c1.estimate:+.3g} [{c1.low:+.3g}, {c1.high:+.3g}], p = {c1.p_value:.2g}"
    if c1.p_value >= alpha:
        return f"no evidence at alpha = {alpha:g} that the peak rank differs by group kind ({test})"
    if vk is None or vr is None:
        missing = " and ".join(k for k, v in (("knowledge", vk), ("reasoning", vr)) if v is None)
        return f"inconclusive: {test}, but the {missing} curve has no interior maximum"
    vertices = f"vertices log2 rank {vr:.2f} (reasoning) vs {vk:.2f} (knowledge)"
    if c1.estimate > 0 and vr > vk:
        return f"reasoning-heavy groups peak at a higher rank than knowledge-heavy ones: {vertices}; {test}"
    if c1.estimate < 0 and vr < vk:
        return f"knowledge-heavy groups peak at a higher rank than reasoning-heavy ones: {vertices}; {test}"
    return f"inconclusive: {test}, but the curvatures differ and the {vertices}"


# --- helpers ----------------------------------------------------------------------------------------


def _statsmodels():
    try:
        import statsmodels.formula.api as smf
    except ImportError as error:
        raise FlexmoreError("the rank regression needs statsmodels: pip install statsmodels") from error
    return smf


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise FlexmoreError(f"alpha must lie in (0, 1), got {alpha}")


def _check_ranks(table: pd.DataFrame, group: str) -> None:
    ranks = sorted(int(r) for r in pd.unique(table["rank"]))
    if len(ranks) < MIN_RANKS:
        shown = ", ".join(map(str, ranks)) or "none"
        raise FlexmoreError(f"group {group}: a quadratic in log2(rank) needs at least {MIN_RANKS} distinct finite "
                            f"ranks, got {len(ranks)} ({shown})")


def _ols(formula: str, data: pd.DataFrame, what: str):
    """Fit with statsmodels after checking the design: full column rank and residual degrees of freedom
    (statsmodels would otherwise return a pseudo-inverse fit or NaN intervals without a word)."""
    model = _statsmodels().ols(formula, data)
    exog = model.exog
    rank = np.linalg.matrix_rank(exog)
    if rank < exog.shape[1]:
        raise FlexmoreError(f"{what}: the design is singular ({exog.shape[1]} terms, rank {rank}); the ranks "
                            "swept per expert do not separate the L terms from the expert effects")
    if exog.shape[0] <= exog.shape[1]:
        raise FlexmoreError(f"{what}: {exog.shape[0]} observations for {exog.shape[1]} terms; no residual degrees "
                            "of freedom for intervals (sweep more ranks or experts)")
    return model.fit()


def _coefficient(result, name: str, alpha: float) -> Coefficient:
    low, high = result.conf_int(alpha=alpha).loc[name]
    return Coefficient(estimate=float(result.params[name]), low=float(low), high=float(high),
                       p_value=float(result.pvalues[name]))


def _wald(estimate: float, se: float, df_resid: float, alpha: float) -> Coefficient:
    from scipy import stats  # statsmodels depends on scipy

    if se == 0:
        return Coefficient(estimate=estimate, low=estimate, high=estimate, p_value=0.0 if estimate else 1.0)
    t = stats.t.ppf(1 - alpha / 2, df_resid)
    p = 2 * stats.t.sf(abs(estimate / se), df_resid)
    return Coefficient(estimate=estimate, low=estimate - t * se, high=estimate + t * se, p_value=float(p))


def _vertex(b1: float, b2: float) -> float | None:
    return float(-b1 / (2 * b2)) if b2 < 0 else None


def _bootstrap_vertex(result, draws: int, seed: int, alpha: float) -> VertexBootstrap:
    """Refit on `draws` resamples of the rows (least squares on the same design matrix, fast)."""
    x, y = np.asarray(result.model.exog), np.asarray(result.model.endog)
    names = list(result.model.exog_names)
    i1, i2 = names.index(_L), names.index(_L2)
    others = [i for i in range(x.shape[1]) if i not in (i1, i2)]
    rng = np.random.default_rng(seed)
    vertices, dropped, degenerate = [], 0, 0
    for _ in range(draws):
        rows = rng.integers(0, len(y), len(y))
        xb, yb = x[rows], y[rows]
        # b1, b2 are identified (unique in every least-squares solution) iff the L columns add 2 to the rank,
        # even when a resample loses an expert and its dummy column is all zero.
        if np.linalg.matrix_rank(xb) - np.linalg.matrix_rank(xb[:, others]) < 2:
            degenerate += 1
            continue
        coef = np.linalg.lstsq(xb, yb, rcond=None)[0]
        if coef[i2] >= 0:
            dropped += 1
            continue
        vertices.append(-coef[i1] / (2 * coef[i2]))
    low = high = None
    if vertices:
        low, high = (float(v) for v in np.percentile(vertices, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return VertexBootstrap(draws=draws, kept=len(vertices), dropped=dropped, degenerate=degenerate, seed=seed,
                           low=low, high=high)


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return _plain(value)
