"""Report section ``batch_size`` (issue #12; docs/theory.md §10): T(η) per batch size B, T against η/B,
the fit T ≈ b η^a B^c and the η/B verdict (analysis.batch_size). Skips unless the sweep has ≥ 2 batch
sizes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import figures
from analysis.batch_size import LEVEL, fit_batch_power_law, free_energy_points, ideal_gas_points
from analysis.replicates import replicate_axes
from analysis.sections.common import SectionResult, Skip, knn_k, member_table, slug, write_table

ORDER = 60


def batch_size_section(sweep, out_dir, opts):
    """Issue #12: T(η) per B, T against η/B, the fit T ≈ b η^a B^c and the η/B verdict."""
    res = SectionResult("batch_size")
    tab = member_table(sweep)
    nB = tab["batch_size"].nunique() if "batch_size" in tab.columns else 0
    if nB < 2:
        raise Skip(f"the sweep has {nB} batch size(s); the batch-size analysis needs ≥ 2 "
                   "(put batch_size on an axis)")
    if "lr" not in tab.columns:
        raise Skip("members have no lr param")
    rep = replicate_axes(tab)
    rows, notes = [], []
    names = sweep.metric_names
    if "train_loss" in names and any(n.startswith("entropy_knn_k") for n in names):
        K = knn_k(names, opts.k_max)
        rows, notes = free_energy_points(tab, f"entropy_knn_k{K}", opts, rep)
    rows += ideal_gas_points(tab, rep)
    res.notes += notes
    if not rows:
        raise Skip("no temperature: needs train_loss with a k-NN entropy (§5) or trace_sigma (§7); "
                   + ("; ".join(notes) or "neither was logged"))
    points = pd.DataFrame(rows)
    if rep:
        res.notes.append(f"seeds ({', '.join(rep)}) averaged per (η, B) before the fits")
    for (label, source), p in points.groupby(["group", "source"], sort=True):
        try:
            fit = fit_batch_power_law(p["lr"], p["batch_size"], p["T"], LEVEL)
        except ValueError as e:
            res.notes.append(f"group {label}, {source}: {e}")
            continue
        res.notes.append(f"group {label}, {source}: {fit.verdict_line()}")
        res.figures.append(_batch_figure(p, fit, out_dir, label, source))
        res.summary_rows.append(_fit_row(label, source, p, fit))
    write_table(points, out_dir, "batch_size_temperatures.csv", res)
    if not res.summary_rows:
        raise Skip("no group could be fitted: " + "; ".join(res.notes))
    return res


def _fit_row(label, source, p, fit):
    """The summary row of one fit T ≈ b η^a B^c."""
    return {"group": label, "source": source, "n_points": fit.n, "n_batch_sizes": p["batch_size"].nunique(),
            "a": fit.a, "a_half": fit.half_a, "c": fit.c, "c_half": fit.half_c, "a_plus_c": fit.a + fit.c,
            "a_plus_c_half": fit.half_sum, "b": fit.b, "r2": fit.r2, "level": LEVEL,
            "verdict": fit.verdict()}


def _batch_figure(p, fit, out_dir, label, source):
    """T against η per B with the fitted power law, and T against η/B (the collapse)."""
    fig, ax = figures.figure(2, width=5.6)
    Bs = np.sort(p["batch_size"].unique())
    colors, sm = figures.value_colors(Bs)
    for B, col in zip(Bs, colors):
        q = p[p["batch_size"] == B].sort_values("lr")
        ax[0, 0].plot(q["lr"], q["T"], "o", color=col, ms=5)
        ax[0, 0].plot(q["lr"], fit.predict(q["lr"], B), "-", color=col, lw=1)
        ax[0, 1].plot(q["lr"] / B, q["T"], "o-", color=col, ms=5, lw=0.8)
    ratio = np.geomspace((p["lr"] / p["batch_size"]).min(), (p["lr"] / p["batch_size"]).max(), 30)
    ax[0, 1].plot(ratio, fit.b * ratio ** fit.a * np.median(Bs) ** (fit.a + fit.c), "k--", lw=1,
                  label=f"fit at B = {np.median(Bs):.4g}")
    ax[0, 0].set_xlabel(figures.ETA)
    ax[0, 1].set_xlabel(r"$\eta / B$")
    ax[0, 0].set_title(fr"$T \approx {fit.b:.3g}\,\eta^{{{fit.a:.3f}}} B^{{{fit.c:.3f}}}$")
    ax[0, 1].set_title(f"collapse? a + c = {fit.a + fit.c:.3f} ± {fit.half_sum:.2g}")
    for a in ax[0]:
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_ylabel(f"temperature T ({source})")
    ax[0, 1].legend()
    figures.colorbar(fig, ax, sm, label="batch size B")
    fig.suptitle(f"batch size, {label}")
    return figures.save(fig, out_dir, f"bs_{slug(label)}_{slug(source.split(' (')[0])}.png")


SECTIONS = (batch_size_section,)
