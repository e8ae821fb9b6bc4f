"""Paired differences with bootstrap confidence intervals: every method runs on the same samples as exact
attention, so a comparison is the per-sample difference of two score columns.

    from kvdiag.study.paired import paired_difference, paired_scores, needed_n
    a, b = paired_scores(results, ("shadowkv", 0.015625), ("exact", 1.0))   # aligned by sample id
    diff = paired_difference(a, b)        # mean of a − b and its 95 % interval
    needed_n(diff, threshold=-5.0)        # samples for the interval to exclude -5 at this mean

The interval is `scipy.stats.bootstrap` on the pair (a, b) with `paired=True` and the statistic
mean(a − b): BCa (bias-corrected and accelerated), 9 999 resamples, 95 %, seeded (`SEED`). Where BCa
is undefined (e.g. n = 2, or a jackknife with no spread) the percentile interval of the same resamples
is used instead, and `interval` says which. Special cases: n < 2 has no interval (NaN bounds,
`interval` "none"); differences that are all equal have the zero-width interval [d, d] ("exact": every
resample gives d).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pandas as pd

from kvdiag.errors import KvdiagError

CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mean(a − b) over n paired samples with its interval [low, high] (NaN when n < 2)."""

    n: int
    mean: float
    low: float
    high: float
    interval: str  # "BCa", "percentile", "exact" (all differences equal) or "none" (n < 2)
    a_mean: float
    b_mean: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def above(self, threshold: float) -> bool:
        """The whole interval lies above `threshold` (False without an interval)."""
        return self.interval != "none" and self.low > threshold

    def below(self, threshold: float) -> bool:
        """The whole interval lies below `threshold` (False without an interval)."""
        return self.interval != "none" and self.high < threshold

    def text(self) -> str:
        """ "−12.3 [−18.0, −6.1] (n = 20)", or "−12.3 (n = 1, no interval)"."""
        if self.interval == "none":
            return f"{self.mean:+.1f} (n = {self.n}, no interval)"
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}] (n = {self.n})"

    def to_json(self) -> dict:
        nan_to_none = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in dataclasses.asdict(self).items()}  # fmt: skip
        return {"n": nan_to_none["n"], "mean_difference": nan_to_none["mean"], "ci_low": nan_to_none["low"],
                "ci_high": nan_to_none["high"], "interval": self.interval, "mean_a": nan_to_none["a_mean"],
                "mean_b": nan_to_none["b_mean"]}  # fmt: skip


def _mean_difference(a, b, axis=-1):
    return np.mean(a - b, axis=axis)


def paired_difference(a, b, seed: int = SEED, confidence: float = CONFIDENCE,
                      n_resamples: int = N_RESAMPLES) -> PairedDifference:  # fmt: skip
    """mean(a − b) of two equally long score arrays paired by position, with its bootstrap interval
    (see the module docstring). Pairs with a NaN on either side are left out."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise KvdiagError(
            f"paired scores need two 1-d arrays of one length, got shapes {a.shape} and {b.shape}"
        )
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = len(a)
    if n == 0:
        nan = float("nan")
        return PairedDifference(0, nan, nan, nan, "none", nan, nan)
    d = a - b
    mean, a_mean, b_mean = float(d.mean()), float(a.mean()), float(b.mean())
    if n < 2:
        return PairedDifference(n, mean, float("nan"), float("nan"), "none", a_mean, b_mean)
    if np.all(d == d[0]):
        return PairedDifference(n, mean, float(d[0]), float(d[0]), "exact", a_mean, b_mean)
    from scipy.stats import bootstrap

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns (and returns NaN) where BCa is undefined
            result = bootstrap((a, b), _mean_difference, paired=True, vectorized=True, method=method,
                               confidence_level=confidence, n_resamples=n_resamples,
                               rng=np.random.default_rng(seed))  # fmt: skip
        low, high = result.confidence_interval
        if math.isfinite(low) and math.isfinite(high):
            return PairedDifference(n, mean, float(low), float(high), method, a_mean, b_mean)
    raise KvdiagError(f"no bootstrap interval for {n} paired differences")  # percentile is always finite


def column_scores(table: pd.DataFrame, label: str, budget: float, column: str = "score") -> pd.Series:
    """Values of `column` (default the score) of (method label, budget) indexed by sample id, from a
    results table (columns sample_id, method, budget and `column`)."""
    rows = table[(table.method == label) & np.isclose(table.budget.astype(float), float(budget))]
    return rows.drop_duplicates("sample_id").set_index("sample_id")[column].astype(float)


def paired_scores(
    table: pd.DataFrame, a: tuple[str, float], b: tuple[str, float], column: str = "score"
) -> tuple[np.ndarray, np.ndarray]:
    """Values of `column` (default the score) of (method label, budget) `a` and `b` on the samples that
    have both, aligned by sample id."""
    joined = pd.concat([column_scores(table, *a, column).rename("a"), column_scores(table, *b, column).rename("b")],
                       axis=1, join="inner").sort_index()  # fmt: skip
    return joined.a.to_numpy(), joined.b.to_numpy()


def needed_n(diff: PairedDifference, threshold: float = 0.0) -> int | None:
    """The sample size at which the interval would exclude `threshold` if the mean difference stayed
    as observed and the half-width shrank as 1/√n: ceil(n · (half-width / |mean − threshold|)²); n
    itself when the interval already excludes it; None when it cannot be estimated (n < 2, a
    zero-width interval on the threshold, or the mean on the threshold)."""
    if diff.interval == "none" or not math.isfinite(diff.mean):
        return None
    gap = abs(diff.mean - threshold)
    if diff.above(threshold) or diff.below(threshold):
        return diff.n
    if gap == 0 or diff.half_width == 0:
        return None
    return max(diff.n, math.ceil(diff.n * (diff.half_width / gap) ** 2))
