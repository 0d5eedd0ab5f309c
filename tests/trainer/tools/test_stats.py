"""Student's t quantile against published values, and the t-interval and paired difference against their formulas."""

from __future__ import annotations

import math
import statistics

import pytest

from grao.tools import stats

# t_{0.975, dof} and t_{0.95, dof} from standard tables (e.g. NIST/SEMATECH e-Handbook, Table 1.4.2.7).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 29: 2.045, 30: 2.042}
T95 = {1: 6.314, 4: 2.132, 10: 1.812, 30: 1.697}


@pytest.mark.parametrize("dof, want", sorted(T975.items()))
def test_t_975_matches_the_table(dof, want):
    assert stats.t_quantile(0.975, dof) == pytest.approx(want, abs=5e-4)


@pytest.mark.parametrize("dof, want", sorted(T95.items()))
def test_t_95_matches_the_table(dof, want):
    assert stats.t_quantile(0.95, dof) == pytest.approx(want, abs=5e-4)


def test_t_quantile_is_the_normal_one_for_many_dof_and_symmetric_and_inverts_the_cdf():
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-stats.t_quantile(0.975, 4))
    assert stats.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    for dof in (1, 2.5, 7):
        for p in (0.6, 0.9, 0.999):
            assert stats.t_cdf(stats.t_quantile(p, dof), dof) == pytest.approx(p, abs=1e-10)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    with pytest.raises(ValueError, match="p must be in"):
        stats.t_quantile(1.0, 3)


def test_mean_interval_and_paired_difference():
    values = [0.8, 0.9, 0.7, 0.95, 0.85]
    got = stats.mean_interval(values)
    want = 2.776445 * statistics.stdev(values) / math.sqrt(5)
    assert got.mean == pytest.approx(0.84) and got.half_width == pytest.approx(want, rel=1e-5) and got.n == 5
    assert stats.mean_interval([0.5]) == (0.5, None, 1)
    a, b = {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.1}, {0: 0.5, 1: 0.6, 2: 0.2}
    diff = stats.paired_difference(a, b)  # seed 3 has no partner
    assert diff.n == 3 and diff.mean == pytest.approx(statistics.fmean([0.4, 0.2, 0.5]))
    assert diff.half_width == pytest.approx(4.302653 * statistics.stdev([0.4, 0.2, 0.5]) / math.sqrt(3), rel=1e-5)
    assert stats.paired_difference({0: 1.0}, {1: 1.0}) is None
