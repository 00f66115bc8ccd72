"""Report section ``sphere_toy`` (docs/theory.md §8, the free-energy paper's 3D sphere toy): loss and
gradient statistics per LR, stationary snr against the LR, UP snr increasing with the LR, OP small
LRs converging with a positive final snr."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from analysis import figures
from analysis.sections.common import (SectionResult, Skip, finite_rows, log_axes, split_by_member, toy_members,
                                      write_table)
from trainables.toys.sphere import CONVERGED_LOSS  # §8: OP losses below it count as converged (masked)

ORDER = 50
OP_SMALL_LR = 0.1              # "small" LRs of the OP convergence check (lr ≤ this)
UP_SPEARMAN_MIN = 0.9          # UP stationary snr counts as increasing with LR above this ...
UP_INCREASING_LR_MAX = 1.0     # ... over lr ≤ this (beyond, huge steps randomise w and snr falls)
SPHERE_METRICS = (("train_loss", "train loss"), ("snr", "snr"),
                  ("full_grad_norm", r"$|\bar g|$"), ("stoch_grad_mean_norm", r"mean $|g_i|$"))


def monotone_fraction(x, y):
    """Fraction of consecutive pairs (sorted by x) where y increases."""
    order = np.argsort(np.asarray(x, dtype=float), kind="stable")
    d = np.diff(np.asarray(y, dtype=float)[order])
    d = d[np.isfinite(d)]
    return float(np.mean(d > 0)) if d.size else float("nan")


def _spearman(x, y):
    """Spearman rank correlation (NaN with fewer than 3 points)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(spearmanr(x, y)[0]) if x.size >= 3 else float("nan")


def sphere_toy_table(sweep, members, by_member=None):
    """One row per sphere-toy member: setting, lr, status, final loss / snr, stationary snr.

    ``members``: rows of ``member_table``; ``by_member``: their series rows (``split_by_member``),
    split here when not given."""
    if by_member is None:
        by_member = split_by_member(sweep.series, members.index)
    rows = []
    for rid, m in members.iterrows():
        series = by_member.get(rid)
        it, (loss,) = finite_rows(series, "train_loss")
        _, (snr,) = finite_rows(series, "snr")
        conv = m.get("status") == "converged" or (loss.size > 0 and loss[-1] < CONVERGED_LOSS)
        hit = np.nonzero(loss < CONVERGED_LOSS)[0]
        rows.append({"run_id": rid, "setting": m.get("setting"), "lr": float(m["lr"]),
                     "status": m.get("status"), "n_logs": int(it.size),
                     "final_loss": float(loss[-1]) if loss.size else float("nan"),
                     "final_snr": float(snr[-1]) if snr.size else float("nan"),
                     "stationary_snr": float(m.get("snr", np.nan)),
                     "converged": bool(conv),
                     "converged_at": float(it[hit[0]]) if hit.size else float("nan")})
    return pd.DataFrame(rows).sort_values(["setting", "lr"], ignore_index=True)


def sphere_toy_section(sweep, out_dir, opts):
    """docs/theory.md §8 sphere toy (free-energy paper): training curves, snr vs LR, UP/OP checks."""
    res = SectionResult("sphere_toy")
    members = toy_members(sweep, "sphere_toy")
    by_member = split_by_member(sweep.series, members.index)
    t = sphere_toy_table(sweep, members, by_member)
    write_table(t, out_dir, "sphere_toy.csv", res)
    settings = [s for s in ("up", "op") if (t["setting"] == s).any()]
    if not settings:
        raise Skip(f"sphere_toy members have no setting up/op (found {sorted(set(t['setting']))})")
    _training_figure(t, settings, by_member, out_dir, res)
    _snr_figure(t, out_dir, res)
    for setting in settings:
        res.summary_rows.append(_setting_row(t, setting))
    res.notes.append(f"UP counts as increasing when the Spearman correlation of stationary snr with LR "
                     f"over lr ≤ {UP_INCREASING_LR_MAX} is ≥ {UP_SPEARMAN_MIN}; OP 'small' LRs are lr ≤ {OP_SMALL_LR}; OP losses below "
                     f"{CONVERGED_LOSS:g} count as converged and are masked in the loss panels")
    return res


def _training_figure(t, settings, by_member, out_dir, res):
    """Training curves: one row per setting, one column per metric, colour = LR."""
    fig, ax = figures.figure(len(SPHERE_METRICS), len(settings), width=4.6, height=3.6)
    _, sm = figures.value_colors(t["lr"])
    for r, setting in enumerate(settings):
        sub = t[t["setting"] == setting]
        colors = [sm.to_rgba(v) for v in sub["lr"]]
        for (_, m), c in zip(sub.iterrows(), colors):
            for a, (key, _) in zip(ax[r], SPHERE_METRICS):
                it, (v,) = finite_rows(by_member.get(m["run_id"]), key)
                keep = (it > 0) & (v > 0) & np.isfinite(v)
                if setting == "op" and key == "train_loss":
                    keep &= v >= CONVERGED_LOSS           # converged: masked (§8)
                a.plot(it[keep], v[keep], color=c, lw=1)
        for a, (key, name) in zip(ax[r], SPHERE_METRICS):
            log_axes(a, "iteration", name, f"{setting.upper()}: {name}")
    figures.colorbar(fig, ax, sm)
    res.figures.append(figures.save(fig, out_dir, "sphere_toy_training.png"))


def _snr_figure(t, out_dir, res):
    """Stationary snr against the LR: UP the mean over the last W logs, OP the final value."""
    fig, ax = figures.figure(1, width=6)
    for setting, key, mk in (("up", "stationary_snr", "o-"), ("op", "final_snr", "s-")):
        sub = t[t["setting"] == setting]
        keep = figures.positive(sub["lr"], sub[key])
        if keep.any():
            what = "mean of the last W logs" if setting == "up" else "final value"
            ax[0, 0].plot(sub["lr"][keep], sub[key][keep], mk, ms=4, label=f"{setting.upper()} ({what})")
    log_axes(ax[0, 0], figures.ETA, "snr", "sphere toy: stationary snr vs LR")
    ax[0, 0].legend()
    res.figures.append(figures.save(fig, out_dir, "sphere_toy_snr.png"))


def _setting_row(t, setting):
    """The summary row of one setting: how snr moves with the LR, and the UP or OP check."""
    sub = t[t["setting"] == setting]
    key = "stationary_snr" if setting == "up" else "final_snr"
    sub = sub[np.isfinite(sub[key])]
    row = {"group": setting, "n_members": len(sub), "snr_used": key,
           "snr_spearman": _spearman(sub["lr"], sub[key]),
           "snr_monotone_fraction": monotone_fraction(sub["lr"], sub[key]),
           "snr_at_lr_min": float(sub[key].iloc[0]) if len(sub) else float("nan"),
           "snr_at_lr_max": float(sub[key].iloc[-1]) if len(sub) else float("nan"),
           "snr_max": float(sub[key].max()) if len(sub) else float("nan"),
           "lr_at_snr_max": float(sub.loc[sub[key].idxmax(), "lr"]) if len(sub) else float("nan")}
    row.update(_up_check(sub, key) if setting == "up" else _op_check(sub))
    return row


def _up_check(sub, key):
    """UP: does the stationary snr increase with the LR (Spearman over lr ≤ UP_INCREASING_LR_MAX)?"""
    low = sub[sub["lr"] <= UP_INCREASING_LR_MAX]
    rho = _spearman(low["lr"], low[key])
    return dict(increasing_lr_max=UP_INCREASING_LR_MAX, snr_spearman_low_lr=rho,
                snr_monotone_fraction_low_lr=monotone_fraction(low["lr"], low[key]),
                snr_increasing=bool(rho >= UP_SPEARMAN_MIN), n_converged=int(sub["converged"].sum()))


def _op_check(sub):
    """OP: do the small LRs converge, with a positive final snr?"""
    small = sub[sub["lr"] <= OP_SMALL_LR]
    conv = sub[sub["converged"]]
    small_conv = small[small["converged"]]
    return dict(small_lr_max=OP_SMALL_LR, n_small=len(small),
                frac_small_converged=float(small["converged"].mean()) if len(small) else float("nan"),
                frac_converged_snr_positive=(float((small_conv["final_snr"] > 0).mean())
                                             if len(small_conv) else float("nan")),
                n_converged_all=len(conv),
                largest_converged_lr=float(conv["lr"].max()) if len(conv) else float("nan"),
                snr_spearman_converged=_spearman(conv["lr"], conv["final_snr"]))


SECTIONS = (sphere_toy_section,)
