"""Ideal-gas law, potentials and Maxwell relations (docs/theory.md §7).

Dictionary: pressure p = λ, volume V = r²/2, gas constant R = (D − 1)/2, so pV = R T.
What ``lr`` means (η_eff or η) and whether λ applies are the protocol's (trainables.protocols:
η_eff on fixed_sphere / fixed_elr, η on fixed_lr). The temperature and radius formulas live here
only; the toys report uses them with σ = the toy's noise. ``sigma2`` is
σ² = tr Σ / (D − 1), ``trace_sigma`` = tr Σ and ``grad_sq`` = G², both rescaled to the
unit sphere (docs/theory.md §3). All functions broadcast over numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainables.protocols import PROTOCOLS, protocol as protocol_of

WITH_RADIUS = tuple(p for p in PROTOCOLS if protocol_of(p).uses_wd)   # λ applies: a stationary radius


def _check_protocol(protocol, allowed=PROTOCOLS):
    """The Protocol object of ``protocol`` (ValueError unless it is one of ``allowed``)."""
    if protocol not in allowed:
        raise ValueError(f"protocol must be one of {allowed}, got {protocol!r}")
    return protocol_of(protocol)


def _check_D(D):
    if D < 2:
        raise ValueError(f"D must be >= 2 (number of trainable weights), got {D}")


def _positive(name, v):
    a = np.asarray(v, dtype=np.float64)
    if np.any(~(a > 0)):
        raise ValueError(f"{name} must be > 0 for this protocol, got {v}")
    return a


def gas_constant(D):
    """R = (D − 1)/2 (docs/theory.md §7)."""
    _check_D(D)
    return (D - 1) / 2.0


def temperature(protocol, lr, wd, sigma2, D):
    """Temperature (docs/theory.md §7).

    fixed_sphere / fixed_elr: T = η_eff σ² / 2; fixed_lr: T = sqrt(η λ σ² / (2 (D − 1))).
    """
    proto = _check_protocol(protocol)
    _check_D(D)
    lr = np.asarray(lr, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    if not proto.lr_is_effective:
        wd = _positive("wd", wd)
        return np.sqrt(lr * wd * sigma2 / (2.0 * (D - 1)))
    return lr * sigma2 / 2.0


def radius_sde(protocol, lr, wd, sigma2, D):
    """Stationary radius from the SDE, "V1" (docs/theory.md §7): r*² = T (D − 1)/λ.

    fixed_elr: r* = sqrt(η_eff σ² (D−1)/(2λ)); fixed_lr: r* = (η σ² (D−1)/(2λ))^{1/4}.
    """
    _check_protocol(protocol, WITH_RADIUS)
    wd = _positive("wd", wd)
    T = temperature(protocol, lr, wd, sigma2, D)
    return np.sqrt(T * (D - 1) / wd)


def radius_discrete(protocol, lr, wd, trace_sigma, grad_sq):
    """Stationary radius with the discrete-step correction (docs/theory.md §7).

    fixed_elr: r*² = η_eff (tr Σ + G²)/(2λ); fixed_lr: r*⁴ = η (tr Σ + G²)/(2λ).
    """
    proto = _check_protocol(protocol, WITH_RADIUS)
    wd = _positive("wd", wd)
    q = np.asarray(lr, dtype=np.float64) * (np.asarray(trace_sigma) + np.asarray(grad_sq)) / (2.0 * wd)
    return np.sqrt(q) if proto.lr_is_effective else q**0.25


def effective_pressure(r_tilde, r0, lr_eff):
    """Measured fixed-sphere pressure λ_eff = (r̃ − r0)/(η_eff r0³) (docs/theory.md §7).

    r̃ = mean radius before projection; η_eff = the grid value (step η = η_eff r0²).
    """
    r0 = np.asarray(r0, dtype=np.float64)
    return (np.asarray(r_tilde, dtype=np.float64) - r0) / (np.asarray(lr_eff) * r0**3)


def effective_pressure_prediction(T, D, r0):
    """Predicted fixed-sphere pressure λ_eff = T (D − 1)/r0² (docs/theory.md §7)."""
    _check_D(D)
    return np.asarray(T, dtype=np.float64) * (D - 1) / np.asarray(r0, dtype=np.float64) ** 2


def effective_pressure_discrete(lr_eff, trace_sigma, grad_sq, r0):
    """Discrete-step fixed-sphere pressure λ_eff = η_eff (tr Σ + G²)/(2 r0²) (docs/theory.md §7)."""
    r0 = np.asarray(r0, dtype=np.float64)
    return np.asarray(lr_eff) * (np.asarray(trace_sigma) + np.asarray(grad_sq)) / (2.0 * r0**2)


def potential_ranks(U, S, V, T, p, groups=None):
    """Rank of each configuration under its own potential, "V2" (docs/theory.md §7).

    For configuration k: G_k(j) = U_j − T_k S_j + p_k V_j over candidates j (Gibbs; pass
    V=None or p=None for Helmholtz F = U − T S). ``groups`` (optional labels, e.g. r0)
    restricts the candidates of k to configurations in k's group. Returns (rank, gap):
    rank_k = number of candidates with G_k(j) < G_k(k) (0 = k is the minimiser) and
    gap_k = G_k(k) − min_j G_k(j) ≥ 0.
    """
    U = np.asarray(U, dtype=np.float64)
    S = np.asarray(S, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    n = U.size
    if U.ndim != 1 or not (S.shape == T.shape == U.shape):
        raise ValueError("U, S and T must be 1-D arrays with one value per configuration")
    G = U[None, :] - T[:, None] * S[None, :]
    if V is not None and p is not None:
        V = np.asarray(V, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        if V.shape != U.shape or p.shape != U.shape:
            raise ValueError("V and p must have one value per configuration, like U")
        G = G + p[:, None] * V[None, :]
    elif (V is None) != (p is None):
        raise ValueError("pass both V and p (Gibbs) or neither (Helmholtz)")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != U.shape:
            raise ValueError("groups must have one label per configuration")
        G = np.where(groups[:, None] == groups[None, :], G, np.inf)
    own = G[np.arange(n), np.arange(n)]
    rank = np.sum(G < own[:, None], axis=1)
    gap = own - G.min(axis=1)
    return rank, gap


@dataclass
class MaxwellFit:
    """Quadratic fit of S_full(x, y) and the Maxwell-relation check ("V3", docs/theory.md §7)."""
    protocol: str
    coef: np.ndarray         # c0..c5 for 1, x, y, x², y², xy
    r2: float
    ratios: tuple            # the paper's three ratios (see maxwell_fit)
    rel_err: np.ndarray      # relative error of the relation at each grid point
    rel_err_max: float
    rel_err_mean: float

    def value(self, x, y):
        """The fitted quadratic S(x, y)."""
        c = self.coef
        return c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * y**2 + c[5] * x * y

    def slopes(self, x, y):
        """(∂S/∂x, ∂S/∂y) of the fitted quadratic at (x, y)."""
        return _quadratic_slopes(self.coef, x, y)

    def ratio_at(self, x, y, D):
        """The first Maxwell ratio taken at (x, y) instead of at x = y = 0: (∂S/∂y)/R for fixed ELR,
        (∂S/∂x − ∂S/∂y)/R for fixed LR (ideal: ``maxwell_ideal``)."""
        dx, dy = self.slopes(x, y)
        return (dy if protocol_of(self.protocol).lr_is_effective else dx - dy) / gas_constant(D)


def maxwell_ideal(protocol):
    """The ideal first Maxwell ratio of ``maxwell_fit``: −1 for fixed ELR, +1 for fixed LR."""
    return -1.0 if _check_protocol(protocol, WITH_RADIUS).lr_is_effective else 1.0


def _quadratic_slopes(c, x, y):
    return c[1] + 2 * c[3] * x + c[5] * y, c[2] + 2 * c[4] * y + c[5] * x


def protocol_potential_ranks(protocol, U, S, radius, T, wd, r0):
    """The potential docs/theory.md §7 (V2) minimises for a protocol, evaluated by ``potential_ranks``:
    Helmholtz F = U − T S among configurations with the same r0 on the fixed sphere, Gibbs
    G = U − T S + p V with p = λ and V = r²/2 otherwise. Returns (rank, gap, description)."""
    if not protocol_of(protocol).uses_wd:
        rank, gap = potential_ranks(U, S, None, T, None, groups=r0)
        return rank, gap, "Helmholtz F = U − T S (same r0)"
    V = np.asarray(radius, dtype=float) ** 2 / 2
    rank, gap = potential_ranks(U, S, V, T, wd)
    return rank, gap, "Gibbs G = U − T S + pV (p = λ, V = r²/2)"


def protocol_potential_ranks_where(ok, protocol, U, S, radius, T, wd, r0):
    """``protocol_potential_ranks`` among the configurations where ``ok`` only (and, for Gibbs, whose
    radius is known: V = r²/2 enters every candidate's G): rank and gap are NaN for the others, and
    the description is None (nothing ranked) when fewer than 2 qualify."""
    ok = np.asarray(ok, dtype=bool)
    if protocol_of(protocol).uses_wd:
        ok = ok & np.isfinite(np.asarray(radius, dtype=float))
    rank, gap = np.full(ok.size, np.nan), np.full(ok.size, np.nan)
    if ok.sum() < 2:
        return rank, gap, None
    rank[ok], gap[ok], kind = protocol_potential_ranks(
        protocol, *(np.asarray(a, dtype=float)[ok] for a in (U, S, radius, T, wd, r0)))
    return rank, gap, kind


def maxwell_fit(x, y, S_full, D, protocol):
    """Fit S = c0 + c1 x + c2 y + c3 x² + c4 y² + c5 xy and check a Maxwell relation (docs/theory.md §7).

    x = ln η (or ln η_eff), y = ln λ; R = (D − 1)/2.
    fixed_elr: ∂S/∂y = −R. ratios = (c2/R, 2c4/R, c5/R) (ideal −1, 0, 0);
        rel_err = |∂S/∂y + R| / R at each point.
    fixed_lr: ∂S/∂x − ∂S/∂y = R. ratios = ((c1−c2)/R, (2c3−c5)/(c1−c2), (2c4−c5)/(c1−c2))
        (ideal 1, 0, 0); rel_err = |(∂S/∂x − ∂S/∂y) − R| / R.
    Derivatives come from the fitted quadratic, evaluated at the given (x, y).
    """
    proto = _check_protocol(protocol, WITH_RADIUS)
    R = gas_constant(D)
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    s = np.asarray(S_full, dtype=np.float64).ravel()
    if not (x.size == y.size == s.size):
        raise ValueError("x, y and S_full must have the same number of points")
    if not np.all(np.isfinite(x) & np.isfinite(y) & np.isfinite(s)):
        raise ValueError("x, y and S_full must be finite; drop diverged configurations first")
    A = np.stack([np.ones_like(x), x, y, x**2, y**2, x * y], axis=1)
    if np.linalg.matrix_rank(A) < 6:
        raise ValueError("the (x, y) points cannot determine a full quadratic; "
                         "use a 2-D grid with >= 3 distinct values of each of x and y")
    c, *_ = np.linalg.lstsq(A, s, rcond=None)
    resid = s - A @ c
    ss_tot = np.sum((s - s.mean()) ** 2)
    r2 = float(1.0 - np.sum(resid**2) / ss_tot) if ss_tot > 0 else float("nan")
    dSdx, dSdy = _quadratic_slopes(c, x, y)
    if proto.lr_is_effective:
        ratios = (c[2] / R, 2 * c[4] / R, c[5] / R)
        rel = np.abs(dSdy + R) / R
    else:
        d = c[1] - c[2]
        ratios = (d / R, (2 * c[3] - c[5]) / d, (2 * c[4] - c[5]) / d)
        rel = np.abs(dSdx - dSdy - R) / R
    return MaxwellFit(protocol, c, r2, tuple(float(v) for v in ratios), rel,
                      float(rel.max()), float(rel.mean()))


def adiabatic_spread(lr, wd, S):
    """Spread of S across λ at each fixed η, "V4" (docs/theory.md §7, fixed LR).

    In the isotropic model with fixed LR, S depends on η only, so the spread should vanish.
    Returns (unique_lrs, spread) with spread = max − min of S over the configurations
    sharing that η (0 when only one λ is present). ``wd`` only checks the grid shape.
    """
    lr = np.asarray(lr, dtype=np.float64).ravel()
    wd = np.asarray(wd, dtype=np.float64).ravel()
    S = np.asarray(S, dtype=np.float64).ravel()
    if not (lr.size == wd.size == S.size):
        raise ValueError("lr, wd and S must have one value per configuration")
    etas, inv = np.unique(lr, return_inverse=True)
    spread = np.array([np.ptp(S[inv == k]) for k in range(etas.size)])
    return etas, spread
