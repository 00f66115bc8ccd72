"""Seeds as replicates (issue #12): mean and confidence band over seeds, per group of the other axes.

An axis over ``seed`` (the minibatch sequence) or ``init_seed`` (θ_0) makes members that agree on
every other key replicates of one configuration. ``replicate_axes`` finds those axes; every band here
groups members over the remaining keys (``analysis.sections.common.group_members``). The report
section is analysis.sections.replicates.

Method (our choice; docs/theory.md §10 "Seeds as replicates" says the same):
- **per-member quantities** (U, S, σ², the ideal-gas predictions T and r*, ...): the n seeds of one
  configuration give x_1 … x_n; the band is x̄ ± t_{n−1, (1+level)/2} · s/√n (s the sample standard
  deviation), a Student-t interval for the mean over seeds;
- **fitted quantities** (T(η) of §5, the power-law exponent a and prefactor b, the Maxwell errors of
  §7): the fit runs once per seed on that seed's members alone, then the same t-interval is taken over
  the per-seed results;
- **positive multiplicative quantities** (T, b) are banded on the log scale: exp(mean ln x ± t s_ln/√n),
  centred on the geometric mean, so that the band stays positive and the roughly log-normal spread of
  a prefactor is treated symmetrically.
Seeds are independent, so the per-seed results are i.i.d.; the t-interval further assumes they are
roughly normal (on the chosen scale). With n = 1 a band has no width (NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from analysis.sections.common import GROUP_KEYS, Skip, group_members
from trainables.protocols import PROTOCOLS, protocol as protocol_of

REPLICATE_KEYS = ("seed", "init_seed")
LEVEL = 0.9


# -----------------------------------------------------------------------------
# one band

@dataclass(frozen=True)
class Band:
    """Mean and t-interval [lo, hi] at ``level`` of ``n`` replicate values (sd: sample sd)."""
    mean: float
    lo: float
    hi: float
    n: int
    sd: float

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2


def _finite(values):
    x = np.asarray(values, dtype=float).ravel()
    return x[np.isfinite(x)]


def t_band(values, level=LEVEL) -> Band:
    """Student-t interval for the mean of the finite ``values`` (one per replicate)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return Band(math.nan, math.nan, math.nan, 0, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Band(mean, math.nan, math.nan, 1, math.nan)
    sd = float(x.std(ddof=1))
    h = float(student_t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return Band(mean, mean - h, mean + h, n, sd)


def log_band(values, level=LEVEL) -> Band:
    """``t_band`` of ln x over the finite positive values, mapped back: geometric mean and
    [exp(lo), exp(hi)]; ``sd`` stays the sd of ln x."""
    x = _finite(values)
    b = t_band(np.log(x[x > 0]), level)
    return Band(math.exp(b.mean) if b.n else math.nan, math.exp(b.lo) if b.n > 1 else math.nan,
                math.exp(b.hi) if b.n > 1 else math.nan, b.n, b.sd)


def band_columns(prefix, band: Band) -> dict:
    return {f"{prefix}_mean": band.mean, f"{prefix}_lo": band.lo, f"{prefix}_hi": band.hi,
            f"{prefix}_n": band.n}


# -----------------------------------------------------------------------------
# replicate axes and per-configuration bands

def replicate_axes(table: pd.DataFrame) -> tuple:
    """The keys of REPLICATE_KEYS that vary across ``table`` (a member table)."""
    return tuple(k for k in REPLICATE_KEYS if k in table.columns and table[k].nunique() > 1)


def replicate_label(members, axes) -> str:
    """"seed=0, init_seed=1" from the first row of ``members`` (a frame: keeps each key's dtype)."""
    return ", ".join(f"{k}={members[k].iloc[0]}" for k in axes)


def seed_counts(table, axes) -> pd.Series:
    """Replicates per configuration (members agreeing on every key but ``axes``), by label."""
    return pd.Series({label: len(g) for label, g in group_members(table, axes)}, dtype=int)


def require_replicates(table) -> tuple:
    """The replicate axes of ``table``; Skip when there are none or no configuration has ≥ 2 seeds."""
    axes = replicate_axes(table)
    if not axes:
        raise Skip(f"no replicate axis: none of {', '.join(REPLICATE_KEYS)} varies across the members "
                   "(put seed: [0, 1, 2, 3] on the grid's axes)")
    counts = seed_counts(table, axes)
    if counts.empty or counts.max() < 2:
        raise Skip(f"every configuration has fewer than 2 seeds along {', '.join(axes)}")
    return axes


def _config_keys(table, axes):
    return [k for k in GROUP_KEYS if k in table.columns and k not in axes]


def config_bands(table, columns, axes, level=LEVEL, log_columns=(), first=None) -> pd.DataFrame:
    """One row per configuration: its non-replicate keys, ``n_seeds`` and, per column of ``columns``
    present in ``table``, ``<col>_mean/_lo/_hi/_n`` over its replicates. ``log_columns`` are banded
    with ``log_band``. ``first=k`` uses only the first k replicates (sorted by the replicate keys)."""
    keys = _config_keys(table, axes)
    rows = []
    for label, g in group_members(table, axes):
        g = g.sort_values(list(axes))
        if first is not None:
            g = g.iloc[:first]
        row = {"config": label, **{k: g[k].iloc[0] for k in keys}, "n_seeds": len(g)}
        for c in columns:
            if c in g.columns:
                row.update(band_columns(c, (log_band if c in log_columns else t_band)(g[c], level)))
        rows.append(row)
    return pd.DataFrame(rows)


# -----------------------------------------------------------------------------
# per-seed fits

def per_seed_fits(table, axes, vary, fit) -> pd.DataFrame:
    """Run ``fit(members) -> dict`` once per replicate within each group of members that differ
    only in ``vary`` and the replicate ``axes``. One row per (group, replicate): ``group``,
    ``replicate``, ``n_members`` and the fit's entries; a fit raising ValueError or Skip gives a row
    with ``error`` set instead."""
    rows = []
    for label, g in group_members(table, tuple(axes) + tuple(vary)):
        for _, s in g.sort_values(list(axes)).groupby(list(axes), sort=True):
            row = {"group": label, "replicate": replicate_label(s, axes), "n_members": len(s)}
            try:
                row.update(fit(s))
            except (ValueError, Skip) as e:
                row["error"] = str(e)
            rows.append(row)
    return pd.DataFrame(rows)


def fit_bands(fits: pd.DataFrame, columns, level=LEVEL, log_columns=(), by=("group",),
              first=None) -> pd.DataFrame:
    """Band each column of ``columns`` over the rows (replicates) of ``fits`` per value of ``by``;
    ``first=k`` keeps the first k rows of each group (rows arrive sorted by replicate)."""
    rows = []
    if fits.empty:
        return pd.DataFrame(rows)
    for key, g in fits.groupby(list(by), sort=True):
        if first is not None:
            g = g.iloc[:first]
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(by, key)), "n_seeds": len(g)}
        for c in columns:
            if c in g.columns:
                row.update(band_columns(c, (log_band if c in log_columns else t_band)(g[c], level)))
        rows.append(row)
    return pd.DataFrame(rows)


def explode_curve(fits: pd.DataFrame, column, x, y) -> pd.DataFrame:
    """Per-seed fits whose ``column`` holds a dict x → y (e.g. T at each η) as a long frame
    (group, replicate, x, y)."""
    rows = [{"group": r["group"], "replicate": r["replicate"], x: k, y: v}
            for _, r in fits.iterrows() if isinstance(r.get(column), dict)
            for k, v in r[column].items()]
    return pd.DataFrame(rows, columns=["group", "replicate", x, y])


# -----------------------------------------------------------------------------
# the fits the report bands

def temperature_fit(members, entropy_key, opts) -> dict:
    """docs/theory.md §5 on one seed's members: exponent a, prefactor b, hypothesis flag and T per η
    (the segment's estimates, dict η → T)."""
    from analysis.free_energy import fit_temperature

    g = members.dropna(subset=["train_loss", entropy_key]).groupby("lr")[["train_loss", entropy_key]].mean()
    if len(g) < 3:
        raise Skip(f"{len(g)} LR(s) with finite U and S; need ≥ 3")
    fit = fit_temperature(g.index.to_numpy(float), g["train_loss"].to_numpy(float),
                          g[entropy_key].to_numpy(float), opts.eps, h=opts.h, lr_range=opts.lr_range)
    return {"a": fit.a, "b": fit.b, "holds": float(fit.holds), "n_empty": int(fit.empty.sum()),
            "T_by_lr": {float(lr): float(T) for lr, T in zip(fit.lrs, fit.T)}}


def maxwell_errors(members, entropy_key="entropy_kl_full") -> dict:
    """docs/theory.md §7 V3 on one seed's (lr, wd) grid: R², the first ratio, max and mean relative error."""
    from analysis.ideal_gas import maxwell_fit

    protocol = members["protocol"].iloc[0]
    m = members.dropna(subset=[entropy_key])
    m = m[(m["wd"] > 0) & (m["lr"] > 0)]
    mf = maxwell_fit(np.log(m["lr"]), np.log(m["wd"]), m[entropy_key], int(m["D"].iloc[0]), protocol)
    return {"maxwell_r2": mf.r2, "maxwell_ratio_1": mf.ratios[0], "maxwell_rel_err_max": mf.rel_err_max,
            "maxwell_rel_err_mean": mf.rel_err_mean}


def ideal_gas_predictions(table) -> pd.DataFrame:
    """``table`` with the per-member ideal-gas columns of docs/theory.md §7 added where their inputs are
    present: ``sigma2`` (tr Σ/(D − 1)), ``T_ig``, ``r_sde``, ``r_discrete`` and the radius errors."""
    from analysis import ideal_gas

    t = table.copy()
    if not {"protocol", "lr", "D"} <= set(t.columns) or "trace_sigma" not in t.columns:
        return t
    D = t["D"].astype(float)
    t["sigma2"] = t["trace_sigma"] / (D - 1)
    wd = t["wd"].astype(float) if "wd" in t.columns else pd.Series(0.0, index=t.index)
    T, r_sde, r_disc = (np.full(len(t), np.nan) for _ in range(3))
    pos_wd = (wd > 0).to_numpy()
    for (protocol, Dk), idx in t.groupby(["protocol", "D"]).groups.items():
        if protocol not in PROTOCOLS:
            continue
        uses_wd = protocol_of(protocol).uses_wd
        k = t.index.isin(idx) & (pos_wd | (not uses_wd))
        if not k.any():
            continue
        lr, w, s2 = t["lr"][k], wd[k], t["sigma2"][k]
        T[k] = ideal_gas.temperature(protocol, lr, w, s2, int(Dk))
        if uses_wd:
            r_sde[k] = ideal_gas.radius_sde(protocol, lr, w, s2, int(Dk))
            if "grad_sq" in t.columns:
                r_disc[k] = ideal_gas.radius_discrete(protocol, lr, w, t["trace_sigma"][k], t["grad_sq"][k])
    t["T_ig"], t["r_sde"], t["r_discrete"] = T, r_sde, r_disc
    if "radius" in t.columns:
        with np.errstate(divide="ignore", invalid="ignore"):
            t["r_sde_rel_err"] = np.abs(t["radius"] - t["r_sde"]) / t["r_sde"]
            t["r_discrete_rel_err"] = np.abs(t["radius"] - t["r_discrete"]) / t["r_discrete"]
    return t
