"""The benchmark's statistics on synthetic data, against hand-computed values."""

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


def test_noise_is_the_baselines_relative_iqr():
    iptables = {0: 100.0, 1: 110.0, 2: 120.0, 3: 130.0, 4: 140.0}
    # median 120, q25 110, q75 130 -> IQR 20 -> noise 20/120
    assert stats.relative_iqr(iptables.values()) == pytest.approx(1 / 6)

    slightly_worse = {0: 115.0, 1: 125.0, 2: 135.0, 3: 145.0, 4: 150.0}
    check = stats.worse_than_noise(slightly_worse, iptables)
    # ratios 1.15, 1.136, 1.125, 1.115, 1.071 -> median 1.125 <= 1 + 1/6
    assert check.ratio == pytest.approx(1.125)
    assert check.allowed == pytest.approx(7 / 6)
    assert check.pairs == 5 and check.passed

    clearly_worse = {r: v * 1.3 for r, v in iptables.items()}
    check = stats.worse_than_noise(clearly_worse, iptables)
    assert check.ratio == pytest.approx(1.3) and not check.passed


def test_noise_check_on_a_quiet_baseline_is_strict():
    quiet = {0: 100.0, 1: 100.0, 2: 100.0}
    check = stats.worse_than_noise({0: 101.0, 1: 101.0, 2: 101.0}, quiet)
    assert check.noise == 0 and not check.passed
    assert stats.worse_than_noise({0: 100.0, 1: 99.0, 2: 100.0}, quiet).passed
    assert stats.worse_than_noise({}, quiet) is None


def test_summarize_returns_median_and_iqr():
    assert stats.summarize([40, 10, 30, 20]) == pytest.approx((25.0, 15.0))
    assert stats.summarize([]) == (None, None)
