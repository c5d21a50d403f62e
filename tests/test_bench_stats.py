"""The benchmark's statistics on synthetic data, against hand-computed values."""

import math
import statistics

import pytest

from merbridge_py.bench import stats


def test_quantiles_interpolate_linearly_between_ranks():
    xs = [7, 1, 10, 4, 2, 9, 3, 8, 6, 5]          # 1..10, unsorted on purpose
    # h = (n-1) q = 9 * 0.25 = 2.25 -> x[2] + 0.25 (x[3] - x[2]) = 3 + 0.25
    assert stats.quantile(xs, 0.25) == pytest.approx(3.25)
    assert stats.quantile(xs, 0.75) == pytest.approx(7.75)
    assert stats.median(xs) == pytest.approx(5.5)
    assert stats.iqr(xs) == pytest.approx(4.5)
    assert stats.quantile(xs, 0.0) == 1 and stats.quantile(xs, 1.0) == 10


def test_iqr_of_four_values():
    # q25: h = 0.75 -> 10 + 0.75 * 10; q75: h = 2.25 -> 30 + 0.25 * 10
    assert stats.iqr([40, 10, 30, 20]) == pytest.approx(32.5 - 17.5)
    assert stats.iqr([5.0]) == 0


def test_quantiles_match_the_documented_equivalent():
    xs = [3.1, 0.4, 9.9, 2.2, 5.5, 7.0, 1.3]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    assert (stats.quantile(xs, 0.25), stats.median(xs), stats.quantile(xs, 0.75)) == pytest.approx((q1, q2, q3))


def test_quantile_rejects_nonsense():
    with pytest.raises(ValueError):
        stats.quantile([], 0.5)
    with pytest.raises(ValueError):
        stats.quantile([1, 2], 1.5)


def test_paired_ratios_pair_by_round_not_by_rank():
    ebpf = {0: 50.0, 1: 180.0, 2: 95.0}
    iptables = {0: 100.0, 1: 200.0, 2: 100.0}
    assert stats.paired_ratios(ebpf, iptables) == pytest.approx([0.5, 0.9, 0.95])
    assert stats.median_paired_ratio(ebpf, iptables) == pytest.approx(0.9)
    # the ratio of the medians would say 95 / 100: pairing is what the report uses
    assert stats.median(ebpf.values()) / stats.median(iptables.values()) == pytest.approx(0.95)


def test_paired_ratios_skip_unpaired_rounds_and_zero_denominators():
    assert stats.paired_ratios({0: 80.0, 2: 90.0, 3: 5.0}, {0: 100.0, 1: 100.0, 2: 100.0, 3: 0.0}) == \
        pytest.approx([0.8, 0.9])
    assert stats.median_paired_ratio({0: 80.0, 2: 90.0}, {0: 100.0, 1: 100.0, 2: 100.0}) == pytest.approx(0.85)
    assert stats.median_paired_ratio({0: 1.0}, {1: 1.0}) is None


def test_relative_iqr_is_the_spread_over_the_median():
    iptables = {0: 100.0, 1: 110.0, 2: 120.0, 3: 130.0, 4: 140.0}
    # median 120, q25 110, q75 130 -> IQR 20 -> 20/120
    assert stats.relative_iqr(iptables.values()) == pytest.approx(1 / 6)


def test_binomial_tail_is_exact():
    # P(X >= k), X ~ Binomial(10, 1/2): hand-computed sums of C(10, i) / 1024
    assert stats.binomial_tail(10, 10) == pytest.approx(1 / 1024)
    assert stats.binomial_tail(9, 10) == pytest.approx(11 / 1024)
    assert stats.binomial_tail(8, 10) == pytest.approx(56 / 1024)
    assert stats.binomial_tail(0, 10) == 1.0 and stats.binomial_tail(11, 10) == 0.0
    assert stats.binomial_tail(0, 0) == 1.0
    # symmetry: P(X >= k) = P(X <= n - k)
    assert stats.binomial_tail(7, 12) == pytest.approx(sum(math.comb(12, i) for i in range(0, 6)) / 4096)
    with pytest.raises(ValueError):
        stats.binomial_tail(-1, 3)


def test_min_pairs_to_resolve():
    assert stats.min_pairs_to_resolve(0.05) == 5       # 1/32 <= 0.05 < 1/16
    assert stats.min_pairs_to_resolve(0.01) == 7       # 1/128 <= 0.01 < 1/64


@pytest.mark.parametrize("ratios, direction, verdict, better, worse", [
    # latency: a ratio above 1 is a round eBPF did worse
    ([1.2] * 9 + [0.8], stats.LOWER_IS_BETTER, "worse", 1, 9),
    ([0.8] * 9 + [1.2], stats.LOWER_IS_BETTER, "better", 9, 1),
    ([1.2] * 8 + [0.8] * 2, stats.LOWER_IS_BETTER, "not resolved", 2, 8),     # p = 56/1024 > 0.05
    # req/s: a ratio above 1 is a round eBPF did better
    ([1.1] * 10, stats.HIGHER_IS_BETTER, "better", 10, 0),
    ([0.9] * 10, stats.HIGHER_IS_BETTER, "worse", 0, 10),
    # five out of five is the least that resolves at 0.05 (1/32)
    ([1.5] * 5, stats.LOWER_IS_BETTER, "worse", 0, 5),
    ([1.5] * 4, stats.LOWER_IS_BETTER, "not resolved", 0, 4),
])
def test_sign_test_verdicts(ratios, direction, verdict, better, worse):
    t = stats.sign_test(ratios, direction)
    assert (t.verdict, t.better, t.worse, t.ties) == (verdict, better, worse, 0)
    assert t.p_worse == pytest.approx(stats.binomial_tail(worse, better + worse))


def test_sign_test_drops_ties_and_ignores_magnitude():
    t = stats.sign_test([1.0, 1.0, 1.01, 1.01, 1.01, 1.01, 1.01], stats.LOWER_IS_BETTER)
    assert (t.ties, t.worse, t.pairs) == (2, 5, 7) and t.verdict == "worse"
    # one huge tail does not make a verdict: the test counts rounds, not their size
    t = stats.sign_test([27.0, 0.99, 0.99, 1.01, 0.99, 1.01], stats.LOWER_IS_BETTER)
    assert t.verdict == "not resolved" and (t.worse, t.better) == (3, 3)
    assert not stats.sign_test([2.0, 2.0, 2.0], stats.LOWER_IS_BETTER).resolvable
    with pytest.raises(ValueError, match="direction"):
        stats.sign_test([1.0], "sideways")


def test_summarize_returns_median_and_iqr():
    assert stats.summarize([40, 10, 30, 20]) == pytest.approx((25.0, 15.0))
    assert stats.summarize([]) == (None, None)
