"""The isotropic-noise (vMF) toy's member table and summary for the ``vmf`` report sections
(docs/theory.md §§7, 8). A helper module of the sections package (no SECTIONS).

Stationary values of the vMF toy (docs/theory.md §8, our reading for the engine's logs): the runner
reports ``train_loss``, ``radius`` and ``radius_preproj`` as the mean of the running values
(every 50 iterations) since the previous log step, so "the last 5000 running values" (250k
iterations) is the mean of the last round(250k / Δ) log rows (Δ = log spacing, 6 rows at 40k);
r̃ uses 150k iterations (docs/theory.md §7, 3000 running logs; 4 rows at 40k). S = mean of the last
10 entropy evaluations. On a short run the windows are capped at half of the logged rows.

The summary statistics are taken on the grid's interior: the smallest and the largest value of
each of the two grid axes are dropped (``INTERIOR_DROP`` values at each end). The temperature and
the radius and pressure predictions are analysis.ideal_gas's, with σ = the toy's ``noise``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import poisson
from scipy.stats import t as student_t

from analysis import ideal_gas
from analysis.sections.common import Options, column, finite_rows, finite_stat, rel_err, split_by_member
from trainables.protocols import protocol as protocol_of
from trainables.toys.vmf import vmf_entropy, vmf_loss, vmf_mean_cos

U_WINDOW_ITERS = Options.toy_u_window              # §8: last 5000 running values every 50 iterations
PRESSURE_WINDOW_ITERS = Options.toy_pressure_window  # §7: r̃ over the last 3000 running logs
ENTROPY_LAST = 10              # §8: S = mean of the last 10 entropy evaluations
INTERIOR_DROP = 1              # grid values dropped at each end of each axis for the summary
THRESHOLDS = {                 # acceptance thresholds of the toy reproduction
    "U_rel_median": 0.02,                         # |U − U_exact|/U_exact, reported alongside (§8)
    "S_abs_median": 0.1, "S_abs_max": 0.3,        # |S_sphere − S_exact| in nats
    "radius_rel_max": 0.03,                       # radius (ELR/LR) or λ_eff (sphere) vs SDE
    "maxwell_ratio": 0.03,                        # |ratio − ideal| (ideal −1 ELR, +1 LR)
}
# U is judged statistically (docs/theory.md §8 "Judging a simulated U", 2026-12-02): z = (U_sim − U_ref)/s.e.
# with U_ref the first-order discrete-step U for fixed η_eff (ELR, sphere), the exact vMF U for fixed LR
Z_LIMIT = 3.0                  # an outlier: |z| > 3
Z_MEDIAN_MAX = 1.0             # median |z| ≲ 1 (≈ 0.68 for pure sampling noise)
Z_MARGIN = 2.0                 # correlated batch means: allow twice the chance rate of outliers ...
Z_QUANTILE = 0.99              # ... up to the 99 % Poisson quantile of that count


def tail_rows(iterations, values, window_iters):
    """The last log rows that cover ``window_iters`` iterations.

    Each row is a running mean since the previous log step, so the row count is
    round(window_iters / Δ) with Δ the median log spacing; at least 1 row, at most half of the
    rows (the first half of a short run is burn-in). NaN values are dropped first.
    """
    it = np.asarray(iterations, dtype=float)
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v) & np.isfinite(it)
    it, v = it[ok], v[ok]
    if v.size <= 1:
        return v
    delta = float(np.median(np.diff(it[-min(it.size, 20):])))
    n = int(round(window_iters / delta)) if delta > 0 else 1
    return v[-max(1, min(n, v.size // 2)):]


def tail_mean(iterations, values, window_iters):
    """(mean, number of rows) of ``tail_rows``."""
    v = tail_rows(iterations, values, window_iters)
    return (float(v.mean()) if v.size else float("nan")), int(v.size)


def batch_sem(rows):
    """Standard error of the mean of log rows treated as independent batch means (each row averages
    a whole log interval, far longer than the toy's correlation time); NaN below 5 rows."""
    rows = np.asarray(rows, dtype=float)
    return float(rows.std(ddof=1) / math.sqrt(rows.size)) if rows.size >= 5 else float("nan")


def last_mean(values, k):
    """(mean, standard error, count) of the last ``k`` finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)][-k:]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), sem, int(v.size)


def interior_mask(a, b, drop=INTERIOR_DROP):
    """True where a and b both lie strictly inside their grids (``drop`` values cut at each end)."""
    keep = np.ones(len(a), dtype=bool)
    for col in (np.asarray(a, dtype=float), np.asarray(b, dtype=float)):
        u = np.unique(col)
        if u.size > 2 * drop:
            keep &= np.isin(col, u[drop:u.size - drop])
    return keep



def vmf_member_table(sweep, members, u_window=U_WINDOW_ITERS, p_window=PRESSURE_WINDOW_ITERS,
                     entropy_last=ENTROPY_LAST):
    """One row per vMF member: T, κ, simulated vs exact U and S_sphere, radius / pressure.

    ``members``: rows of one protocol from ``member_table`` (or of ``sweep.members`` with the
    ``radius`` param renamed ``r0``).
    Exact values come from docs/theory.md §8 (vmf_loss, vmf_entropy at κ = 1/T, T from §7).
    Windows: iterations averaged for U and r (``u_window``) and for r̃ (``p_window``), entropy
    evaluations averaged for S (``entropy_last``); the report passes its Options.
    """
    protocols = members["protocol"].unique()
    if len(protocols) != 1:
        raise ValueError(f"vmf_member_table needs one protocol, got {list(protocols)}")
    proto = protocol_of(protocols[0])
    t = _params(members, proto.name)
    D = int(t["D"].iloc[0])
    t["T"] = ideal_gas.temperature(proto.name, t["lr"].to_numpy(), t["wd"].to_numpy(),
                                   t["noise"].to_numpy() ** 2, D)
    with np.errstate(divide="ignore"):
        t["kappa"] = np.where(t["T"] > 0, 1.0 / t["T"], np.nan)
    by_member = split_by_member(sweep.series, members.index)
    measured = [_measured(by_member.get(rid), proto, u_window, p_window, entropy_last) for rid in members.index]
    t = pd.concat([t, pd.DataFrame(measured)], axis=1)
    ok = (t["T"] > 0).to_numpy()
    _exact_values(t, ok, D, proto)
    G2 = _exact_grad_sq(t, ok, D)
    if proto.uses_wd:
        _radius_columns(t, proto, D, G2)
    else:
        _pressure_columns(t, D, G2)
    t["interior"] = interior_mask(t["lr"], t[column(proto.second_axis)])
    return t


def _params(members, protocol):
    """The members' parameters (a param missing from every member takes the toy's default; D is logged
    once a run has started, the dim param stands in for it before that)."""
    def param(k, default):
        return members[k].to_numpy(float) if k in members else np.full(len(members), default)

    D = pd.to_numeric(members.get("D", pd.Series(np.nan, index=members.index)), errors="coerce")
    t = pd.DataFrame({"run_id": members.index, "protocol": protocol, "lr": members["lr"].to_numpy(float),
                      "wd": param("wd", 0.0), "r0": param("r0", 1.0),
                      "D": D.fillna(members.get("dim", 3)).to_numpy(int), "noise": param("noise", 1.0)})
    if t["D"].nunique() != 1:
        raise ValueError(f"members of one table must share D (dim), got {sorted(t['D'].unique())}")
    return t


def _measured(series, proto, u_window, p_window, entropy_last):
    """One member's simulated stationary values from its series rows (None: no rows)."""
    row = {}
    it, (U,) = finite_rows(series, "train_loss")
    rows_u = tail_rows(it, U, u_window)
    row["U_sim"] = float(rows_u.mean()) if rows_u.size else float("nan")
    row["U_rows"], row["U_sem"] = int(rows_u.size), batch_sem(rows_u)
    _, (S,) = finite_rows(series, "entropy_kl_sphere")
    row["S_sim"], row["S_sem"], row["S_evals"] = last_mean(S, entropy_last)
    _, (Sf,) = finite_rows(series, "entropy_kl_full")
    row["S_full"], row["S_full_sem"], _ = last_mean(Sf, entropy_last)
    it, (r,) = finite_rows(series, "radius")
    row["radius"], _ = tail_mean(it, r, u_window)
    if not proto.uses_wd:
        it, (rp,) = finite_rows(series, "radius_preproj")
        row["r_tilde"], row["r_tilde_rows"] = tail_mean(it, rp, p_window)
    return row


def _exact_values(t, ok, D, proto):
    """Exact vMF U and S at κ = 1/T, the errors of the simulation, and U's z-scores against them."""
    t["U_exact"] = np.nan
    t["S_exact"] = np.nan
    if ok.any():
        t.loc[ok, "U_exact"] = vmf_loss(t.loc[ok, "kappa"].to_numpy(), D)
        t.loc[ok, "S_exact"] = vmf_entropy(t.loc[ok, "kappa"].to_numpy(), D)
    t["U_rel_err"] = rel_err(t["U_sim"], t["U_exact"])
    # U's distance from the exact value in units of its own sampling error (batch means of the rows)
    t["U_z"] = (t["U_sim"] - t["U_exact"]) / t["U_sem"]
    if proto.lr_is_effective:
        _discrete_u(t, ok, D)
    t["S_abs_err"] = np.abs(t["S_sim"] - t["S_exact"])


def _discrete_u(t, ok, D):
    """Our addition, informative, first order in η_eff: with a fixed η_eff the direction makes discrete
    steps whose tangent components follow x ← (1 − η_eff) x + η_eff σ ξ near the minimum, of
    stationary variance η_eff σ²/(2 − η_eff): the vMF law at T/(1 − η_eff/2). Higher orders (the
    projection's shrinking of each step) are left out; meaningless for η_eff ≥ 1, where it is not
    computed."""
    t["U_discrete"] = np.nan
    small = ok & (t["lr"] < 1).to_numpy()
    if small.any():
        kd = t.loc[small, "kappa"].to_numpy() * (1 - t.loc[small, "lr"].to_numpy() / 2)
        t.loc[small, "U_discrete"] = vmf_loss(kd, D)
    t["U_discrete_rel_err"] = rel_err(t["U_sim"], t["U_discrete"])
    t["U_discrete_z"] = (t["U_sim"] - t["U_discrete"]) / t["U_sem"]


def _exact_grad_sq(t, ok, D):
    """G² = E|μ_tangent|² = 1 − E[cos²] = (D − 1) A_D(κ)/κ under the vMF law (our addition, for §7's
    discrete-step correction; informative only); stored as ``grad_sq_exact``."""
    G2 = np.full(len(t), np.nan)
    if ok.any():
        kap = t.loc[ok, "kappa"].to_numpy()
        G2[ok] = (D - 1) * vmf_mean_cos(kap, D) / kap
    t["grad_sq_exact"] = G2
    return G2


def _pressure_columns(t, D, G2):
    """Fixed sphere: measured effective pressure against the SDE and discrete-step predictions, with
    this toy's exact tr Σ = σ²(D − 1)."""
    tr_sigma = t["noise"] ** 2 * (D - 1)
    t["p_measured"] = ideal_gas.effective_pressure(t["r_tilde"], t["r0"], t["lr"])
    t["p_predicted"] = ideal_gas.effective_pressure_prediction(t["T"], D, t["r0"])
    t["p_discrete"] = ideal_gas.effective_pressure_discrete(t["lr"], tr_sigma, G2, t["r0"])
    t["radius_rel_err"] = rel_err(t["p_measured"], t["p_predicted"])
    t["discrete_rel_err"] = rel_err(t["p_measured"], t["p_discrete"])


def _radius_columns(t, proto, D, G2):
    """λ applies: measured stationary radius against the SDE and discrete-step predictions (λ > 0)."""
    tr_sigma = t["noise"] ** 2 * (D - 1)
    pos = (t["wd"] > 0).to_numpy()
    t["r_predicted"] = np.nan
    t["r_discrete"] = np.nan
    if pos.any():
        tp = t[pos]
        t.loc[pos, "r_predicted"] = ideal_gas.radius_sde(proto.name, tp["lr"], tp["wd"], tp["noise"] ** 2, D)
        t.loc[pos, "r_discrete"] = ideal_gas.radius_discrete(proto.name, tp["lr"], tp["wd"], tr_sigma[pos],
                                                             G2[pos])
    t["radius_rel_err"] = rel_err(t["radius"], t["r_predicted"])
    t["discrete_rel_err"] = rel_err(t["radius"], t["r_discrete"])


def potential(t, protocol):
    """Rank/gap of each configuration under its own potential (V2): Gibbs (ELR/LR) or Helmholtz per r0."""
    ok = np.isfinite(t["U_sim"]) & np.isfinite(t["S_full"]) & np.isfinite(t["T"])
    return ideal_gas.protocol_potential_ranks_where(ok, protocol, t["U_sim"], t["S_full"], t["radius"], t["T"],
                                             t["wd"], t["r0"])


def z_verdict(z, dof):
    """Statistical verdict on |z| scores (docs/theory.md §8): (summary dict, pass). Under pure sampling noise
    |z| > Z_LIMIT happens with probability 2·t_sf(Z_LIMIT, dof) per member (Student t, dof = batch
    rows − 1); the count passes up to the Z_QUANTILE Poisson quantile of Z_MARGIN times that
    expectation, and the median |z| must stay ≤ Z_MEDIAN_MAX."""
    z = np.abs(np.asarray(z, dtype=float))
    z = z[np.isfinite(z)]
    expected = float(z.size * 2 * student_t.sf(Z_LIMIT, dof)) if z.size and dof >= 1 else float("nan")
    allowed = int(poisson.ppf(Z_QUANTILE, Z_MARGIN * expected)) if np.isfinite(expected) else -1
    out = {"n": int(z.size), "abs_z_median": finite_stat(z), "n_abs_z_gt3": int((z > Z_LIMIT).sum()),
           "n_abs_z_gt3_expected": expected, "n_abs_z_gt3_allowed": allowed}
    ok = bool(z.size and out["abs_z_median"] <= Z_MEDIAN_MAX and 0 <= out["n_abs_z_gt3"] <= allowed)
    return out, ok


def vmf_summary(t, protocol):
    """Summary row of one vMF group: interior error statistics and the pass/fail flags."""
    th = THRESHOLDS
    inn = t[t["interior"]]
    row = {"protocol": protocol, "n_members": len(t), "n_interior": len(inn),
           "U_rel_err_median": finite_stat(inn["U_rel_err"]),
           "U_rel_err_max": finite_stat(inn["U_rel_err"], np.max),
           "U_rel_err_max_all": finite_stat(t["U_rel_err"], np.max),
           "S_abs_err_median": finite_stat(inn["S_abs_err"]),
           "S_abs_err_max": finite_stat(inn["S_abs_err"], np.max),
           "S_abs_err_max_all": finite_stat(t["S_abs_err"], np.max),
           "S_sem_median": finite_stat(t["S_sem"])}
    # is the U error sampling noise? |z| of U − U_exact against its batch-means standard error, and
    # how many |z| > 3 a simulation that follows the exact law would give (Student t, rows − 1 dof)
    z = np.abs(inn["U_z"].to_numpy(dtype=float))
    z = z[np.isfinite(z)]
    row["U_rel_sem_median"] = finite_stat(inn["U_sem"] / inn["U_exact"])
    row["U_abs_z_median"] = finite_stat(z)
    row["U_abs_z_max"] = finite_stat(z, np.max)
    row["U_n_abs_z_gt3"] = int((z > 3).sum())
    dof = finite_stat(inn["U_rows"]) - 1
    row["U_n_abs_z_gt3_expected"] = (float(z.size * 2 * student_t.sf(3.0, dof)) if z.size and dof >= 1
                                     else float("nan"))
    if "U_discrete" in inn:
        zd = np.abs(inn["U_discrete_z"].to_numpy(dtype=float))
        zd = zd[np.isfinite(zd)]
        row["U_discrete_rel_err_median"] = finite_stat(inn["U_discrete_rel_err"])
        row["U_discrete_rel_err_max"] = finite_stat(inn["U_discrete_rel_err"], np.max)
        row["U_discrete_abs_z_median"] = finite_stat(zd)
        row["U_discrete_n_abs_z_gt3"] = int((zd > 3).sum())
    # the verdict: against the discrete-step U for fixed η_eff, the exact U for fixed LR
    judged = "U_discrete_z" if "U_discrete_z" in inn else "U_z"
    verdict, ok = z_verdict(inn[judged], dof)
    row["U_judged_against"] = "discrete" if judged == "U_discrete_z" else "exact"
    row.update({f"U_judged_{k}": v for k, v in verdict.items()})
    row["U_rel_median_ok"] = bool(row["U_rel_err_median"] <= th["U_rel_median"])
    what = "radius" if protocol_of(protocol).uses_wd else "pressure"
    row[f"{what}_rel_err_median"] = finite_stat(inn["radius_rel_err"])
    row[f"{what}_rel_err_max"] = finite_stat(inn["radius_rel_err"], np.max)
    row[f"{what}_discrete_rel_err_median"] = finite_stat(inn["discrete_rel_err"])
    row[f"{what}_discrete_rel_err_max"] = finite_stat(inn["discrete_rel_err"], np.max)
    row["pass_U"] = ok
    row["pass_S"] = bool(row["S_abs_err_median"] <= th["S_abs_median"]
                         and row["S_abs_err_max"] <= th["S_abs_max"])
    row[f"pass_{what}"] = bool(row[f"{what}_rel_err_max"] <= th["radius_rel_max"])
    return row


