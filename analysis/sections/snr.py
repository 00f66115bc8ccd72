"""Report section ``snr`` (docs/theory.md §6): gradient norms and snr against iteration and LR, and the
gradient phase diagram with its exponent per member (and against the training-subset size)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import figures
from analysis.sections.common import (SectionResult, Skip, finite_rows, group_members, log_axes, lr_label,
                                      lr_lines, member_table, slug, split_by_member, write_table)
from analysis.settings import group_settings
from analysis.snr import default_phase_threshold, gradient_phase_exponent

ORDER = 20
SNR_METRICS = ("full_grad_norm", "stoch_grad_mean_norm", "snr")
SNR_LABELS = {"full_grad_norm": r"$|\bar g|$", "stoch_grad_mean_norm": r"mean $|g_i|$", "snr": "snr"}


def snr_section(sweep, out_dir, opts):
    """docs/theory.md §6: gradient norms and snr vs iteration and LR, gradient phase diagram."""
    res = SectionResult("snr")
    present = [m for m in SNR_METRICS if m in sweep.metric_names]
    if not present:
        raise Skip(f"no gradient metrics ({', '.join(SNR_METRICS)}) logged")
    tab = member_table(sweep)
    if "lr" not in tab.columns:
        raise Skip("members have no lr param")
    phase_ok = {"full_grad_norm", "stoch_grad_mean_norm"} <= set(present)
    if not phase_ok:
        res.notes.append("phase diagram needs full_grad_norm and stoch_grad_mean_norm; skipped")
    exponents = []
    by_member = split_by_member(sweep.series, tab.index)
    for label, g in group_members(tab, ("lr",)):
        g = g.sort_values("lr")
        _training_figure(g, label, present, by_member, out_dir, res)
        row = {"group": label}
        if "snr" in g:
            _stationary_figure(g, label, row, out_dir, res)
        if phase_ok:
            found = _phase_exponents(g, label, group_settings(g, opts).phase_window, by_member, res)
            exponents += found
            _phase_figure(g, label, found, by_member, row, out_dir, res)
        res.summary_rows.append(row)
    if exponents:
        _exponent_tables(pd.DataFrame(exponents), out_dir, res)
    return res


def _training_figure(g, label, present, by_member, out_dir, res):
    """The logged gradient statistics against iteration, one line per member coloured by LR."""
    _, sm = figures.value_colors(g["lr"])
    fig, ax = figures.figure(len(present))
    for a, m in zip(ax[0], present):
        lr_lines(a, by_member, g, m)
        a.set_ylabel(SNR_LABELS[m])
    fig.suptitle(f"gradient statistics, {label}")
    figures.colorbar(fig, ax, sm)
    res.figures.append(figures.save(fig, out_dir, f"snr_{slug(label)}_training.png"))


def _stationary_figure(g, label, row, out_dir, res):
    """Stationary snr against the LR; its values at the smallest and largest LR go into ``row``."""
    fig, ax = figures.figure(1)
    keep = figures.positive(g["lr"], g["snr"])
    ax[0, 0].plot(g["lr"][keep], g["snr"][keep], "o-")
    log_axes(ax[0, 0], lr_label(g), "stationary snr", f"stationary snr, {label}")
    res.figures.append(figures.save(fig, out_dir, f"snr_{slug(label)}_stationary.png"))
    row["snr_at_lr_min"] = float(g["snr"].iloc[0])
    row["snr_at_lr_max"] = float(g["snr"].iloc[-1])


def _phase_window(member, it, window):
    """(lo, hi) iterations of the phase fit: the grid's window (ResNet: 1e4 ≤ t ≤ 4e5), else ≥ 2e5 of
    1.6M scaled to the run (§6)."""
    if window is not None:
        return window
    n_it = member.get("iterations")
    n_it = int(n_it) if n_it is not None and np.isfinite(n_it) else int(it.max(initial=0))
    return default_phase_threshold(max(n_it, 1)), math.inf


def _phase_exponents(g, label, window, by_member, res):
    """One row per member: the phase-diagram exponent a and intercept b fitted in its window."""
    out = []
    for rid, m in g.iterrows():
        it, (full, stoch) = finite_rows(by_member.get(rid), "full_grad_norm", "stoch_grad_mean_norm")
        thr, hi = _phase_window(m, it, window)
        e = {"group": label, "run_id": rid, "lr": float(m["lr"]), "threshold": thr, "threshold_hi": hi,
             "samples_per_label": m.get("samples_per_label"),
             "n_points": int(((it >= thr) & (it <= hi)).sum())}
        try:
            e["exponent_a"], e["intercept_b"] = gradient_phase_exponent(full, stoch, it, thr, hi)
        except ValueError as err:
            e["exponent_a"] = e["intercept_b"] = float("nan")
            res.notes.append(f"{rid} (lr={m['lr']:.4g}): phase fit skipped: {err}")
        out.append(e)
    return out


def _phase_figure(g, label, exponents, by_member, row, out_dir, res):
    """The gradient phase diagram (mean stochastic vs full gradient norm) with each member's fit; the
    smallest LR's fit goes into ``row``."""
    colors, sm = figures.value_colors(g["lr"])
    fig, ax = figures.figure(1, width=6)
    for (rid, _), c, e in zip(g.iterrows(), colors, exponents):
        it, (full, stoch) = finite_rows(by_member.get(rid), "full_grad_norm", "stoch_grad_mean_norm")
        k = (it >= e["threshold"]) & (it <= e["threshold_hi"]) & figures.positive(full, stoch)
        ax[0, 0].plot(full[k], stoch[k], ".", color=c, ms=4)
        if np.isfinite(e["exponent_a"]) and k.any():
            x = np.geomspace(full[k].min(), full[k].max(), 20)
            ax[0, 0].plot(x, np.exp(e["intercept_b"]) * x ** e["exponent_a"], "-", color=c, lw=1)
    log_axes(ax[0, 0], r"full gradient norm $|\bar g|$", r"mean stochastic gradient norm")
    if exponents:
        first = exponents[0]
        ax[0, 0].set_title(f"gradient phase diagram, {label}\nsmallest LR: a = {first['exponent_a']:.3f}")
        row.update(lr_min=first["lr"], exponent_a=first["exponent_a"], intercept_b=first["intercept_b"],
                   threshold=first["threshold"], threshold_hi=first["threshold_hi"])
    figures.colorbar(fig, ax, sm)
    res.figures.append(figures.save(fig, out_dir, f"snr_{slug(label)}_phase.png"))


def _exponent_tables(e, out_dir, res):
    """snr_phase_exponents.csv, and the smallest LR's exponent against the subset size when the sweep
    has ≥ 2 of them."""
    write_table(e, out_dir, "snr_phase_exponents.csv", res)
    spl = e.dropna(subset=["samples_per_label"])
    if spl["samples_per_label"].nunique() < 2:
        res.notes.append("exponent vs samples_per_label not drawn: the sweep has < 2 subset sizes")
        return
    first = spl.sort_values("lr").groupby("group", sort=False).head(1).sort_values("samples_per_label")
    fig, ax = figures.figure(1)
    ax[0, 0].plot(first["samples_per_label"], first["exponent_a"], "o-")
    ax[0, 0].axhline(1.0, color="k", ls="--", lw=1, label="interpolation (a = 1)")
    log_axes(ax[0, 0], "samples per label", "phase exponent a (smallest LR)", ylog=False)
    ax[0, 0].legend()
    res.figures.append(figures.save(fig, out_dir, "snr_exponent_vs_subset.png"))
    write_table(first, out_dir, "snr_exponent_vs_subset.csv", res)


SECTIONS = (snr_section,)
