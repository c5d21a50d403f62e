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

Noise of a run: the relative IQR of the baseline's own values across rounds,
IQR / median. "eBPF is never worse than iptables at p99 by more than the run's
own noise" then reads: median paired p99 ratio <= 1 + relative IQR of iptables'
p99 across the rounds of this run.
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


@dataclass(frozen=True)
class NoiseCheck:
    """Is a candidate's median paired ratio to the baseline within the
    baseline's own noise? (for metrics where higher is worse, e.g. latency)"""

    ratio: float          # median of the paired candidate/baseline ratios
    noise: float          # relative IQR of the baseline across rounds
    pairs: int

    @property
    def allowed(self) -> float:
        return 1.0 + self.noise

    @property
    def passed(self) -> bool:
        return self.ratio <= self.allowed


def worse_than_noise(candidate: Mapping[int, float], baseline: Mapping[int, float]) -> NoiseCheck | None:
    """Compare round-keyed values where higher is worse. None when there is no
    pair to compare."""
    ratios = paired_ratios(candidate, baseline)
    if not ratios:
        return None
    return NoiseCheck(ratio=median(ratios), noise=relative_iqr(baseline.values()), pairs=len(ratios))


def summarize(values: Sequence[float]) -> tuple[float, float] | tuple[None, None]:
    """(median, IQR), or (None, None) for no values."""
    if not values:
        return None, None
    return median(values), iqr(values)
