"""Paired statistics against hand computations: McNemar's exact p-value and the paired bootstrap interval."""

from __future__ import annotations

import math

import pytest

from magdi.report.stats import compare, mcnemar_exact, paired_bootstrap_ci


def test_mcnemar_exact_hand_computed() -> None:
    # only a right on q0, q7; only b right on q1..q5; q6 both right -> n01 = 2, n10 = 5, 7 discordant.
    a = [True, False, False, False, False, False, True, True]
    b = [False, True, True, True, True, True, True, False]
    n01, n10, p = mcnemar_exact(a, b)
    assert (n01, n10) == (2, 5)
    # two-sided exact: 2 * P(X <= 2), X ~ Bin(7, 1/2) = 2 * (1 + 7 + 21) / 128
    assert p == pytest.approx(58 / 128)
    # all 6 discordant one way: 2 * (1/2)^6
    assert mcnemar_exact([True] * 6, [False] * 6)[2] == pytest.approx(2 / 64)
    # 1 vs 5 discordant: 2 * (1 + 6) / 64
    assert mcnemar_exact([True, False, False, False, False, False],
                         [False, True, True, True, True, True])[2] == pytest.approx(14 / 64)
    # balanced discordance and no discordance: no evidence at all
    assert mcnemar_exact([True, True, False, False], [False, False, True, True])[2] == 1.0
    assert mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)
    # concordant pairs do not change the test (only discordant questions count)
    assert mcnemar_exact([True] * 6 + [True] * 10, [False] * 6 + [True] * 10)[2] == pytest.approx(2 / 64)
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_paired_bootstrap_degenerate_cases_are_exact() -> None:
    assert paired_bootstrap_ci([], []) == (0.0, 0.0)
    assert paired_bootstrap_ci([True] * 5, [False] * 5) == (1.0, 1.0)
    assert paired_bootstrap_ci([True], [False]) == (1.0, 1.0)


def test_paired_bootstrap_keeps_the_pairs() -> None:
    """Two methods right on exactly the same questions differ by exactly 0 on every resample of the questions;
    resampling them independently (the unpaired interval) would give a wide interval instead."""
    same = [True, False, True, True, False, False, True, False, True, False]
    assert paired_bootstrap_ci(same, same, 500, 0) == (0.0, 0.0)


def test_paired_bootstrap_two_questions_hand_computed() -> None:
    # differences d = [1, 0]: a resample's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so the 2.5th and
    # 97.5th percentiles are 0 and 1.
    assert paired_bootstrap_ci([True, False], [False, False], 2000, 0) == (0.0, 1.0)


def test_paired_bootstrap_matches_the_normal_approximation_and_is_seeded() -> None:
    # 20 questions: 6 only a right, 2 only b right, 12 concordant -> mean difference 0.2, var(d) = 8/20 - 0.04 =
    # 0.36, sd of the mean 0.6 / sqrt(20) = 0.134 -> 0.2 +- 1.96 * 0.134 = [-0.063, 0.463]
    a = [True] * 6 + [False] * 2 + [True] * 5 + [False] * 7
    b = [False] * 6 + [True] * 2 + [True] * 5 + [False] * 7
    lo, hi = paired_bootstrap_ci(a, b, 2000, 0)
    assert abs(lo - (-0.063)) < 0.06 and abs(hi - 0.463) < 0.06
    assert paired_bootstrap_ci(a, b, 2000, 0) == (lo, hi)
    # percentile interval ends are attainable resample means k/20
    assert math.isclose(lo * 20, round(lo * 20)) and math.isclose(hi * 20, round(hi * 20))


def test_compare_pairs_by_question_id_not_by_position() -> None:
    a = {"q1": {"correct": True}, "q2": {"correct": True}, "q3": {"correct": False}, "only_a": {"correct": True}}
    b = {"q3": {"correct": True}, "q2": {"correct": True}, "q1": {"correct": False}}  # other order, no "only_a"
    c = compare("t", "magdi", "zero_shot", a, b, "MAGDi vs zero-shot", 200, 0)
    assert c is not None
    assert (c.n, c.both_right, c.a_only, c.b_only, c.both_wrong) == (3, 1, 1, 1, 0)
    assert (c.acc_a, c.acc_b, c.diff) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 0.0)
    assert c.p_mcnemar == 1.0 and not c.significant
    assert c.row()["acc_a"] == pytest.approx(66.6667)
    assert compare("t", "x", "y", {"a": {"correct": True}}, {"b": {"correct": True}}, "", 10, 0) is None


def test_holm_by_hand() -> None:
    from magdi.report.stats import holm

    # sorted 0.01, 0.03, 0.04 (m = 3): 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; 1 x 0.04 = 0.04 -> max so far 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_minimum_detectable_difference_solves_connors_formula() -> None:
    from scipy.stats import norm

    from magdi.report.stats import minimum_detectable_difference

    n, psi = 200, 0.20
    d = minimum_detectable_difference(n, psi)
    za, zb = norm.ppf(0.975), norm.ppf(0.8)  # 1.95996, 0.84162
    assert n * d * d == pytest.approx((za * math.sqrt(psi) + zb * math.sqrt(psi - d * d)) ** 2, rel=1e-9)
    # between the small-d approximation (za + zb) sqrt(psi / n) = 0.08859 and za sqrt(psi / n) = 0.06198
    assert 0.06198 < d < 0.08859 and d == pytest.approx(0.08807, abs=1e-5)
    assert minimum_detectable_difference(800, psi) == pytest.approx(d / 2, rel=0.03)  # ~1/sqrt(n)
    assert math.isnan(minimum_detectable_difference(200, 0.0))


def test_ordering_verdicts_by_hand() -> None:
    from magdi.report.stats import ordering_verdicts

    acc = {"t": {"zero_shot": 40.0, "sit_a": 45.0, "sit_b": 50.0, "magdi_r0": 48.0, "magdi": 55.0},
           "u": {"zero_shot": 40.0, "sit_a": 35.0, "magdi_r0": 41.0, "magdi": 41.0}}
    comps = [{"task": "t", "method_a": "magdi", "method_b": "sit_b", "p_mcnemar": "0.01"},
             {"task": "t", "method_a": "sit_b", "method_b": "zero_shot", "p_mcnemar": "0.02"},
             {"task": "t", "method_a": "magdi", "method_b": "magdi_r0", "p_mcnemar": "0.2"}]
    t, u = ordering_verdicts(acc, comps)
    # t: levels go up but not significantly; MAGDi > best SiT (sit_b) > zero-shot, both steps significant
    assert "levels increase: **in direction only**" in t and "magdi 55.0 > magdi_r0 48.0, p = 0.2" in t
    assert "MAGDi > best SiT > zero-shot: **yes**, every step significant" in t and "sit_b 50.0 > zero_shot" in t
    # u: magdi = magdi_r0 (not an increase); the best SiT is below zero-shot
    assert "levels increase: **no** (magdi 41.0 = magdi_r0 41.0)" in u
    assert "MAGDi > best SiT > zero-shot: **no**" in u and "sit_a 35.0 < zero_shot 40.0" in u
