"""`videomoco.demo.stats`: the paired t-test of the ablation, against tabulated values."""

import math

import numpy as np
import pytest

from videomoco.demo.stats import incomplete_beta, paired_test, t_two_sided_p


@pytest.mark.parametrize("df, t_crit", [(1, 12.7062), (4, 2.776445), (5, 2.570582), (10, 2.228139), (30, 2.042272)])
def test_critical_values_of_student_t(df, t_crit):
    # two-sided 5% critical values from the standard t table
    assert t_two_sided_p(t_crit, df) == pytest.approx(0.05, abs=2e-6)
    assert t_two_sided_p(-t_crit, df) == pytest.approx(0.05, abs=2e-6)


def test_p_values_at_the_ends():
    assert t_two_sided_p(0.0, 4) == pytest.approx(1.0)
    assert t_two_sided_p(math.inf, 4) == 0.0
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| >= 1) = 1/2
    assert incomplete_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248)  # I_0.4(2, 3), by the binomial identity


def test_paired_test_uses_the_per_seed_differences():
    baseline = np.array([40.0, 55.0, 47.0, 62.0, 35.0])
    shifted = baseline + np.array([2.0, 3.0, 2.5, 3.5, 2.0])  # a spread of 27 points, a steady +2.6
    result = paired_test(shifted, baseline)
    assert result["diff"] == pytest.approx(2.6) and result["p"] < 0.001
    noisy = baseline + np.array([5.0, -4.0, 3.0, -6.0, 2.0])
    assert paired_test(noisy, baseline)["p"] > 0.5
    assert paired_test(baseline, baseline)["p"] == 1.0
    assert math.isnan(paired_test([1.0], [0.0])["p"])
