"""Tests for analysis.free_energy (docs/theory.md §5) against hand computations and closed forms."""

import numpy as np
import pytest

from analysis.free_energy import (
    curve_minima, fit_temperature, free_energy_curves, hypothesis_holds, power_law_fit,
    power_law_slope_se,
    select_stationary_segment, smooth_log_gaussian, smooth_log_triangular,
    temperature_along_training, temperature_estimate, temperature_intervals,
)

A_TRUE, B_TRUE, C_S = 0.85, 3.9e-3, 50.0


def exact_family(lrs):
    """U, S that exactly minimise U − T(η)S along the family, with T(η) = b η^a.

    S = C ln η (increasing) and dU/dS = T  ⇒  dU/dη = T C/η  ⇒  U = (b C / a) η^a (+ const).
    dU/dS = T is increasing in S, so U(S) is convex and each η_i minimises U − T_i S.
    """
    return B_TRUE * C_S / A_TRUE * lrs**A_TRUE + 0.7, C_S * np.log(lrs)


def test_intervals_contain_true_temperature_and_fit_recovers_power_law():
    lrs = np.logspace(-4, -2, 41)
    U, S = exact_family(lrs)
    T_true = B_TRUE * lrs**A_TRUE
    lower, upper, empty = temperature_intervals(lrs, U, S, eps=1e-9)
    assert not empty.any()
    assert np.all(lower[1:-1] <= T_true[1:-1]) and np.all(T_true[1:-1] <= upper[1:-1])
    # endpoints have one side only and take its value: first ≥ T, last ≤ T
    assert lower[0] == upper[0] >= T_true[0]
    assert lower[-1] == upper[-1] <= T_true[-1]
    T = temperature_estimate(lower, upper)
    assert np.all(np.diff(T) > 0)
    assert hypothesis_holds(lower, upper, T, empty)
    # eps = 0: geometric mean of neighbouring chord slopes is T·sinh(aΔ/2)/(aΔ/2), Δ = ln-step
    lower0, upper0, _ = temperature_intervals(lrs, U, S, eps=0.0)
    T0 = temperature_estimate(lower0, upper0)
    a, b = power_law_fit(lrs[1:-1], T0[1:-1])
    z = A_TRUE * np.log(lrs[1] / lrs[0]) / 2
    assert a == pytest.approx(A_TRUE, abs=1e-8)
    assert b == pytest.approx(B_TRUE * np.sinh(z) / z, rel=1e-8)
    assert b == pytest.approx(B_TRUE, rel=1e-3)


def test_fit_temperature_end_to_end_on_exact_family():
    lrs = np.logspace(-4, -2, 21)            # ln step 0.23 < h: smoothing active
    U, S = exact_family(lrs)
    fit = fit_temperature(lrs, U, S, eps=1e-9, h=0.3, lr_range=(1e-4, 1e-2))
    assert fit.indices.tolist() == list(range(21))
    # S keeps increasing and never saturates: the automatic rule keeps the whole grid
    assert select_stationary_segment(lrs, U, S).tolist() == list(range(21))
    assert fit.holds and not fit.empty.any()
    assert fit.a == pytest.approx(A_TRUE, abs=0.01)
    assert fit.b == pytest.approx(B_TRUE, rel=0.05)
    # each interior free-energy curve F_i is minimised at η_i (U, S convex pair); the
    # endpoints' one-sided T estimates may move their minima by one grid point
    assert fit.minima[1:-1].tolist() == list(range(1, 20))


def test_intervals_hand_example():
    lrs, U, S = [1.0, 2.0, 3.0], [0.0, 1.0, 3.0], [0.0, 1.0, 2.0]
    lower, upper, empty = temperature_intervals(lrs, U, S, eps=0.5)
    # i=0: upper = min(1.5/1, 3.5/2) = 1.5, no lower side -> lower = upper
    # i=1: lower = (1-0-0.5)/1 = 0.5, upper = (3-1+0.5)/1 = 2.5
    # i=2: lower = max((3-0-0.5)/2, (3-1-0.5)/1) = 1.5, no upper side -> upper = lower
    np.testing.assert_allclose(lower, [1.5, 0.5, 1.5])
    np.testing.assert_allclose(upper, [1.5, 2.5, 1.5])
    assert not empty.any()
    T = temperature_estimate(lower, upper)
    np.testing.assert_allclose(T, [1.5, np.sqrt(1.25), 1.5])
    assert not hypothesis_holds(lower, upper, T, empty)   # not increasing


def test_intervals_nonpositive_lower_takes_upper():
    # eps = 1.5: i=1 lower = (1-0-1.5)/1 = -0.5 -> floored to 0 -> set to upper = (2+1.5)/1
    lower, upper, empty = temperature_intervals([1.0, 2.0, 3.0], [0.0, 1.0, 3.0],
                                                [0.0, 1.0, 2.0], eps=1.5)
    assert lower[1] == pytest.approx(3.5) and upper[1] == pytest.approx(3.5)
    # i=2: lower = max((3-1.5)/2, (2-1.5)/1) = 0.75, upper takes it
    assert lower[2] == pytest.approx(0.75) and upper[2] == pytest.approx(0.75)
    assert not empty.any()


def test_empty_interval_is_flagged():
    # U not convex in S: i=1 needs T >= 2 (vs j=0) and T <= 0.5 (vs j=2)
    lower, upper, empty = temperature_intervals([1.0, 2.0, 3.0], [0.0, 2.0, 2.5],
                                                [0.0, 1.0, 2.0], eps=0.0)
    assert empty.tolist() == [False, True, False]
    assert lower[1] == pytest.approx(2.0) and upper[1] == pytest.approx(0.5)
    T = temperature_estimate(lower, upper)
    assert not hypothesis_holds(lower, upper, T, empty)


def test_smoothing_constant_linear_and_boundaries():
    lrs = np.exp(0.1 * np.arange(8))         # uniform ln grid, step 0.1
    const = np.full(8, 2.5)
    np.testing.assert_allclose(smooth_log_triangular(lrs, const), const)
    v = np.arange(8.0) ** 2 + 3 * np.arange(8.0)   # raw boundaries must survive
    out = smooth_log_triangular(lrs, v)
    assert out[0] == v[0] and out[-1] == v[-1]
    lin = 1.0 + 2.0 * np.arange(8.0)         # linear in ln η
    out = smooth_log_triangular(lrs, lin, h=0.3)
    # kernel reaches 2 neighbours each side: points 2..5 see a symmetric kernel
    np.testing.assert_allclose(out[2:6], lin[2:6], atol=1e-12)
    # point 1 by hand: weights 0.2 (j=0), 0.3 (self), 0.2 (j=2), 0.1 (j=3)
    assert out[1] == pytest.approx((0.2 * 1 + 0.3 * 3 + 0.2 * 5 + 0.1 * 7) / 0.8, abs=1e-12)


def test_smoothing_rejects_unsorted():
    with pytest.raises(ValueError, match="strictly increasing"):
        smooth_log_triangular([1e-3, 1e-4], [1.0, 2.0])


def test_power_law_fit_ignores_bad_points_and_errors():
    x = np.array([1.0, 2.0, 4.0, -1.0, np.nan, 8.0])
    y = 3.0 * np.abs(x) ** 1.5
    y[4] = 1.0
    a, b = power_law_fit(x, y)
    assert a == pytest.approx(1.5) and b == pytest.approx(3.0)
    with pytest.raises(ValueError, match=">= 2 points"):
        power_law_fit([1.0, -2.0], [1.0, 2.0])


def test_exponent_standard_error_matches_an_independent_regression():
    # scipy's linregress on the logs is an independent implementation of the slope's standard error
    from scipy.stats import linregress
    rng = np.random.default_rng(3)
    x = np.logspace(-3, -1, 7)
    y = 0.02 * x**0.9 * np.exp(rng.normal(0, 0.2, x.size))
    ref = linregress(np.log(x), np.log(y))
    assert power_law_fit(x, y)[0] == pytest.approx(ref.slope)
    assert power_law_slope_se(x, y) == pytest.approx(ref.stderr, rel=1e-10)
    # exact power law: no scatter; two points: no estimate of it
    assert power_law_slope_se(x, 3 * x**1.5) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(power_law_slope_se([1.0, 2.0], [1.0, 4.0]))


def test_free_energy_curves_and_minima():
    U, S, T = np.array([0.0, 1.0, 3.0]), np.array([0.0, 1.0, 2.0]), np.array([0.5, 1.5, 3.0])
    F = free_energy_curves(U, S, T)
    np.testing.assert_allclose(F[1], [0.0, 1.0 - 1.5, 3.0 - 3.0])
    # T=0.5: F = [0, .5, 2] -> 0 ; T=1.5: [0, -.5, 0] -> 1 ; T=3: [0, -2, -3] -> 2
    assert curve_minima(F).tolist() == [0, 1, 2]


def test_select_segment_manual_and_automatic():
    lrs = np.logspace(-4, -1, 13)
    # S: flat/decreasing head (3 pts), increasing middle, saturated tail
    S = np.array([5.0, 4.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 10.0, 10.0, 10.0])
    U = np.linspace(1.0, 2.0, 13)
    U[5] = np.nan
    idx = select_stationary_segment(lrs, U, S)
    assert idx.tolist() == [2, 3, 4, 6, 7, 8, 9]
    man = select_stationary_segment(lrs, U, S, lr_range=(10**-3.75, 10**-2.0))
    assert man.tolist() == [1, 2, 3, 4, 6, 7, 8]       # inclusive ends, NaN dropped
    with pytest.raises(ValueError, match="lr_range"):
        select_stationary_segment(lrs, U, S, lr_range=(10**-3.75, 10**-3.7))


def test_temperature_along_training_recovers_slope():
    its = np.unique(np.logspace(1, 5, 150).astype(int))
    S = 3.0 * np.log(its) + 0.1 * np.sin(np.log(its))     # increasing
    U = 0.02 * S + 1.0
    T = temperature_along_training(U, S, delta=2, last=100)
    assert T.shape == (96,)
    np.testing.assert_allclose(T, 0.02, rtol=1e-10)
    # Gaussian smoothing is linear with normalised rows: U_s = 0.02 S_s + 1 still
    Ts = temperature_along_training(smooth_log_gaussian(its, U), smooth_log_gaussian(its, S))
    np.testing.assert_allclose(Ts, 0.02, rtol=1e-8)


def test_smooth_log_gaussian_constant_and_explicit_value():
    its = np.array([1.0, np.e, np.e**2])
    np.testing.assert_allclose(smooth_log_gaussian(its, np.full(3, 4.0)), 4.0)
    out = smooth_log_gaussian(its, [0.0, 1.0, 2.0], sigma=1.0)
    w = np.exp(-0.5)                          # neighbours at ln-distance 1
    assert out[1] == pytest.approx(1.0)       # symmetric middle point
    assert out[0] == pytest.approx((w * 1 + np.exp(-2) * 2) / (1 + w + np.exp(-2)))
    with pytest.raises(ValueError, match="iteration 0"):
        smooth_log_gaussian([0, 1, 2], [1.0, 2.0, 3.0])
