"""Batch size as a studied axis (issue #12): does the temperature depend on η/B only?

Model (docs/theory.md §10 "Batch size"): T ≈ b · η^a · B^c, fitted by ordinary least squares of
ln T = ln b + a ln η + c ln B over every (η, B) point with a positive finite T. The coefficient
covariance is s² (XᵀX)⁻¹ with s² = RSS/(n − 3), and every interval is a Student-t interval with n − 3
degrees of freedom at ``level`` (default 90 %).

The test. Under the power law, T is a function of η/B alone exactly when c = −a (then
T = b (η/B)^a). So the verdict is read from the interval of a + c, whose standard error comes from
the covariance (var a + var c + 2 cov(a, c)), not from c alone:
  * the interval of a + c excludes 0                         → "T does not depend on η/B only";
  * it contains 0 and its half-width is ≤ ``tight`` · |a|    → "T depends on η/B only";
  * it contains 0 but is wider than that                     → "inconclusive" (too few points or
    too much scatter to tell a dependence on η/B from one on η alone).
The line also says whether c's interval holds −1, the stronger T ∝ η/B of the free-energy paper's
summary (which needs a = 1 as well).

The report section is analysis.sections.batch_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

LEVEL = 0.9
TIGHT = 0.25


@dataclass(frozen=True)
class BatchFit:
    a: float                # exponent of η
    c: float                # exponent of B
    b: float                # prefactor
    cov: np.ndarray         # covariance of (ln b, a, c)
    dof: int                # n − 3
    level: float
    tq: float               # t quantile of the intervals
    n: int
    r2: float

    @property
    def se_a(self):
        return math.sqrt(self.cov[1, 1])

    @property
    def se_c(self):
        return math.sqrt(self.cov[2, 2])

    @property
    def se_sum(self):
        """Standard error of a + c."""
        return math.sqrt(max(self.cov[1, 1] + self.cov[2, 2] + 2 * self.cov[1, 2], 0.0))

    @property
    def half_a(self):
        return self.tq * self.se_a

    @property
    def half_c(self):
        return self.tq * self.se_c

    @property
    def half_sum(self):
        return self.tq * self.se_sum

    def verdict(self, tight=TIGHT) -> str:
        """'eta_over_B', 'not_eta_over_B' or 'inconclusive' (see the module docstring)."""
        s = self.a + self.c
        if abs(s) > max(self.half_sum, 1e-9 * abs(self.a)):   # floor: an exact fit has no width
            return "not_eta_over_B"
        return "eta_over_B" if self.half_sum <= tight * abs(self.a) else "inconclusive"

    def verdict_line(self, tight=TIGHT) -> str:
        v = self.verdict(tight)
        head = {"eta_over_B": "T depends on η/B only",
                "not_eta_over_B": "T does not depend on η/B only",
                "inconclusive": "inconclusive whether T depends on η/B only"}[v]
        pct = f"{round(100 * self.level)} %"
        minus_one = "holds" if abs(self.c + 1) <= self.half_c else "excludes"
        return (f"{head}: c = {self.c:.3g} ± {self.half_c:.2g} (a = {self.a:.3g} ± {self.half_a:.2g}, "
                f"a + c = {self.a + self.c:.3g} ± {self.half_sum:.2g}; {pct} t-intervals, "
                f"{self.n} points; c's interval {minus_one} −1)")

    def predict(self, lr, B):
        return self.b * np.asarray(lr, float) ** self.a * np.asarray(B, float) ** self.c


def fit_batch_power_law(lr, B, T, level=LEVEL) -> BatchFit:
    """Least squares of ln T on (1, ln η, ln B); points with a non-positive or non-finite value are
    ignored. Needs ≥ 2 distinct B, ≥ 2 distinct η and ≥ 4 points (one residual degree of freedom)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lr, B, T = (np.asarray(v, dtype=float).ravel() for v in (lr, B, T))
    if not lr.size == B.size == T.size:
        raise ValueError(f"lr ({lr.size}), B ({B.size}) and T ({T.size}) need one value per point")
    ok = np.isfinite(lr) & np.isfinite(B) & np.isfinite(T) & (lr > 0) & (B > 0) & (T > 0)
    lr, B, T = lr[ok], B[ok], T[ok]
    if np.unique(B).size < 2 or np.unique(lr).size < 2:
        raise ValueError(f"the batch-size fit needs ≥ 2 batch sizes and ≥ 2 learning rates with a "
                         f"positive temperature; got {np.unique(B).size} and {np.unique(lr).size}")
    X = np.column_stack([np.ones(lr.size), np.log(lr), np.log(B)])
    if lr.size < 4 or np.linalg.matrix_rank(X) < 3:
        raise ValueError(f"{lr.size} point(s) cannot separate the η and B exponents (need ≥ 4 points "
                         "not all on one line η ∝ B^k); add learning rates per batch size")
    y = np.log(T)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    dof = lr.size - 3
    s2 = float(resid @ resid) / dof
    cov = s2 * np.linalg.inv(X.T @ X)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else math.nan
    return BatchFit(a=float(coef[1]), c=float(coef[2]), b=float(math.exp(coef[0])), cov=cov, dof=dof,
                    level=level, tq=float(student_t.ppf((1 + level) / 2, dof)), n=int(lr.size), r2=r2)


# -----------------------------------------------------------------------------
# temperatures of a sweep, per batch size

def free_energy_points(tab, entropy_key, opts, rep_axes=()) -> list:
    """§5 temperatures per (group of the other axes, B): seeds averaged per η (as the §5 section
    does for members sharing an η), then ``fit_temperature``; the interior segment points (those the
    §5 power law uses). Returns (rows, notes)."""
    from analysis.free_energy import fit_temperature
    from analysis.sections.common import group_members

    rows, notes = [], []
    for label, g in group_members(tab, ("lr", "batch_size", *rep_axes)):
        for B, gb in g.groupby("batch_size", sort=True):
            agg = gb.dropna(subset=["train_loss", entropy_key]).groupby("lr")[["train_loss", entropy_key]].mean()
            if len(agg) < 3:
                notes.append(f"group {label}, B = {B}: {len(agg)} LR(s) with U and S; need ≥ 3")
                continue
            try:
                fit = fit_temperature(agg.index.to_numpy(float), agg["train_loss"].to_numpy(float),
                                      agg[entropy_key].to_numpy(float), opts.eps, h=opts.h,
                                      lr_range=opts.lr_range)
            except ValueError as e:
                notes.append(f"group {label}, B = {B}: temperature fit failed: {e}")
                continue
            rows += [{"group": label, "source": f"free energy ({entropy_key})", "batch_size": int(B),
                      "lr": float(lr), "T": float(T)} for lr, T in zip(fit.lrs[1:-1], fit.T[1:-1])]
    return rows, notes


def ideal_gas_points(tab, rep_axes=()) -> list:
    """§7 temperatures (T = η_eff σ²/2, or the fixed-LR form) per member, averaged over seeds."""
    from analysis.replicates import ideal_gas_predictions
    from analysis.sections.common import group_members

    t = ideal_gas_predictions(tab)
    if "T_ig" not in t.columns:
        return []
    rows = []
    for label, g in group_members(t.dropna(subset=["T_ig"]), ("lr", "batch_size", *rep_axes)):
        for (B, lr), gl in g.groupby(["batch_size", "lr"], sort=True):
            rows.append({"group": label, "source": "ideal gas (σ²)", "batch_size": int(B),
                         "lr": float(lr), "T": float(gl["T_ig"].mean())})
    return rows
