"""Report section ``replicates`` (issue #12; docs/theory.md §10): seeds as replicates, with the mean and
a Student-t band over seeds for the stationary values, the §5 power law, the §7 predictions and the
Maxwell errors (analysis.replicates). Skips unless the sweep has ≥ 2 seeds per configuration."""

from __future__ import annotations

from analysis import figures
from analysis.ideal_gas import WITH_RADIUS
from analysis.replicates import (LEVEL, config_bands, explode_curve, fit_bands, ideal_gas_predictions,
                                 maxwell_errors, per_seed_fits, require_replicates, seed_counts,
                                 temperature_fit)
from analysis.sections.common import (SectionResult, group_members, knn_k, member_table, slug,
                                      write_table)

ORDER = 70
MEMBER_QUANTITIES = ("train_loss", "test_loss", "entropy_kl_full", "radius", "sigma2", "T_ig", "r_sde",
                     "r_discrete", "r_sde_rel_err", "r_discrete_rel_err")
LOG_QUANTITIES = ("T", "b", "T_ig")


def _summary(group, quantity, all_band_row, two_band_row, prefix):
    """One summary row: the band over all seeds and the half-width with the first 2 seeds."""
    lo, hi = all_band_row[f"{prefix}_lo"], all_band_row[f"{prefix}_hi"]
    lo2, hi2 = two_band_row[f"{prefix}_lo"], two_band_row[f"{prefix}_hi"]
    return {"group": group, "quantity": quantity, "n_seeds": int(all_band_row[f"{prefix}_n"]),
            "mean": all_band_row[f"{prefix}_mean"], "lo": lo, "hi": hi,
            "width_2_seeds": hi2 - lo2, "width_all_seeds": hi - lo}


def replicates_section(sweep, out_dir, opts):
    """Issue #12: seeds as replicates — mean and LEVEL t-band over seeds for U, S, T(η), the §5
    power law, the §7 predictions and Maxwell errors; widths with 2 seeds against all seeds."""
    res = SectionResult("replicates")
    tab = member_table(sweep)
    axes = require_replicates(tab)
    tab = ideal_gas_predictions(tab)
    names = sweep.metric_names
    ent = None
    if any(n.startswith("entropy_knn_k") for n in names):
        ent = f"entropy_knn_k{knn_k(names, opts.k_max)}"
    counts = seed_counts(tab, axes)
    res.notes.append(f"replicate axes: {', '.join(axes)}; seeds per configuration "
                     f"{counts.min()}–{counts.max()}; bands: {round(100 * LEVEL)} % Student-t intervals "
                     "over seeds (per-seed fits first; T and b on the log scale)")

    cols = [c for c in (*MEMBER_QUANTITIES, ent) if c and c in tab.columns and tab[c].notna().any()]
    bands = config_bands(tab, cols, axes, log_columns=LOG_QUANTITIES)
    two = config_bands(tab, cols, axes, log_columns=LOG_QUANTITIES, first=2)
    write_table(bands, out_dir, "replicates_members.csv", res)
    for c in cols:
        w_all = (bands[f"{c}_hi"] - bands[f"{c}_lo"]).median()
        w_two = (two[f"{c}_hi"] - two[f"{c}_lo"]).median()
        res.summary_rows.append({"group": "median over configurations", "quantity": c,
                                 "n_seeds": int(bands[f"{c}_n"].max()), "mean": "", "lo": "", "hi": "",
                                 "width_2_seeds": w_two, "width_all_seeds": w_all})
    if "lr" in bands.columns:
        _stationary_figures(bands, [c for c in ("train_loss", ent) if c in cols], out_dir, res)

    if ent and "lr" in tab.columns:
        _temperature_bands(tab, axes, ent, opts, out_dir, res)
    if "entropy_kl_full" in tab.columns and {"protocol", "wd", "D"} <= set(tab.columns):
        kl = tab[tab["protocol"].isin(WITH_RADIUS)]
        if not kl.empty and kl["wd"].nunique() > 2:
            fits = per_seed_fits(kl, axes, ("lr", "wd"), maxwell_errors)
            _fit_summaries(fits, ["maxwell_rel_err_max", "maxwell_rel_err_mean", "maxwell_ratio_1",
                                  "maxwell_r2"], (), res)
            write_table(fits, out_dir, "replicates_maxwell_per_seed.csv", res)
    return res


def _fit_summaries(fits, columns, log_columns, res):
    """Summary rows of per-seed fits banded over all seeds and over the first 2 (errors become notes)."""
    if "error" in fits.columns:
        res.notes += [f"group {r['group']}, {r['replicate']}: {r['error']}"
                      for _, r in fits.dropna(subset=["error"]).iterrows()]
        fits = fits[fits["error"].isna()]
    every, two = (fit_bands(fits, columns, log_columns=log_columns, first=k) for k in (None, 2))
    for (_, r_all), (_, r_two) in zip(every.iterrows(), two.iterrows()):
        res.summary_rows += [_summary(r_all["group"], c, r_all, r_two, c) for c in columns
                             if f"{c}_mean" in r_all]
    return every


def _temperature_bands(tab, axes, ent, opts, out_dir, res):
    """§5 per seed: the power law's a and b banded over seeds, and T(η) with its band per group."""
    fits = per_seed_fits(tab, axes, ("lr",), lambda m: temperature_fit(m, ent, opts))
    _fit_summaries(fits, ["a", "b"], ("b",), res)
    ok = fits[fits["error"].isna()] if "error" in fits.columns else fits
    for label, g in ok.groupby("group", sort=True):     # a yes/no per seed: a count, not a band
        res.summary_rows.append({"group": label, "quantity": "§5 hypothesis holds", "n_seeds": len(g),
                                 "mean": f"{int(g['holds'].sum())}/{len(g)} seeds"})
    curve = explode_curve(fits, "T_by_lr", "lr", "T")
    if curve.empty:
        return
    tb = fit_bands(curve, ["T"], log_columns=("T",), by=("group", "lr"))
    write_table(tb, out_dir, "replicates_temperature.csv", res)
    for label, g in tb.groupby("group", sort=True):
        fig, ax = figures.figure(1, width=6)
        a = ax[0, 0]
        c = curve[curve["group"] == label]
        for rep, cs in c.groupby("replicate", sort=True):
            keep = figures.positive(cs["lr"], cs["T"])
            a.plot(cs["lr"][keep], cs["T"][keep], ".", ms=4, alpha=0.6)
        ok = g["T_n"] > 1
        a.fill_between(g["lr"][ok], g["T_lo"][ok], g["T_hi"][ok], color="C0", alpha=0.25,
                       label=f"{round(100 * LEVEL)} % band over seeds")
        a.plot(g["lr"], g["T_mean"], "o-", color="C0", label="geometric mean")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel(figures.ETA)
        a.set_ylabel("temperature T")
        a.set_title(f"T(η) over seeds, {label}")
        a.legend()
        res.figures.append(figures.save(fig, out_dir, f"rep_{slug(label)}_temperature.png"))


def _stationary_figures(bands, cols, out_dir, res):
    """Stationary values against the LR per group: the mean over seeds and its band."""
    if not cols:
        return
    for label, g in group_members(bands, ("lr",)):
        g = g.sort_values("lr")
        fig, ax = figures.figure(len(cols))
        for a, c in zip(ax[0], cols):
            ok = g[f"{c}_n"] > 1
            a.fill_between(g["lr"][ok], g[f"{c}_lo"][ok], g[f"{c}_hi"][ok], color="C0", alpha=0.25,
                           label=f"{round(100 * LEVEL)} % band")
            a.plot(g["lr"], g[f"{c}_mean"], "o-", color="C0", label="mean over seeds")
            a.set_xscale("log")
            a.set_xlabel(figures.ETA)
            a.set_ylabel({"train_loss": "stationary train loss U"}.get(c, f"stationary {c}"))
            a.legend()
        fig.suptitle(f"stationary values over seeds, {label}")
        res.figures.append(figures.save(fig, out_dir, f"rep_{slug(label)}_stationary.png"))


SECTIONS = (replicates_section,)
