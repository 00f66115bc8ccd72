"""Free energy and temperature from a learning-rate grid (docs/theory.md §5).

Pure numpy: every function takes arrays of stationary values over a sorted LR grid
(U = stationary train loss, S = stationary entropy) and returns arrays, floats or a
dataclass. No MLflow, no plotting.

Pipeline (``fit_temperature`` runs it in one call):
    1. ``select_stationary_segment``  – which LRs are stationary (auto rule or LR range)
    2. ``smooth_log_triangular``      – triangular kernel in ln(LR), h = 0.3
    3. ``temperature_intervals``      – [lower, upper] per LR, empty intervals flagged
       ``temperature_estimate``       – geometric mean of the bounds
    4. ``power_law_fit``              – T ≈ b · η^a over the interior points
    5. ``free_energy_curves`` / ``curve_minima``
    6. ``temperature_along_training`` – T_t for converging runs (+ ``smooth_log_gaussian``)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# -----------------------------------------------------------------------------
# input helpers

def _as_1d(name, values):
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}; pass one value per LR")
    return a


def _check_grid(lrs, *named):
    """Validate a sorted LR grid and same-length companions; return float64 arrays."""
    lrs = _as_1d("lrs", lrs)
    if not np.all(np.isfinite(lrs)) or np.any(lrs <= 0):
        raise ValueError("lrs must be finite and > 0 (they are used in ln η); drop invalid LRs first")
    if np.any(np.diff(lrs) <= 0):
        raise ValueError("lrs must be strictly increasing; sort the grid (and U, S with it) first")
    out = [lrs]
    for name, v in named:
        a = _as_1d(name, v)
        if a.shape != lrs.shape:
            raise ValueError(f"{name} has {a.size} values but lrs has {lrs.size}; they must match")
        out.append(a)
    return out


# -----------------------------------------------------------------------------
# step 2: smoothing

def smooth_log_triangular(lrs, values, h=0.3):
    """Triangular-kernel smoothing in natural-log LR (docs/theory.md §5 step 2).

    w_ij = max(0, h − |ln η_i − ln η_j|), each row normalised; the first and last
    point keep their raw values. The diagonal weight is h > 0, so rows never vanish.
    """
    lrs, values = _check_grid(lrs, ("values", values))
    if not h > 0:
        raise ValueError(f"h must be > 0 (kernel half-width in ln η), got {h}")
    x = np.log(lrs)
    w = np.maximum(0.0, h - np.abs(x[:, None] - x[None, :]))
    out = (w @ values) / w.sum(axis=1)
    if values.size:
        out[0], out[-1] = values[0], values[-1]
    return out


def smooth_log_gaussian(iters, values, sigma=0.2):
    """Gaussian smoothing in natural-log iteration (docs/theory.md §5 step 6, CIFAR-100 variant).

    w_ij = exp(−(ln t_i − ln t_j)² / (2σ²)), rows normalised (boundary points included,
    so they are pulled towards their one-sided neighbours). ``values`` may be 1-D or
    (..., len(iters)); smoothing acts on the last axis.
    """
    t = _as_1d("iters", iters)
    if np.any(t <= 0) or not np.all(np.isfinite(t)):
        raise ValueError("iters must be finite and > 0 for ln t; drop iteration 0 first")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    v = np.asarray(values, dtype=np.float64)
    if v.shape[-1:] != t.shape:
        raise ValueError(f"values' last axis ({v.shape}) must match iters ({t.size} entries)")
    x = np.log(t)
    w = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2.0 * sigma**2))
    w /= w.sum(axis=1, keepdims=True)
    return v @ w.T


# -----------------------------------------------------------------------------
# step 3: temperature intervals

def temperature_intervals(lrs, U, S, eps):
    """Per-LR temperature interval (docs/theory.md §5 step 3).

    For each i, T must satisfy U_i − T S_i ≤ U_j − T S_j + ε for every j in the segment.
    Conventions (those of the papers' code, plus our flag):

    * Bounds are ordered by LR index, not by the sign of S_j − S_i: every j > i gives an
      upper bound (U_j − U_i + ε)/(S_j − S_i), every j < i a lower bound
      (U_i − U_j − ε)/(S_i − S_j); upper = min, lower = max. If S_j = S_i the constraint
      does not involve T; it gives no bound (but makes the interval empty if violated).
    * The lower bound is floored at 0 (T ≥ 0).
    * Where no positive lower bound exists (lower ≤ 0, including the first LR, which has no
      j < i), lower is set equal to upper.
    * A point with no upper bound (the last LR, which has no j > i) takes upper = lower.
      If it also has no positive lower bound, nothing bounds it and both are NaN.
    * ``empty`` flags intervals with no admissible T ≥ 0, judged on the raw bounds before
      the two substitutions above: max(lower_raw, 0) > upper_raw (a missing side counts as
      unbounded), or a T-independent constraint is violated. The papers did not flag these.

    Returns (lower, upper, empty) as arrays of len(lrs).
    """
    lrs, U, S = _check_grid(lrs, ("U", U), ("S", S))
    if not (np.all(np.isfinite(U)) and np.all(np.isfinite(S))):
        raise ValueError("U and S must be finite on the segment; drop non-finite LRs first")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (tolerance in loss units), got {eps}")
    n = lrs.size
    lower = np.full(n, -np.inf)
    upper = np.full(n, np.inf)
    violated = np.zeros(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if j == i:
                continue
            dS = S[j] - S[i]
            if dS == 0.0:
                violated[i] |= U[i] > U[j] + eps
            elif j > i:
                upper[i] = min(upper[i], (U[j] - U[i] + eps) / dS)
            else:
                lower[i] = max(lower[i], (U[i] - U[j] - eps) / (S[i] - S[j]))
    empty = violated | (np.maximum(lower, 0.0) > upper)

    lower = np.maximum(lower, 0.0)
    no_pos = lower <= 0.0
    lower[no_pos] = upper[no_pos]
    no_up = ~np.isfinite(upper)
    upper[no_up] = lower[no_up]
    unbounded = ~np.isfinite(lower) | ~np.isfinite(upper)
    lower[unbounded] = np.nan
    upper[unbounded] = np.nan
    return lower, upper, empty


def temperature_estimate(lower, upper):
    """Point estimate sqrt(lower · upper) (docs/theory.md §5 step 3); NaN unless both bounds > 0."""
    lo = np.asarray(lower, dtype=np.float64)
    up = np.asarray(upper, dtype=np.float64)
    if lo.shape != up.shape:
        raise ValueError(f"lower {lo.shape} and upper {up.shape} must have the same shape")
    ok = np.isfinite(lo) & np.isfinite(up) & (lo > 0) & (up > 0)
    return np.where(ok, np.sqrt(np.where(ok, lo * up, 1.0)), np.nan)


def hypothesis_holds(lower, upper, T, empty=None):
    """The free-energy hypothesis on a segment (docs/theory.md §5 step 3).

    True iff every interval is non-empty (lower ≤ upper, finite, and not flagged in
    ``empty`` when given) and the estimates T are finite and strictly increasing in η.
    """
    lo = _as_1d("lower", lower)
    up = _as_1d("upper", upper)
    T = _as_1d("T", T)
    if not (lo.shape == up.shape == T.shape):
        raise ValueError("lower, upper and T must have the same length")
    ok = bool(np.all(np.isfinite(lo) & np.isfinite(up) & (lo <= up)))
    if empty is not None:
        ok &= not bool(np.any(np.asarray(empty, dtype=bool)))
    ok &= bool(np.all(np.isfinite(T))) and bool(np.all(np.diff(T) > 0))
    return ok


# -----------------------------------------------------------------------------
# step 4: power law

def power_law_fit(x, y):
    """Least-squares fit of y ≈ b · x^a in natural log–log space (docs/theory.md §5 step 4).

    Points with a non-finite or non-positive x or y are ignored. Returns (a, b).
    """
    x = _as_1d("x", x)
    y = _as_1d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x ({x.size}) and y ({y.size}) must have the same length")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2:
        raise ValueError(f"power_law_fit needs >= 2 points with finite positive x and y, "
                         f"got {int(ok.sum())}; widen the segment or check the temperatures")
    lx, ly = np.log(x[ok]), np.log(y[ok])
    if np.ptp(lx) == 0:
        raise ValueError("power_law_fit needs at least two distinct x values")
    a, log_b = np.polyfit(lx, ly, 1)
    return float(a), float(np.exp(log_b))


def power_law_slope_se(x, y):
    """Standard error of the exponent a of ``power_law_fit`` (the same points): the least-squares slope's
    s.e. in log–log space, sqrt(Σ residual² / (n − 2) / Σ (log x − mean)²). NaN with fewer than 3 points
    (two points fit exactly and say nothing about the scatter)."""
    x, y = _as_1d("x", x), _as_1d("y", y)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    if lx.size < 3 or np.ptp(lx) == 0:
        return float("nan")
    a, log_b = np.polyfit(lx, ly, 1)
    residual = ly - (a * lx + log_b)
    return float(np.sqrt(residual @ residual / (lx.size - 2) / np.sum((lx - lx.mean()) ** 2)))


# -----------------------------------------------------------------------------
# step 5: free-energy curves

def free_energy_curves(U, S, T):
    """F[i, j] = U_j − T_i S_j (docs/theory.md §5 step 5): one curve per temperature T_i."""
    U = _as_1d("U", U)
    S = _as_1d("S", S)
    T = _as_1d("T", T)
    if U.shape != S.shape:
        raise ValueError("U and S must have the same length")
    return U[None, :] - T[:, None] * S[None, :]


def curve_minima(F):
    """Index of each curve's minimum (argmin along axis 1); −1 for a curve with no finite value."""
    F = np.asarray(F, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"F must be 2-D (temperatures × LRs), got shape {F.shape}")
    finite = np.isfinite(F)
    idx = np.argmin(np.where(finite, F, np.inf), axis=1)
    return np.where(finite.any(axis=1), idx, -1)


# -----------------------------------------------------------------------------
# step 1: stationary segment

def select_stationary_segment(lrs, U, S, lr_range=None, sat_tol=0.02, rtol=1e-6):
    """Indices (into the sorted grid) of the stationary segment (docs/theory.md §5 step 1).

    Non-finite U or S are always dropped (diverged or missing runs).

    Manual override: ``lr_range=(lo, hi)`` keeps lo ≤ η ≤ hi, both ends included, with a
    relative tolerance ``rtol`` so that e.g. 10**-3.75 matches the grid value however it
    was computed.

    Automatic rule (our choice, deliberately simple), on the finite points:
      * tail: S saturates in the random-walk regime. Let S_max, S_min be the extremes;
        find the first LR whose S is within ``sat_tol·(S_max − S_min)`` of S_max and drop
        every larger LR (the first saturated point is kept as the segment's right end).
      * head: small LRs that have not stabilised or converge to a minimum show an S that
        does not grow with η. Drop leading points while S does not increase to the next
        point (S_{i+1} ≤ S_i).
    The result is contiguous in the finite points. Fewer than 2 points is an error.
    """
    lrs, U, S = _check_grid(lrs, ("U", U), ("S", S))
    finite = np.flatnonzero(np.isfinite(U) & np.isfinite(S))

    if lr_range is not None:
        lo, hi = lr_range
        if not (0 < lo <= hi):
            raise ValueError(f"lr_range must be (lo, hi) with 0 < lo <= hi, got {lr_range}")
        keep = (lrs >= lo * (1 - rtol)) & (lrs <= hi * (1 + rtol))
        idx = finite[keep[finite]]
    else:
        if finite.size < 2:
            raise ValueError("fewer than 2 LRs with finite U and S; nothing to select")
        s = S[finite]
        span = s.max() - s.min()
        end = int(np.flatnonzero(s >= s.max() - sat_tol * span)[0])
        start = 0
        while start < end and s[start + 1] <= s[start]:
            start += 1
        idx = finite[start:end + 1]

    if idx.size < 2:
        raise ValueError(f"the stationary segment has {idx.size} point(s); need >= 2. "
                         "Pass lr_range=(lo, hi) to choose it by hand")
    return idx


# -----------------------------------------------------------------------------
# step 6: temperature along training

def temperature_along_training(U_series, S_series, delta=2, last=100):
    """Finite-difference temperature over log steps (docs/theory.md §5 step 6).

    T_t = (U_{t+Δ} − U_{t−Δ}) / (S_{t+Δ} − S_{t−Δ}) over the last ``last`` logs (along the
    last axis). Entry k of the result belongs to log index n − m + Δ + k, where n is the
    series length and m = min(last, n); the result has m − 2Δ entries.
    """
    U = np.asarray(U_series, dtype=np.float64)
    S = np.asarray(S_series, dtype=np.float64)
    if U.shape != S.shape:
        raise ValueError(f"U_series {U.shape} and S_series {S.shape} must have the same shape")
    if int(delta) != delta or delta < 1:
        raise ValueError(f"delta must be a positive integer, got {delta}")
    m = min(int(last), U.shape[-1])
    if m < 2 * delta + 1:
        raise ValueError(f"need at least 2·delta+1 = {2 * delta + 1} logs, got {m}")
    U, S = U[..., -m:], S[..., -m:]
    dU = U[..., 2 * delta:] - U[..., :-2 * delta]
    dS = S[..., 2 * delta:] - S[..., :-2 * delta]
    with np.errstate(divide="ignore", invalid="ignore"):
        return dU / dS


# -----------------------------------------------------------------------------
# one call

@dataclass
class TemperatureFit:
    """Everything ``fit_temperature`` computes; arrays are over the segment."""
    indices: np.ndarray      # segment indices into the input grid
    lrs: np.ndarray
    U_raw: np.ndarray
    S_raw: np.ndarray
    U: np.ndarray            # smoothed
    S: np.ndarray            # smoothed
    lower: np.ndarray
    upper: np.ndarray
    T: np.ndarray            # geometric-mean estimates
    empty: np.ndarray        # True where the interval has no admissible T
    a: float                 # exponent of T ≈ b η^a (NaN if not fittable)
    b: float                 # prefactor
    minima: np.ndarray       # argmin of each free-energy curve F_i (index into the segment)
    holds: bool
    a_se: float = float("nan")   # least-squares standard error of a (power_law_slope_se)


def fit_temperature(lrs, U, S, eps, h=0.3, lr_range=None, **segment_kwargs):
    """Run docs/theory.md §5 steps 1–5 on a sorted LR grid and bundle the results.

    The power law is fitted over the interior points of the segment (its two ends
    excluded); a and b are NaN when fewer than 2 interior points have a positive finite T.
    """
    lrs, U, S = _check_grid(lrs, ("U", U), ("S", S))
    idx = select_stationary_segment(lrs, U, S, lr_range=lr_range, **segment_kwargs)
    seg_lr, U_raw, S_raw = lrs[idx], U[idx], S[idx]
    Us = smooth_log_triangular(seg_lr, U_raw, h)
    Ss = smooth_log_triangular(seg_lr, S_raw, h)
    lower, upper, empty = temperature_intervals(seg_lr, Us, Ss, eps)
    T = temperature_estimate(lower, upper)
    try:
        a, b = power_law_fit(seg_lr[1:-1], T[1:-1])
    except ValueError:
        a, b = float("nan"), float("nan")
    minima = curve_minima(free_energy_curves(Us, Ss, T))  # NaN T -> -1
    return TemperatureFit(idx, seg_lr, U_raw, S_raw, Us, Ss, lower, upper, T, empty,
                          a, b, minima, hypothesis_holds(lower, upper, T, empty),
                          power_law_slope_se(seg_lr[1:-1], T[1:-1]))
