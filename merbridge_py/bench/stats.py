"""The statistics the benchmark reports, defined once.

Quantiles use linear interpolation between closest ranks (Hyndman & Fan type 7):
for n sorted values x[0..n-1] and 0 <= q <= 1, h = (n - 1) * q and
Q(q) = x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)]).
This is numpy's default and `statistics.quantiles(method="inclusive")`, so a
reader can recompute every number with either. IQR = Q(0.75) - Q(0.25).

Ratios between modes are paired round by round: round r's eBPF value divided by
round r's iptables value, then the median of those ratios. Pairing cancels slow
drift of a noisy machine (both members of a pair ran minutes apart at most),
which a ratio of two medians would not.

"Never worse than iptables" is a verdict from an exact sign test on the paired
ratios (sign_test, verdict below): a round where eBPF did worse than iptables
is a "worse" sign, one where it did better a "better" sign, ties are dropped.
Under the null hypothesis that neither mode is favoured, the number of worse
signs among n untied pairs is Binomial(n, 1/2). The verdict is "worse" when
P(X >= worse signs) <= ALPHA, "better" when P(X >= better signs) <= ALPHA
(two one-sided tests at ALPHA = 0.05 each; at most one can hold), and
"not resolved" otherwise. The sign test assumes nothing about the shape of the
noise (this machine's p99 spreads over 90-500% across rounds), only that the
pairs are independent and each is as likely to tip either way when the modes
are equal. Its price: it needs at least 5 untied pairs to ever reach 0.05
(0.5^5 = 0.031), and 10 pairs resolve only 9-1 splits or clearer
(P(X >= 9) = 11/1024 = 0.011, P(X >= 8) = 56/1024 = 0.055).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


def quantile(values: Iterable[float], q: float) -> float:
    """Type-7 quantile (linear interpolation) of a non-empty collection."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of no values")
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def median(values: Iterable[float]) -> float:
    return quantile(values, 0.5)


def iqr(values: Iterable[float]) -> float:
    xs = list(values)
    return quantile(xs, 0.75) - quantile(xs, 0.25)


def relative_iqr(values: Iterable[float]) -> float:
    """IQR / median: the spread of a metric across rounds as a fraction of its
    typical value (0.1 = the middle half of the rounds spans 10%)."""
    xs = list(values)
    m = median(xs)
    if m == 0:
        raise ValueError("relative IQR of values with median 0")
    return iqr(xs) / m


def paired_ratios(numerator: Mapping[int, float], denominator: Mapping[int, float]) -> list[float]:
    """numerator[r] / denominator[r] for every round r present in both, in round
    order. A round missing on either side (a failed run) has no pair and is left
    out, as is one whose denominator is 0 (no meaningful ratio)."""
    return [numerator[r] / denominator[r]
            for r in sorted(numerator.keys() & denominator.keys())
            if denominator[r] != 0]


def median_paired_ratio(numerator: Mapping[int, float], denominator: Mapping[int, float]) -> float | None:
    ratios = paired_ratios(numerator, denominator)
    return median(ratios) if ratios else None


ALPHA = 0.05
BETTER, WORSE, NOT_RESOLVED = "better", "worse", "not resolved"
LOWER_IS_BETTER, HIGHER_IS_BETTER = "lower", "higher"


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (sum of C(n, i) / 2^n)."""
    if n < 0 or k < 0:
        raise ValueError(f"binomial tail needs k, n >= 0, got k={k}, n={n}")
    if k > n:
        return 0.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def min_pairs_to_resolve(alpha: float = ALPHA) -> int:
    """The fewest untied pairs with which a unanimous result reaches alpha."""
    n = 1
    while 0.5 ** n > alpha:
        n += 1
    return n


@dataclass(frozen=True)
class SignTest:
    """The paired sign test of one metric of one case (candidate / baseline)."""

    better: int           # pairs where the candidate did better
    worse: int            # pairs where it did worse
    ties: int             # pairs with a ratio of exactly 1 (left out of the test)
    p_worse: float        # P(X >= worse) under no difference: small = evidence of worse
    p_better: float       # P(X >= better) under no difference: small = evidence of better
    alpha: float = ALPHA

    @property
    def pairs(self) -> int:
        return self.better + self.worse + self.ties

    @property
    def verdict(self) -> str:
        if self.p_worse <= self.alpha:
            return WORSE
        if self.p_better <= self.alpha:
            return BETTER
        return NOT_RESOLVED

    @property
    def resolvable(self) -> bool:
        """Were there pairs enough for a verdict? (ties count: pairs that all
        tie are no evidence of a difference, not too few to judge)"""
        return 0.5 ** self.pairs <= self.alpha


def sign_test(ratios: Sequence[float], direction: str, alpha: float = ALPHA) -> SignTest:
    """Exact sign test of candidate/baseline ratios. direction: LOWER_IS_BETTER
    (latency, CPU) or HIGHER_IS_BETTER (req/s, throughput)."""
    if direction not in (LOWER_IS_BETTER, HIGHER_IS_BETTER):
        raise ValueError(f"direction must be {LOWER_IS_BETTER!r} or {HIGHER_IS_BETTER!r}, got {direction!r}")
    above = sum(1 for r in ratios if r > 1.0)
    below = sum(1 for r in ratios if r < 1.0)
    ties = len(ratios) - above - below
    better, worse = (below, above) if direction == LOWER_IS_BETTER else (above, below)
    n = better + worse
    return SignTest(better=better, worse=worse, ties=ties, p_worse=binomial_tail(worse, n),
                    p_better=binomial_tail(better, n), alpha=alpha)


def summarize(values: Sequence[float]) -> tuple[float, float] | tuple[None, None]:
    """(median, IQR), or (None, None) for no values."""
    if not values:
        return None, None
    return median(values), iqr(values)
