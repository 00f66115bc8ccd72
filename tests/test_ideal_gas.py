"""Tests for analysis.ideal_gas (docs/theory.md §7): hand-rearranged formulas and exact fits."""

import numpy as np
import pytest

from analysis.ideal_gas import (
    adiabatic_spread, effective_pressure, effective_pressure_discrete,
    effective_pressure_prediction, gas_constant, maxwell_fit, potential_ranks, protocol_potential_ranks_where,
    radius_discrete, radius_sde, temperature,
)

D = 101
R = 50.0


def test_gas_constant_and_temperature_hand_values():
    assert gas_constant(D) == R
    assert temperature("fixed_elr", 0.01, 0.0, 4.0, D) == pytest.approx(0.02)
    assert temperature("fixed_sphere", 0.01, 0.0, 4.0, D) == pytest.approx(0.02)
    # sqrt(0.1 * 0.01 * 2 / (2 * 10)) = sqrt(1e-4)
    assert temperature("fixed_lr", 0.1, 0.01, 2.0, 11) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="protocol"):
        temperature("sphere", 0.1, 0.01, 2.0, 11)


def test_sde_radius_obeys_ideal_gas_law():
    lr, wd, s2 = np.array([1e-3, 1e-2]), np.array([1e-2, 1e-1]), 3.0
    # fixed ELR: p V = λ r²/2 = R T with T = η_eff σ²/2
    r = radius_sde("fixed_elr", lr, wd, s2, D)
    np.testing.assert_allclose(wd * r**2 / 2, R * lr * s2 / 2)
    np.testing.assert_allclose(r**2 * wd, temperature("fixed_elr", lr, wd, s2, D) * (D - 1))
    # fixed LR: r⁴ · 2λ = η σ² (D − 1)
    r = radius_sde("fixed_lr", lr, wd, s2, D)
    np.testing.assert_allclose(r**4 * 2 * wd, lr * s2 * (D - 1))
    # and at that radius η_eff = η/r² reproduces the fixed-LR temperature as η_eff σ²/2
    np.testing.assert_allclose(lr / r**2 * s2 / 2, temperature("fixed_lr", lr, wd, s2, D))
    with pytest.raises(ValueError, match="protocol"):
        radius_sde("fixed_sphere", lr, wd, s2, D)
    with pytest.raises(ValueError, match="wd"):
        radius_sde("fixed_elr", lr, 0.0, s2, D)


def test_discrete_radius_hand_values_and_sde_limit():
    # fixed ELR: r² = 0.01 (30 + 10) / 0.2 = 2
    assert radius_discrete("fixed_elr", 0.01, 0.1, 30.0, 10.0) == pytest.approx(np.sqrt(2))
    # fixed LR: r⁴ = 0.05 · 64 / 0.2 = 16
    assert radius_discrete("fixed_lr", 0.05, 0.1, 60.0, 4.0) == pytest.approx(2.0)
    # G² = 0 and tr Σ = σ² (D − 1): the SDE radius
    for proto in ("fixed_elr", "fixed_lr"):
        assert radius_discrete(proto, 0.02, 0.05, 2.0 * (D - 1), 0.0) == pytest.approx(
            radius_sde(proto, 0.02, 0.05, 2.0, D))


def test_effective_pressure_hand_value_and_one_step_geometry():
    assert effective_pressure(2.1, 2.0, 0.01) == pytest.approx(0.1 / (0.01 * 8))
    # One projected step: g ⊥ θ on radius r0 with |g|² = (tr Σ + G²)/r0², step η = η_eff r0²
    # gives r̃ = sqrt(r0² + η²|g|²) exactly; to first order in η_eff this is the discrete law.
    r0, lr_eff, tr, g2 = 2.0, 1e-3, 30.0, 10.0
    r_tilde = np.sqrt(r0**2 + (lr_eff * r0**2) ** 2 * (tr + g2) / r0**2)
    assert effective_pressure(r_tilde, r0, lr_eff) == pytest.approx(
        effective_pressure_discrete(lr_eff, tr, g2, r0), rel=1e-4)
    assert effective_pressure_discrete(lr_eff, tr, g2, r0) == pytest.approx(1e-3 * 40 / 8)
    # prediction T (D−1)/r0² with T = η_eff σ²/2 equals the discrete law without G²
    s2 = 0.7
    assert effective_pressure_prediction(lr_eff * s2 / 2, D, r0) == pytest.approx(
        effective_pressure_discrete(lr_eff, s2 * (D - 1), 0.0, r0))


def test_potential_ranks_helmholtz_gibbs_groups():
    U, S = np.array([0.0, 1.0, 3.0]), np.array([0.0, 1.0, 2.0])
    # T = .5: F=[0,.5,2]; T=1.5: F=[0,-.5,0]; T=3: F=[0,-2,-3] -> every k is its minimiser
    rank, gap = potential_ranks(U, S, None, np.array([0.5, 1.5, 3.0]), None)
    assert rank.tolist() == [0, 0, 0] and np.allclose(gap, 0)
    # T_0 = 2: F_0 = [0, -1, -1] -> k=0 has two better candidates, gap 1
    T = np.array([2.0, 1.5, 3.0])
    rank, gap = potential_ranks(U, S, None, T, None)
    assert rank.tolist() == [2, 0, 0] and gap == pytest.approx([1.0, 0.0, 0.0])
    # same, restricted to groups {0, 1} and {2}
    rank, gap = potential_ranks(U, S, None, T, None, groups=[1.0, 1.0, 4.0])
    assert rank.tolist() == [1, 0, 0] and gap == pytest.approx([1.0, 0.0, 0.0])
    # Gibbs: U = S = 0, G_k(j) = p_k V_j with V = [1,2,3], p = [1,-1,1]
    z = np.zeros(3)
    rank, gap = potential_ranks(z, z, np.array([1.0, 2, 3]), z, np.array([1.0, -1, 1]))
    assert rank.tolist() == [0, 1, 2] and gap == pytest.approx([0.0, 1.0, 2.0])


def test_gibbs_ranks_leave_out_configurations_without_a_radius():
    """A missing radius would make every candidate's G NaN: that configuration is not ranked and the
    others are ranked among themselves (Gibbs); Helmholtz on the sphere does not need the radius."""
    U, S, T = np.zeros(4), np.zeros(4), np.zeros(4)
    p, r = np.array([1.0, -1.0, 1.0, 1.0]), np.sqrt(2 * np.array([1.0, 2.0, 3.0, np.nan]))  # V = [1, 2, 3, ?]
    rank, gap, kind = protocol_potential_ranks_where(np.ones(4, bool), "fixed_lr", U, S, r, T, p, np.ones(4))
    assert kind.startswith("Gibbs")
    assert rank[:3].tolist() == [0, 1, 2] and gap[:3] == pytest.approx([0.0, 1.0, 2.0])
    assert np.isnan(rank[3]) and np.isnan(gap[3])
    rank, _, kind = protocol_potential_ranks_where(np.ones(4, bool), "fixed_sphere", U, S, r, T, p, np.ones(4))
    assert kind.startswith("Helmholtz") and np.isfinite(rank).all()


def _grid():
    x, y = np.meshgrid(np.linspace(-7, -4, 4), np.array([-3.0, -2.0, -1.0]))
    return x.ravel(), y.ravel()


def test_maxwell_fixed_elr_exact_and_violated():
    x, y = _grid()
    fit = maxwell_fit(x, y, 1 + 2 * x + 0.3 * x**2 - R * y, D, "fixed_elr")
    np.testing.assert_allclose(fit.coef, [1, 2, -R, 0.3, 0, 0], atol=1e-8)
    assert fit.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(fit.ratios, [-1, 0, 0], atol=1e-10)
    assert fit.rel_err_max < 1e-10
    # ∂S/∂y = -0.9R + 0.02R y -> rel err |0.1 + 0.02 y| = .04, .06, .08 at y = -3, -2, -1
    fit = maxwell_fit(x, y, 1 + 2 * x - 0.9 * R * y + 0.01 * R * y**2, D, "fixed_elr")
    np.testing.assert_allclose(fit.ratios, [-0.9, 0.02, 0], atol=1e-10)
    assert fit.rel_err_max == pytest.approx(0.08) and fit.rel_err_mean == pytest.approx(0.06)


def test_maxwell_fixed_lr_exact_and_violated():
    x, y = _grid()
    # S = R x + g(x + y) satisfies ∂x S − ∂y S = R
    S = 5 + R * x + 0.7 * (x + y) - 0.2 * (x + y) ** 2
    fit = maxwell_fit(x, y, S, D, "fixed_lr")
    np.testing.assert_allclose(fit.coef, [5, R + 0.7, 0.7, -0.2, -0.2, -0.4], atol=1e-8)
    np.testing.assert_allclose(fit.ratios, [1, 0, 0], atol=1e-10)
    assert fit.r2 == pytest.approx(1.0) and fit.rel_err_max < 1e-10
    # ∂x − ∂y = R + 0.02 R x -> rel err 0.02|x| = .14, .12, .10, .08 over x = -7..-4
    fit = maxwell_fit(x, y, 0.95 * R * x - 0.05 * R * y + 0.01 * R * x**2, D, "fixed_lr")
    np.testing.assert_allclose(fit.ratios, [1, 0.02, 0], atol=1e-10)
    assert fit.rel_err_max == pytest.approx(0.14) and fit.rel_err_mean == pytest.approx(0.11)


def test_maxwell_r2_and_bad_grid():
    x, y = _grid()
    S = -R * y + np.where(np.arange(x.size) % 2 == 0, 1.0, -1.0)   # not quadratic
    assert maxwell_fit(x, y, S, D, "fixed_elr").r2 < 1 - 1e-6
    with pytest.raises(ValueError, match="quadratic"):
        maxwell_fit(x, np.zeros_like(x), x, D, "fixed_elr")


def test_adiabatic_spread():
    lr, wd = np.meshgrid([1e-3, 1e-2, 1e-1], [1e-3, 1e-2, 1e-1, 1.0], indexing="ij")
    lr, wd = lr.ravel(), wd.ravel()
    etas, spread = adiabatic_spread(lr, wd, 10 * np.log(lr))
    np.testing.assert_allclose(etas, [1e-3, 1e-2, 1e-1])
    np.testing.assert_allclose(spread, 0.0)
    _, spread = adiabatic_spread(lr, wd, 10 * np.log(lr) + wd)
    np.testing.assert_allclose(spread, 1.0 - 1e-3)
