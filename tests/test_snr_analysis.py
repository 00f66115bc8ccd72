"""Tests for analysis.snr (docs/theory.md §3, §6) on hand-constructed gradients."""

import numpy as np
import pytest

from analysis.snr import default_phase_threshold, gradient_phase_exponent, snr_stats_from_gradients


def test_snr_stats_on_constructed_noise():
    gbar = np.array([3.0, 4.0, 0.0, 0.0])                 # |ḡ| = 5
    noise = np.array([[0, 0, 1, 0], [0, 0, -1, 0], [0, 0, 0, 3], [0, 0, 0, -3]], float)
    st = snr_stats_from_gradients(gbar + noise, gbar)
    # noise norms 1, 1, 3, 3 (orthogonal to ḡ): rms = sqrt(20/4), mean = 2
    assert st["full_grad_norm"] == pytest.approx(5.0)
    assert st["stoch_grad_rms"] == pytest.approx(np.sqrt(5.0))
    assert st["noise_mean_norm"] == pytest.approx(2.0)
    assert st["stoch_grad_mean_norm"] == pytest.approx((np.sqrt(26) + np.sqrt(34)) / 2)
    assert st["snr"] == pytest.approx(np.sqrt(5.0))
    assert st["snr_mean"] == pytest.approx(2.5)


def test_snr_stats_zero_noise_and_shape_errors():
    gbar = np.array([1.0, 0.0])
    st = snr_stats_from_gradients(np.tile(gbar, (3, 1)), gbar)
    assert st["snr"] == np.inf and st["stoch_grad_mean_norm"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gbar must have shape"):
        snr_stats_from_gradients(np.zeros((3, 2)), np.zeros(3))


def test_gradient_phase_exponent_exact_power_law():
    its = np.arange(0, 2000, 50)
    full = np.exp(-its / 500.0)                            # decaying full gradient
    stoch = np.exp(0.3) * full**0.78
    early = its < 400
    stoch[early] = 10.0                                    # would wreck the fit if used
    a, b = gradient_phase_exponent(full, stoch, its, min_iteration=400)
    assert a == pytest.approx(0.78, abs=1e-10)
    assert b == pytest.approx(0.3, abs=1e-10)
    with pytest.raises(ValueError, match="min_iteration"):
        gradient_phase_exponent(full, stoch, its, min_iteration=1950)


def test_default_phase_threshold_scales():
    assert default_phase_threshold(1_600_000) == 200_000
    assert default_phase_threshold(16_000) == 2_000
    assert default_phase_threshold(1_000_000, paper_iters=1_000_000, paper_threshold=200_000) == 200_000


def test_phase_exponent_uses_only_the_window():
    # inside 1e4 ≤ t ≤ 4e5 the law is stoch = e^0.3 · full^0.9; before and after it is a different one,
    # so only a fit restricted to the window (ResNet analysis, docs/theory.md §6) recovers a = 0.9 exactly
    its = np.geomspace(10, 1e6, 200)
    full = 1.0 / np.sqrt(its)
    inside = (its >= 1e4) & (its <= 4e5)
    stoch = np.where(inside, np.exp(0.3) * full**0.9, 2.0 * full**0.4)
    a, b = gradient_phase_exponent(full, stoch, its, 1e4, 4e5)
    assert a == pytest.approx(0.9, abs=1e-12) and b == pytest.approx(0.3, abs=1e-10)
    a_open, _ = gradient_phase_exponent(full, stoch, its, 1e4)
    assert abs(a_open - 0.9) > 0.05
    with pytest.raises(ValueError, match="≤ iteration ≤"):
        gradient_phase_exponent(full, stoch, its, 2e6, 3e6)
