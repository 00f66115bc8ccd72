"""Report section ``ideal_gas`` (docs/theory.md §7) for networks: T, σ² and S_full against both grid
axes, the stationary radius (V1) or the effective pressure (fixed sphere), the Maxwell relation (V3)
and the potential ranks (V2, toys only). The formulas are analysis.ideal_gas's; what ``lr`` and the
second axis mean is the protocol's (trainables.protocols)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import figures
from analysis import ideal_gas
from engine import layout
from analysis.sections.common import (SectionResult, Skip, column, finite_rows, finite_stat, for_each_group,
                                      heatmap, log_axes, member_table, rel_err, slug, split_by_member,
                                      write_table)
from trainables.protocols import PROTOCOLS, protocol as protocol_of

ORDER = 30
STATE_QUANTITIES = (("T", "temperature T", True), ("sigma2", r"$\sigma^2$", True),
                    ("S_full", r"$S_\mathrm{full}$", False))


def ideal_gas_section(sweep, out_dir, opts):
    """docs/theory.md §7: T, σ², S_full; radius (V1); effective pressure; Maxwell (V3); potentials (V2)."""
    res = SectionResult("ideal_gas")
    names = sweep.metric_names
    S_key = "entropy_kl_full" if "entropy_kl_full" in names else None
    if S_key is None:
        raise Skip("no KL entropy (entropy_kl_full) logged; the ideal-gas analysis (§7) needs the "
                   "KL estimator on the full space")
    if not ({"trace_sigma", "sigma2"} & set(names)):
        raise Skip("neither trace_sigma nor sigma2 logged; T needs σ² (§3)")
    tab = member_table(sweep)
    for need in ("protocol", "lr", "D"):
        if need not in tab.columns:
            raise Skip(f"members have no {need} param")
    tab = tab[tab["protocol"].isin(PROTOCOLS)]
    if tab.empty:
        raise Skip(f"no member with a protocol in {PROTOCOLS}")
    return for_each_group(res, tab, ("lr", "wd", "r0"), lambda label, g: _ideal_gas_group(
        sweep, out_dir, opts, res, label, g, S_key))


def _ideal_gas_group(sweep, out_dir, opts, res, label, g, S_key):
    proto = protocol_of(g["protocol"].iloc[0])
    D = int(g["D"].iloc[0])
    t = _state_table(g, D, S_key, proto, label, res)
    row = {"group": label, "protocol": proto.name, "D": D, "n_members": len(t)}
    name = f"ig_{slug(label)}"
    _state_figure(t, proto, label, out_dir, res, name)
    if proto.uses_wd:
        _radius_check(t, proto, D, label, row, out_dir, res, name)
    else:
        _pressure_check(t, sweep, D, label, row, opts, out_dir, res, name)
    if proto.uses_wd:
        _maxwell(t, proto, D, label, row, out_dir, res, name)
    _potential(t, g, proto, label, S_key, row, out_dir, res, name)
    write_table(t, out_dir, f"{name}.csv", res)
    res.summary_rows.append(row)


def _state_table(g, D, S_key, proto, label, res):
    """One row per member: lr, wd, r0, σ² (§3: tr Σ averaged first, then / (D − 1)), tr Σ, G², S_full,
    radius, U and T (§7); members with λ = 0 dropped where λ applies."""
    t = pd.DataFrame({"run_id": g.index, "lr": g["lr"].to_numpy(float)})
    t["wd"] = g["wd"].to_numpy(float) if "wd" in g else 0.0
    t["r0"] = g["r0"].to_numpy(float) if "r0" in g else 1.0

    def col(k):
        return g[k].to_numpy(float) if k in g else np.full(len(g), np.nan)
    trace_sigma = col("trace_sigma")
    t["sigma2"] = np.where(np.isfinite(trace_sigma), trace_sigma / (D - 1), col("sigma2"))
    t["trace_sigma"], t["grad_sq"] = trace_sigma, col("grad_sq")
    t["S_full"], t["radius"], t["U"] = col(S_key), col("radius"), col("train_loss")
    if proto.uses_wd:
        bad = ~(t["wd"] > 0)
        if bad.any():
            res.notes.append(f"group {label}: {int(bad.sum())} member(s) with wd = 0 dropped "
                             f"({proto.name} needs λ > 0)")
            t = t[~bad].reset_index(drop=True)
    if len(t) < 2:
        raise Skip(f"only {len(t)} usable member(s)")
    t["T"] = ideal_gas.temperature(proto.name, t["lr"], t["wd"], t["sigma2"], D)
    return t


def _state_figure(t, proto, label, out_dir, res, name):
    """T, σ² and S_full against the LR (lines: second axis) and against the second axis (lines: LR)."""
    second = column(proto.second_axis)
    fig, ax = figures.figure(3, 2)
    for r, (xkey, lines_key, xlabel) in enumerate((("lr", second, proto.lr_label),
                                                   (second, "lr", proto.second_label))):
        colors, sm = figures.value_colors(np.sort(t[lines_key].unique()))
        for c, (_, sub) in zip(colors, t.sort_values(xkey).groupby(lines_key, sort=True)):
            for a, (k, _, ylog) in zip(ax[r], STATE_QUANTITIES):
                keep = (figures.positive(sub[xkey], sub[k]) if ylog
                        else np.isfinite(sub[k]) & (sub[xkey] > 0))
                a.plot(sub[xkey][keep], sub[k][keep], "o-", color=c, ms=4)
        for a, (_, ylabel, ylog) in zip(ax[r], STATE_QUANTITIES):
            log_axes(a, xlabel, ylabel, ylog=ylog)
        figures.colorbar(fig, ax[r], sm, label=proto.second_label if lines_key == second else proto.lr_label)
    fig.suptitle(f"{proto.name}, {label}")
    res.figures.append(figures.save(fig, out_dir, f"{name}_state.png"))


def measured_vs_predicted(t, measured, predictions, row, res, out_dir, name, xlabel, ylabel, title):
    """Log–log scatter of a measured column against its predictions (SDE first, then discrete),
    with the identity line; records each prediction's median relative error in ``row``."""
    fig, ax = figures.figure(1, width=6)
    for k, mk in zip(predictions, ("o", "s")):
        ax[0, 0].plot(t[k], t[measured], mk, mfc="none", label=k.replace("_", " "))
        row[f"{k}_rel_err_median"] = finite_stat(rel_err(t[measured], t[k]))
    figures.identity_line(ax[0, 0], np.r_[t[measured], t[predictions[0]]])
    log_axes(ax[0, 0], xlabel, ylabel, title)
    ax[0, 0].legend()
    res.figures.append(figures.save(fig, out_dir, name))


def _radius_check(t, proto, D, label, row, out_dir, res, name):
    """V1: the measured stationary radius against the SDE and the discrete-step predictions."""
    t["r_sde"] = ideal_gas.radius_sde(proto.name, t["lr"], t["wd"], t["sigma2"], D)
    t["r_discrete"] = (ideal_gas.radius_discrete(proto.name, t["lr"], t["wd"], t["trace_sigma"], t["grad_sq"])
                       if np.isfinite(t["grad_sq"]).any() else np.nan)
    if not np.isfinite(t["radius"]).any():
        res.notes.append(f"group {label}: no radius metric; V1 radius check skipped")
        return
    measured_vs_predicted(t, "radius", ("r_sde", "r_discrete"), row, res, out_dir, f"{name}_radius.png",
                          r"predicted radius $r^*$", r"measured stationary radius $r$", f"V1 radius, {label}")


def _pressure_check(t, sweep, D, label, row, opts, out_dir, res, name):
    """Fixed sphere: the effective pressure from the mean pre-projection radius r̃ against its predictions."""
    if "radius_preproj" not in sweep.running.columns:
        res.notes.append(f"group {label}: no {layout.running_metric('radius_preproj')}; effective pressure skipped")
        return
    r_tilde, n_used = [], []
    running = split_by_member(sweep.running, t["run_id"])
    for rid in t["run_id"]:
        _, (v,) = finite_rows(running.get(rid), "radius_preproj")
        v = v[-opts.pressure_last:]
        r_tilde.append(v.mean() if v.size else np.nan)
        n_used.append(v.size)
    t["r_tilde"], t["n_running"] = r_tilde, n_used
    t["p_measured"] = ideal_gas.effective_pressure(t["r_tilde"], t["r0"], t["lr"])
    t["p_predicted"] = ideal_gas.effective_pressure_prediction(t["T"], D, t["r0"])
    t["p_discrete"] = ideal_gas.effective_pressure_discrete(t["lr"], t["trace_sigma"], t["grad_sq"], t["r0"])
    if min(n_used) < opts.pressure_last:
        res.notes.append(f"group {label}: r̃ averaged over {min(n_used)}–{max(n_used)} running "
                         f"logs (fewer than {opts.pressure_last}: short run)")
    measured_vs_predicted(
        t, "p_measured", ("p_predicted", "p_discrete"), row, res, out_dir, f"{name}_pressure.png",
        r"predicted $\lambda_\mathrm{eff}$",
        r"measured $\lambda_\mathrm{eff} = (\tilde r - r_0)/(\eta_\mathrm{eff} r_0^3)$",
        f"effective pressure, {label}")


def _maxwell(t, proto, D, label, row, out_dir, res, name):
    """V3: the quadratic fit of S_full over (ln η, ln λ) and the protocol's Maxwell relation."""
    ok = np.isfinite(t["S_full"]).to_numpy()
    try:
        fit = ideal_gas.maxwell_fit(np.log(t["lr"][ok]), np.log(t["wd"][ok]), t["S_full"][ok], D, proto.name)
    except ValueError as e:
        res.notes.append(f"group {label}: Maxwell fit skipped: {e}")
        return
    row.update(maxwell_r2=fit.r2, ratio_1=fit.ratios[0], ratio_2=fit.ratios[1],
               ratio_3=fit.ratios[2], rel_err_max=fit.rel_err_max, rel_err_mean=fit.rel_err_mean)
    res.notes.append(f"group {label}: Maxwell coefficients c0..c5 = " + ", ".join(f"{c:.5g}" for c in fit.coef))
    t.loc[ok, "maxwell_rel_err"] = fit.rel_err
    fig, ax = figures.figure(2, width=6.2)
    tt = t[ok]
    colors, sm = figures.value_colors(tt["lr"].unique())
    for c, (lr, sub) in zip(colors, tt.sort_values("wd").groupby("lr", sort=True)):
        y = np.log(sub["wd"].to_numpy())
        ax[0, 0].plot(y, sub["S_full"], "o", color=c, ms=4)
        yy = np.linspace(y.min(), y.max(), 30)
        ax[0, 0].plot(yy, fit.value(math.log(lr), yy), "-", color=c, lw=1)
    ax[0, 0].set_xlabel(r"$\ln\lambda$")
    ax[0, 0].set_ylabel(r"$S_\mathrm{full}$ (points) and quadratic fit (lines)")
    ax[0, 0].set_title(f"Maxwell fit, R² = {fit.r2:.4f}")
    figures.colorbar(fig, ax[0, 0], sm, label=proto.lr_label)
    heatmap(ax[0, 1], tt["lr"].to_numpy(), tt["wd"].to_numpy(), fit.rel_err, proto.lr_label,
            proto.second_label, "relative error of the Maxwell relation", fig, "relative error")
    res.figures.append(figures.save(fig, out_dir, f"{name}_maxwell.png"))


def _potential(t, g, proto, label, S_key, row, out_dir, res, name):
    """V2, toy models only: the rank and gap of each configuration under its protocol's potential."""
    model = g["model"].iloc[0] if "model" in g else None
    if model != "vmf":
        res.notes.append(f"group {label}: potential (V2) map skipped: toy models only (model = {model})")
        return
    ok = (np.isfinite(t["U"]) & np.isfinite(t["S_full"]) & np.isfinite(t["T"])).to_numpy()
    rank, gap, kind = ideal_gas.protocol_potential_ranks_where(ok, proto.name, t["U"], t["S_full"], t["radius"],
                                                               t["T"], t["wd"], t["r0"])
    if kind is None:
        res.notes.append(f"group {label}: potential map skipped: needs 2 members with train_loss, {S_key} "
                         "and T (and a radius for Gibbs)")
        return
    t["potential_rank"], t["potential_gap"] = rank, gap
    ranked = np.isfinite(rank)
    tt, rank, gap = t[ranked], rank[ranked], gap[ranked]
    row.update(potential=kind.split()[0], frac_own_minimum=float(np.mean(rank == 0)),
               max_rank=int(rank.max()), mean_gap=float(np.mean(gap)))
    second = column(proto.second_axis)
    fig, ax = figures.figure(2, width=6.2)
    heatmap(ax[0, 0], tt["lr"].to_numpy(), tt[second].to_numpy(), rank, proto.lr_label, proto.second_label,
            f"rank of own configuration\n{kind}", fig, "rank (0 = minimiser)")
    heatmap(ax[0, 1], tt["lr"].to_numpy(), tt[second].to_numpy(), gap, proto.lr_label, proto.second_label,
            "gap to the minimum", fig, "gap")
    res.figures.append(figures.save(fig, out_dir, f"{name}_potential.png"))


SECTIONS = (ideal_gas_section,)
