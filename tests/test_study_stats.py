"""Study statistics against closed forms, published tables and scipy (when installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from effdeploy.study import stats


def _outcomes(n: int, right: int, seed: int = 0) -> np.ndarray:
    x = np.zeros(n, dtype=bool)
    x[:right] = True
    return np.random.default_rng(seed).permutation(x)


def test_correct_matches_argmax_and_lower_index_on_ties():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 3.0]], dtype=np.float32)
    labels = np.array([0, 2, 2])
    assert stats.correct(logits, labels).tolist() == [True, False, False]


def test_bootstrap_ci_of_bernoulli_mean_matches_normal_interval():
    n, right = 10_000, 7_800
    ci = stats.bootstrap_ci(_outcomes(n, right), seed=1)
    p = right / n
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # 0.00812
    assert ci.estimate == p
    # Monte-Carlo error of a 2.5% quantile of 10,000 resamples here is ~1e-4; the grid is 1e-4
    assert ci.low == pytest.approx(p - half, abs=5e-4)
    assert ci.high == pytest.approx(p + half, abs=5e-4)
    assert ci.n == n and ci.level == 0.95


def test_bootstrap_ci_is_seeded():
    x = _outcomes(2_000, 1_500)
    assert stats.bootstrap_ci(x, seed=3) == stats.bootstrap_ci(x, seed=3)
    assert stats.bootstrap_ci(x, seed=3) != stats.bootstrap_ci(x, seed=4)


def test_bootstrap_ci_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    p_true, n, datasets = 0.8, 500, 1_000
    hits = 0
    for i in range(datasets):
        x = rng.random(n) < p_true
        ci = stats.bootstrap_ci(x, resamples=2_000, seed=i)
        hits += ci.low <= p_true <= ci.high
    coverage = hits / datasets
    se = math.sqrt(0.95 * 0.05 / datasets)  # binomial SE of the coverage itself, 0.0069
    assert abs(coverage - 0.95) < 3 * se


def test_paired_bootstrap_half_width_matches_discordance_formula():
    n, only_a, only_b = 10_000, 600, 400
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:only_a] = True  # a right, b wrong
    b[only_a : only_a + only_b] = True  # b right, a wrong
    a[2_000:8_000] = b[2_000:8_000] = True  # both right
    ci = stats.paired_bootstrap_ci(a, b, seed=2)
    d = (only_a - only_b) / n
    p10, p01 = only_a / n, only_b / n
    half = 1.96 * math.sqrt((p10 + p01 - (p10 - p01) ** 2) / n)  # 0.00619
    assert ci.estimate == pytest.approx(0.02)
    assert ci.low == pytest.approx(d - half, abs=4e-4)
    assert ci.high == pytest.approx(d + half, abs=4e-4)
    assert ci.excludes_zero
    # the same images, reshuffled together, give the same counts and therefore the same interval
    perm = np.random.default_rng(0).permutation(n)
    assert stats.paired_bootstrap_ci(a[perm], b[perm], seed=2) == ci


def test_paired_bootstrap_is_narrower_than_independent_intervals():
    """Two models agreeing on most images: pairing removes the shared image noise."""
    n = 10_000
    a = _outcomes(n, 7_800, seed=5)
    b = a.copy()
    flip = np.flatnonzero(a)[:50]
    b[flip] = False  # b loses 50 images a gets right
    paired = stats.paired_bootstrap_ci(a, b)
    single = stats.bootstrap_ci(a)
    assert paired.high - paired.low < 0.25 * (single.high - single.low)
    assert paired.low > 0  # 50 one-sided discordant images: a is better beyond doubt


def test_mcnemar_exact_hand_computed():
    # 1 vs 6 discordant: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 16 / 128
    assert stats.mcnemar_from_counts(1, 6).p_exact == pytest.approx(0.125, abs=1e-15)
    # 0 vs 5: 2 / 32
    assert stats.mcnemar_from_counts(0, 5).p_exact == pytest.approx(0.0625, abs=1e-15)
    # balanced: the tail passes one half, so p is capped at 1
    assert stats.mcnemar_from_counts(4, 4).p_exact == 1.0
    assert stats.mcnemar_from_counts(0, 0).p_exact == 1.0
    # huge counts do not underflow: 2 * P(X <= 4900 | n = 10000) is ~0.046
    big = stats.mcnemar_from_counts(4_900, 5_100)
    assert 0.03 < big.p_exact < 0.06


def test_mcnemar_counts_from_outcomes():
    a = np.array([1, 1, 1, 0, 0, 1, 0], bool)
    b = np.array([1, 0, 0, 1, 0, 1, 0], bool)
    m = stats.mcnemar(a, b)
    assert (m.only_a, m.only_b, m.discordant) == (2, 1, 3)


def test_mcnemar_chi_square_with_continuity_correction():
    m = stats.mcnemar_from_counts(10, 25)
    assert m.chi2 == pytest.approx(14**2 / 35)
    # chi-square(1) tail at 5.6 (tables: 0.01796)
    assert m.p_chi2 == pytest.approx(0.01796, abs=5e-5)
    # for large counts it approaches the exact test
    big = stats.mcnemar_from_counts(480, 560)
    assert big.p_chi2 == pytest.approx(big.p_exact, rel=0.05)


def test_mcnemar_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for only_a, only_b in [(3, 11), (17, 9), (0, 12), (40, 40), (150, 190), (1200, 1110)]:
        m = stats.mcnemar_from_counts(only_a, only_b)
        expected = scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert m.p_exact == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert m.p_chi2 == pytest.approx(scipy_stats.chi2.sf(m.chi2, 1), rel=1e-9)


def test_t_quantile_matches_published_table():
    # two-sided 95% critical values of Student's t
    for df, value in [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)]:
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.776, abs=1e-3)
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)


def test_t_quantile_against_scipy_fractional_df():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1.3, 2.7, 5.5, 17.2):
        for q in (0.9, 0.975, 0.995):
            assert stats.t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-8)


def test_seed_spread_t_interval_hand_computed():
    s = stats.seed_spread([0.78, 0.80, 0.79])
    # mean 0.79, sd 0.01, half-width t(0.975, 2) * 0.01 / sqrt(3) = 4.303 * 0.005774
    assert s.mean == pytest.approx(0.79)
    assert s.sd == pytest.approx(0.01)
    assert s.ci.high - s.mean == pytest.approx(4.3027 * 0.01 / math.sqrt(3), rel=1e-4)


def test_one_seed_says_so():
    s = stats.seed_spread([0.78])
    assert s.ci is None and s.sd is None and "n<2" in s.note
    c = stats.compare_seeds([0.78], [0.75, 0.76])
    assert c.ci is None and c.difference == pytest.approx(0.78 - 0.755) and "n<2" in c.note


def test_compare_seeds_is_welch_interval():
    a, b = [0.781, 0.795, 0.788], [0.760, 0.772, 0.751, 0.765]
    c = stats.compare_seeds(a, b)
    scipy_stats = pytest.importorskip("scipy.stats")
    res = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(0.95)
    assert c.ci.low == pytest.approx(ci.low, rel=1e-7)
    assert c.ci.high == pytest.approx(ci.high, rel=1e-7)
    assert c.ci.excludes_zero


def test_output_snr_db_from_logits():
    ref = np.array([[3.0, 4.0]])
    test = np.array([[3.0, 4.3]])
    # 25 / 0.09
    assert stats.output_snr_db(ref, test) == pytest.approx(10 * math.log10(25 / 0.09))
