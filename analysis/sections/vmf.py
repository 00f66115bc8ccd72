"""Report sections of the isotropic-noise toy (model ``vmf``, docs/theory.md §§7, 8).

* ``vmf_exact``     – simulated stationary U and S_sphere against the exact von Mises–Fisher formulas
                      at κ = 1/T, stationary radius (λ applies) or effective pressure (fixed sphere)
                      against the SDE prediction, Maxwell relation (V3) and potential ranks (V2),
                      pass/fail against the acceptance thresholds; U judged by z-scores (``z_verdict``).
* ``vmf_adiabatic`` – fixed LR only: S_full should not depend on λ at fixed η (V4).

Each raises ``Skip`` unless the sweep holds vmf members. The member table, windows and thresholds
are in ``analysis.sections.vmf_table``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import figures
from analysis import ideal_gas
from analysis.sections.common import (SectionResult, Skip, column, finite_stat, for_each_group, heatmap,
                                      slug, toy_members, write_table)
from analysis.sections.vmf_table import (ENTROPY_LAST, INTERIOR_DROP, THRESHOLDS, Z_LIMIT, Z_MARGIN,
                                         Z_MEDIAN_MAX, Z_QUANTILE, potential, vmf_member_table, vmf_summary)
from trainables.protocols import BY_NAME, FIXED_LR, protocol as protocol_of
from trainables.toys.vmf import vmf_entropy, vmf_loss

ORDER = 40


def vmf_exact_section(sweep, out_dir, opts):
    """docs/theory.md §8 vs simulation for the isotropic-noise toy; §7 radius/pressure, V2, V3."""
    res = SectionResult("vmf_exact")
    members = toy_members(sweep, "vmf")
    res.notes.append(f"U, radius: mean of the log rows covering the last {opts.toy_u_window} "
                     f"iterations; r̃: last {opts.toy_pressure_window}; S: mean of the last {ENTROPY_LAST} entropy "
                     f"evaluations; summary on the interior ({INTERIOR_DROP} value(s) cut at each end of "
                     "each axis); T from §7 with σ = the noise param (exact for this toy)")
    return for_each_group(res, members, ("lr", "wd", "r0"),
                          lambda label, g: _vmf_group(sweep, out_dir, res, label, g, opts))


def _vmf_group(sweep, out_dir, res, label, g, opts):
    if g["protocol"].iloc[0] not in BY_NAME:
        raise Skip(f"unknown protocol {g['protocol'].iloc[0]!r}")
    proto = protocol_of(g["protocol"].iloc[0])
    if proto.uses_wd and not (g["wd"] > 0).all():
        res.notes.append(f"group {label}: {int((~(g['wd'] > 0)).sum())} member(s) with wd = 0 dropped")
        g = g[g["wd"] > 0]
    if g.empty:
        raise Skip("no usable member")
    t = vmf_member_table(sweep, g, opts.toy_u_window, opts.toy_pressure_window)
    if not np.isfinite(t["U_sim"]).any():
        raise Skip("no train_loss logged")
    name = "vmf_" + slug(f"{proto.name} {label}" if label != "all" else proto.name)
    row = {"group": label, **vmf_summary(t, proto.name)}
    if np.isfinite(row["U_abs_z_median"]):
        res.notes += _u_notes(label, row)
    # V3 Maxwell and V2 potentials (the generic ideal_gas section needs σ² metrics the toy does not log)
    fit = _maxwell(t, proto, res, label, row) if proto.uses_wd else None
    kind = _potential_row(t, proto, row)
    flags = [k for k in row if k.startswith("pass_")]
    row["pass_all"] = bool(all(row[k] for k in flags))
    write_table(t, out_dir, f"{name}.csv", res)
    res.summary_rows.append(row)
    _exact_figure(t, proto, label, out_dir, res, name)
    _error_maps(t, proto, out_dir, res, name)
    _thermo_figure(t, proto, fit, kind, out_dir, res, name)


def _u_notes(label, row):
    """The two notes on U: its z-scores against the exact (and discrete-step) U, and the verdict."""
    discrete = (f"; against the first-order discrete-step U (vMF at T/(1 − η_eff/2)): median |z| "
                f"{row['U_discrete_abs_z_median']:.2f}, {row['U_discrete_n_abs_z_gt3']} with |z| > 3"
                if "U_discrete_abs_z_median" in row else "")
    return [
        f"group {label}: U − U_exact over its batch-means standard error (median {100 * row['U_rel_sem_median']:.2g}% "
        f"of U): median |z| {row['U_abs_z_median']:.2f}, max {row['U_abs_z_max']:.2f}; "
        f"{row['U_n_abs_z_gt3']} interior members with |z| > 3, {row['U_n_abs_z_gt3_expected']:.1f} "
        "expected from sampling noise alone" + discrete,
        f"group {label}: U verdict {'pass' if row['pass_U'] else 'FAIL'} against the {row['U_judged_against']} "
        f"U: median |z| {row['U_judged_abs_z_median']:.2f} (limit {Z_MEDIAN_MAX:g}), "
        f"{row['U_judged_n_abs_z_gt3']} members with |z| > {Z_LIMIT:g}, at most {row['U_judged_n_abs_z_gt3_allowed']} "
        f"allowed ({Z_QUANTILE:.0%} Poisson quantile of {Z_MARGIN:g} × the {row['U_judged_n_abs_z_gt3_expected']:.1f} "
        f"chance gives); relative error median {100 * row['U_rel_err_median']:.2f}% (≤ {100 * THRESHOLDS['U_rel_median']:g}%: "
        f"{'yes' if row['U_rel_median_ok'] else 'no'})"]


def _maxwell(t, proto, res, label, row):
    """Maxwell fit (V3) on the interior points with a finite S_full, its ratios into ``row`` and its
    errors into ``t``; None when impossible (a note says why)."""
    sel = t["interior"] & np.isfinite(t["S_full"]) & (t["wd"] > 0)
    if sel.sum() < 6:
        res.notes.append(f"group {label}: Maxwell fit skipped: {int(sel.sum())} interior points with S_full")
        return None
    D = int(t["D"].iloc[0])
    x, y = np.log(t.loc[sel, "lr"]), np.log(t.loc[sel, "wd"])
    try:
        fit = ideal_gas.maxwell_fit(x, y, t.loc[sel, "S_full"], D, proto.name)
    except ValueError as e:
        res.notes.append(f"group {label}: Maxwell fit skipped: {e}")
        return None
    t.loc[sel, "maxwell_rel_err"] = fit.rel_err
    ideal = ideal_gas.maxwell_ideal(proto.name)
    # the same check at the grid centre instead of at ln η = ln λ = 0 (far outside the grid)
    row.update(maxwell_ratio_centre=float(fit.ratio_at(x.mean(), y.mean(), D)))
    row.update(maxwell_ratio=fit.ratios[0], maxwell_ratio_2=fit.ratios[1],
               maxwell_ratio_3=fit.ratios[2], maxwell_r2=fit.r2,
               maxwell_rel_err_max=fit.rel_err_max, maxwell_rel_err_mean=fit.rel_err_mean,
               pass_maxwell=bool(abs(fit.ratios[0] - ideal) <= THRESHOLDS["maxwell_ratio"]))
    res.notes.append(f"group {label}: Maxwell ratio {'c2/R' if proto.lr_is_effective else '(c1 − c2)/R'}"
                     f" = {fit.ratios[0]:.4f} (ideal {ideal:+g}); c0..c5 = "
                     + ", ".join(f"{c:.5g}" for c in fit.coef))
    return fit


def _potential_row(t, proto, row):
    """V2: each configuration's rank under its own potential into ``t``, the fractions into ``row``;
    returns the potential's description (None: nothing ranked)."""
    rank, gap, kind = potential(t, proto.name)
    t["potential_rank"], t["potential_gap"] = rank, gap
    if kind is not None:
        fin = np.isfinite(rank)
        row.update(potential=kind.split()[0], potential_frac_own_min=float(np.mean(rank[fin] == 0)),
                   potential_frac_own_min_interior=finite_stat(rank[fin & t["interior"].to_numpy()] == 0, np.mean),
                   potential_max_rank=int(np.nanmax(rank)))
    return kind


def _exact_figure(t, proto, label, out_dir, res, name):
    """Simulated against exact U and S_sphere across T, coloured by the second axis."""
    fig, ax = figures.figure(2)
    colors, sm = figures.value_colors(t[column(proto.second_axis)].to_numpy())
    T_grid = np.geomspace(t["T"].min(), t["T"].max(), 200)
    D = int(t["D"].iloc[0])
    for a, (sim, exact_fn, ylabel, ylog) in zip(ax[0], (("U_sim", vmf_loss, "stationary loss U", True),
                                                        ("S_sim", vmf_entropy, r"$S_\mathrm{sphere}$", False))):
        a.scatter(t["T"], t[sim], c=colors, s=14, zorder=3, label="simulation")
        a.plot(T_grid, exact_fn(1.0 / T_grid, D), "k-", lw=1.2, label="exact vMF, κ = 1/T")
        a.set_xscale("log")
        if ylog:
            a.set_yscale("log")
        a.set_xlabel("temperature T")
        a.set_ylabel(ylabel)
        a.legend()
    fig.suptitle(f"isotropic-noise toy, {proto.name}, {label}")
    figures.colorbar(fig, ax, sm, label=proto.second_label)
    res.figures.append(figures.save(fig, out_dir, f"{name}_exact.png"))


def _grid_maps(t, proto, panels, out_dir, res, filename):
    """One heat map over the (lr, second axis) grid per (column, title) panel, in one figure."""
    second = t[column(proto.second_axis)].to_numpy()
    fig, ax = figures.figure(len(panels), width=5.6)
    for a, (k, title) in zip(ax[0], panels):
        heatmap(a, t["lr"].to_numpy(), second, t[k].to_numpy(), proto.lr_label, proto.second_label, title, fig, k)
    res.figures.append(figures.save(fig, out_dir, filename))


def _error_maps(t, proto, out_dir, res, name):
    """Heat maps of the U, S and radius (or pressure) errors over the grid."""
    what = "radius" if proto.uses_wd else r"$\lambda_\mathrm{eff}$"
    _grid_maps(t, proto, [("U_rel_err", r"$|U - U_\mathrm{exact}| / U_\mathrm{exact}$"),
                          ("S_abs_err", r"$|S - S_\mathrm{exact}|$ (nats)"),
                          ("radius_rel_err", f"{what}: relative error vs SDE")], out_dir, res, f"{name}_errors.png")


def _thermo_figure(t, proto, fit, kind, out_dir, res, name):
    """Heat maps of the Maxwell relation's error and of the potential ranks (those available)."""
    panels = []
    if fit is not None:
        panels.append(("maxwell_rel_err", "Maxwell relation: relative error"))
    if kind is not None:
        panels.append(("potential_rank", f"rank of own configuration\n{kind}"))
    if panels:
        _grid_maps(t, proto, panels, out_dir, res, f"{name}_thermo.png")


# -----------------------------------------------------------------------------
# V4: adiabatic check, fixed LR

def vmf_adiabatic_section(sweep, out_dir, opts):
    """docs/theory.md §7 V4 for the toy with fixed LR: S_full depends on η only, not on λ."""
    res = SectionResult("vmf_adiabatic")
    members = toy_members(sweep, "vmf")
    members = members[members["protocol"] == FIXED_LR.name]
    if members.empty:
        raise Skip("no fixed_lr vmf members: the adiabatic check (λ at fixed η) needs fixed LR")
    return for_each_group(res, members, ("lr", "wd", "r0"),
                          lambda label, g: _adiabatic_group(sweep, out_dir, opts, res, label, g))


def _adiabatic_group(sweep, out_dir, opts, res, label, g):
    g = g[g["wd"] > 0]
    if g["wd"].nunique() < 2:
        raise Skip("fewer than 2 positive weight decays (with λ = 0 the radius grows without bound and "
                   "there is no stationary S_full); skipped")
    t = vmf_member_table(sweep, g, opts.toy_u_window, opts.toy_pressure_window)
    t = t[np.isfinite(t["S_full"])]
    if t["wd"].nunique() < 2:
        raise Skip("fewer than 2 weight decays with S_full; skipped")
    name = "vmf_adiabatic_" + slug(label)
    # exact reference: S_sphere(κ = 1/T) + (D − 1) log r* with the SDE radius (§7, §8)
    t["S_full_exact"] = t["S_exact"] + (t["D"] - 1) * np.log(t["r_predicted"])
    interior = t[t["interior"]]
    etas, spread = ideal_gas.adiabatic_spread(interior["lr"], interior["wd"], interior["S_full"])
    _, spread_exact = ideal_gas.adiabatic_spread(interior["lr"], interior["wd"], interior["S_full_exact"])
    noise = finite_stat(interior["S_full_sem"])
    k = int(np.argmax(spread))
    res.summary_rows.append({
        "group": label, "n_eta": int(etas.size), "n_wd": int(interior["wd"].nunique()),
        "spread_max": float(spread[k]), "spread_max_at_lr": float(etas[k]),
        "spread_median": float(np.median(spread)),
        "spread_exact_max": float(np.max(spread_exact)),
        "estimator_sem_median": noise,
        "spread_max_over_sem": float(spread[k] / noise) if noise > 0 else float("nan")})
    res.notes.append(f"group {label}: spread = max − min of S_full over λ at each interior η; the "
                     "estimator noise is the standard error of the mean of the last "
                     f"{ENTROPY_LAST} evaluations (median over members); the range of n i.i.d. "
                     "values is ≈ 3–4 standard deviations")
    write_table(pd.DataFrame({"lr": etas, "spread": spread, "spread_exact": spread_exact}),
                out_dir, f"{name}.csv", res)
    _adiabatic_figure(t, etas, spread, spread_exact, noise, out_dir, res, name)


def _adiabatic_figure(t, etas, spread, spread_exact, noise, out_dir, res, name):
    """S_full against λ at each η (with the exact curves), and its spread over λ against η."""
    fig, ax = figures.figure(2)
    colors, sm = figures.value_colors(t["lr"].unique())
    for c, (lr, sub) in zip(colors, t.sort_values("wd").groupby("lr", sort=True)):
        ax[0, 0].plot(sub["wd"], sub["S_full"], "o-", color=c, ms=4)
        ax[0, 0].plot(sub["wd"], sub["S_full_exact"], "--", color=c, lw=0.8)
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_xlabel(FIXED_LR.second_label)
    ax[0, 0].set_ylabel(r"$S_\mathrm{full}$ (points; dashed: exact vMF + SDE radius)")
    ax[0, 0].set_title("fixed LR: S vs λ at fixed η")
    figures.colorbar(fig, ax[0, 0], sm, label=FIXED_LR.lr_label)
    ax[0, 1].plot(etas, spread, "o-", label="simulation (interior)")
    ax[0, 1].plot(etas, spread_exact, "k--", label="exact")
    if np.isfinite(noise):
        ax[0, 1].axhline(noise, color="C3", lw=1, label="estimator s.e.m. (median)")
    ax[0, 1].set_xscale("log")
    ax[0, 1].set_xlabel(FIXED_LR.lr_label)
    ax[0, 1].set_ylabel(r"spread of $S_\mathrm{full}$ over λ")
    ax[0, 1].legend()
    res.figures.append(figures.save(fig, out_dir, f"{name}.png"))


SECTIONS = (vmf_exact_section, vmf_adiabatic_section)
