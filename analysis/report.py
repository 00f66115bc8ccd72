"""Sweep report: figures and summary tables for one MLflow experiment (docs/theory.md §§5–7).

    python -m analysis.report --experiment NAME [--tracking-uri URI] [--out DIR]
        [--parent-run ID] [--window W] [--eps [MATCH:]E] [--lr-range [MATCH] LO HI] [--no-upload]

ε, the LR segment, W, the phase-diagram window and the OP smoothing are chosen per group of members
(analysis.settings): report options first, then the grid's ``analysis:`` block (read from the parent
run's grid.yaml), then the papers' defaults by regime. Each group's ε is printed.

Writes PNG figures, ``summary.md``, ``summary.csv`` and per-section CSV tables into OUT
(default ``reports/NAME``), then logs the folder to the parent run under ``report/``.

Sections are plain functions ``section(sweep, out_dir, opts) -> SectionResult`` kept in the
registry ``SECTIONS`` of ``analysis.sections``. A section raises ``Skip(reason)`` when the sweep
lacks what it needs; any other exception is caught too, so one broken section never stops the
report. Another module adds its own with ``register_section(fn)`` from ``analysis.sections``;
``main`` imports ``analysis.toys_report`` (if it exists) before running, so registering at its
import time is enough.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import re
import sys
import traceback

import numpy as np
import pandas as pd
import torch
import yaml

from analysis import figures as fg
from analysis import ideal_gas as ig
from analysis.figures import plt
from analysis.free_energy import (fit_temperature, free_energy_curves, smooth_log_gaussian,
                                  temperature_along_training)
from analysis.load import WINDOW_DEFAULT, WINDOW_IDEAL_GAS, SweepNotFound, Sweep, load_experiment
from analysis.sections import (SECTIONS, Options, SectionResult, Skip, finite_rows, for_each_group,
                               finite_stat, group_members, heatmap, member_table, register_section,
                               rel_err, slug, split_by_member, write_table)
from analysis.settings import (apply_windows, group_settings, member_windows, read_grid_block,
                               slice_range)
from analysis.snr import default_phase_threshold, gradient_phase_exponent

PLUGINS = ("analysis.toys_report", "analysis.open_questions")


# -----------------------------------------------------------------------------
# shared helpers

def _fmt(v):
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def md_table(rows) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _measured_vs_predicted(t, measured, predictions, row, res, out_dir, name, xlabel, ylabel, title):
    """Log–log scatter of a measured column against its predictions (SDE first, then discrete),
    with the identity line; records each prediction's median relative error in ``row``."""
    fig, ax = fg.figure(1, width=6)
    for k, mk in zip(predictions, ("o", "s")):
        ax[0, 0].plot(t[k], t[measured], mk, mfc="none", label=k.replace("_", " "))
        row[f"{k}_rel_err_median"] = finite_stat(rel_err(t[measured], t[k]))
    fg.identity_line(ax[0, 0], np.r_[t[measured], t[predictions[0]]])
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_yscale("log")
    ax[0, 0].set_xlabel(xlabel)
    ax[0, 0].set_ylabel(ylabel)
    ax[0, 0].set_title(title)
    ax[0, 0].legend()
    res.figures.append(fg.save(fig, out_dir, name))


def _lr_lines(ax, by_member, g, metric, ylog=True):
    """One curve per member of ``metric`` vs iteration (iteration > 0, log x), coloured by LR;
    ``by_member``: the members' series rows from ``split_by_member``."""
    colors, _ = fg.value_colors(g["lr"])
    drawn = 0
    for (rid, _), c in zip(g.iterrows(), colors):
        it, (v,) = finite_rows(by_member.get(rid), metric)
        keep = it > 0
        if ylog:
            keep &= v > 0
        if keep.any():
            ax.plot(it[keep], v[keep], color=c, lw=1.2)
            drawn += 1
    ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel("iteration t")
    return drawn


# -----------------------------------------------------------------------------
# §5 free energy

def _knn_k(names, k_max):
    ks = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"entropy_knn_k(\d+)", n)))
    ok = [k for k in ks if k <= k_max]
    if not ok:
        raise Skip(f"no k-NN entropy metric entropy_knn_k<K> with K ≤ {k_max} logged "
                   f"(found {ks or 'none'}); the free-energy analysis needs S (§4a)")
    return ok[-1]


_UNIFORM_CACHE: dict = {}
NETWORK_MODELS = ("convnet", "resnet18")


def _knn_window(entropy_param):
    specs = entropy_param if isinstance(entropy_param, list) else []
    for s in specs:
        if isinstance(s, dict) and s.get("name") == "knn":
            return int(s.get("window", 1000))
    return 1000


def uniform_entropy(D, n, k):
    """k-NN entropy of n uniform directions on the unit sphere in R^D (docs/theory.md §4, cached)."""
    key = (int(D), int(n), int(k))
    if key not in _UNIFORM_CACHE:
        from trainables.entropy import uniform_sphere_reference
        _UNIFORM_CACHE[key] = uniform_sphere_reference(int(D), n=int(n), ks=[int(k)])[
            f"entropy_knn_k{min(int(k), int(n) - 1)}"]
    return _UNIFORM_CACHE[key]


def uniform_loss(member: dict, n: int, D: int, device="auto"):
    """Expected train loss of the member's network for θ uniform on the unit sphere (docs/theory.md §4
    "uniform reference"): n directions, each loaded into the model, train loss over the training
    (sub)set in train-mode BN chunks of 1024, on the device (cuda if available). Cached per setup.
    Raises ValueError when the model cannot be rebuilt (a toy, or D ≠ the member's D)."""
    from trainables.data import load_dataset
    from trainables.defaults import resolve_device
    from trainables.entropy import uniform_sphere_reference
    from trainables.metrics import evaluate
    from trainables.models import build_model, flatten_si_parameters

    keys = ("model", "width", "dataset", "samples_per_label", "loss", "init_seed", "head_seed", "data_seed",
            "data_dir")
    cfg = {k: member.get(k) for k in keys}
    if cfg["model"] not in NETWORK_MODELS:
        raise ValueError(f"model {cfg['model']!r} is not a network")
    cache_key = ("loss", int(n), repr(sorted(cfg.items())))
    if cache_key not in _UNIFORM_CACHE:
        dev = resolve_device(device)
        spl = cfg["samples_per_label"]
        data = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"], download=False, device=dev,
                            samples_per_label=None if spl is None or spl != spl else int(spl),
                            data_seed=int(cfg["data_seed"] or 1))
        model = build_model(cfg["model"], int(cfg["width"]), data.num_classes, in_channels=data.in_channels,
                            loss=cfg["loss"] or "ce", init_seed=int(cfg["init_seed"] or 1),
                            head_seed=int(cfg["head_seed"] or 4)).to(dev)
        theta, _ = flatten_si_parameters(model)
        if theta.numel() != int(D):
            raise ValueError(f"the rebuilt model has D = {theta.numel()}, the members logged D = {int(D)}")

        def loss_fn(rows):
            out = torch.empty(rows.shape[0], dtype=torch.float64)
            for i, row in enumerate(rows):
                theta.copy_(row)
                out[i] = evaluate(model, data.x_train, data.y_train, cfg["loss"] or "ce", train_mode=True)[0]
            return out
        _UNIFORM_CACHE[cache_key] = uniform_sphere_reference(int(D), n=int(n), ks=[1], loss_fn=loss_fn,
                                                             device=dev)["train_loss"]
    return _UNIFORM_CACHE[cache_key]


def _steadily_decreasing(U, frac=0.8):
    d = np.diff(U)
    return d.size > 0 and (d < 0).mean() >= frac and U[-1] < U[0]


def free_energy_section(sweep, out_dir, opts):
    """docs/theory.md §5: U, S vs LR, temperature intervals, power law, F curves, OP decay."""
    res = SectionResult("free_energy")
    names = sweep.metric_names
    if "train_loss" not in names:
        raise Skip("no train_loss metric logged; U (§5) is the stationary train loss")
    K = _knn_k(names, opts.k_max)
    ent = f"entropy_knn_k{K}"
    tab = member_table(sweep)
    if "lr" not in tab.columns:
        raise Skip("members have no lr param")
    res.notes.append(f"S = {ent}; smoothing h = {opts.h}; ε and the LR segment per group (below)")
    by_member = split_by_member(sweep.series, tab.index)
    return for_each_group(res, tab, ("lr",), lambda label, g: _free_energy_group(
        by_member, out_dir, opts, res, label, g.sort_values("lr"), ent, K))


def _uniform_asymptotes(g, label, K, opts, res):
    """(S, U) of θ uniform on the unit sphere (docs/theory.md §4), the asymptotes of large LRs; None where
    unavailable (a note says why). S from n = the k-NN window N samples (or --uniform-n), U from
    the member's model over its training set (skipped with --no-uniform-loss)."""
    D = g["D"].dropna().unique() if "D" in g else []
    if len(D) != 1:
        res.notes.append(f"group {label}: no single D param; uniform reference skipped")
        return None, None
    S_uni = U_uni = None
    N = _knn_window(g["entropy"].iloc[0]) if "entropy" in g else 1000
    n = opts.uniform_n or N
    try:
        S_uni = uniform_entropy(D[0], n, K)
        note = "" if n == N else f" (≠ window N = {N}: not on the same scale)"
        res.notes.append(f"group {label}: uniform reference S = {S_uni:.6g} from n = {n} samples{note}")
    except Exception as e:  # noqa: BLE001 - a missing reference must not stop the section
        res.notes.append(f"group {label}: uniform reference S failed: {e}")
    if opts.uniform_loss:
        try:
            U_uni = uniform_loss(g.iloc[0].to_dict(), opts.uniform_loss_n, D[0])
            res.notes.append(f"group {label}: uniform reference U = {U_uni:.6g} (train loss, "
                             f"{opts.uniform_loss_n} uniform directions)")
        except Exception as e:  # noqa: BLE001
            res.notes.append(f"group {label}: uniform reference U skipped: {e}")
    return S_uni, U_uni


def _free_energy_group(by_member, out_dir, opts, res, label, g, ent, K):
    s = slug(label)
    U_all = g["train_loss"].to_numpy(float) if "train_loss" in g else np.full(len(g), np.nan)
    S_all = g[ent].to_numpy(float) if ent in g else np.full(len(g), np.nan)
    ok = np.isfinite(U_all) & np.isfinite(S_all)
    for rid in g.index[~ok]:
        res.notes.append(f"group {label}: member {rid} (lr={g.loc[rid, 'lr']:.4g}) has no "
                         f"stationary train_loss/{ent}; dropped")
    gf = g[ok]
    if gf["lr"].duplicated().any():
        res.notes.append(f"group {label}: several members share an LR; their stationary values are averaged")
    agg = gf.groupby("lr")[["train_loss", ent]].mean()
    if len(agg) < 3:
        raise Skip(f"only {len(agg)} distinct LR(s) with finite U and S; need ≥ 3")
    lrs, U, S = agg.index.to_numpy(float), agg["train_loss"].to_numpy(), agg[ent].to_numpy()
    st = group_settings(g, opts)
    lr_range = st.lr_range
    try:
        if st.lr_slice is not None:      # a slice of the group's own sorted LR grid (docs/theory.md §5.1)
            lr_range = slice_range(g["lr"].unique(), st.lr_slice)
        fit = fit_temperature(lrs, U, S, st.eps, h=opts.h, lr_range=lr_range)
    except ValueError as e:
        raise Skip(f"temperature fit failed: {e}") from None
    msg = (f"group {label}: {st.regime.upper()} ({st.regime_source}); ε = {st.eps:g} ({st.eps_source}); "
           f"{st.segment_text()}")
    print(f"[free_energy] {msg}")
    res.notes.append(msg)

    S_uni, U_uni = _uniform_asymptotes(g, label, K, opts, res)

    colors, sm = fg.value_colors(g["lr"])
    # 1. training curves
    fig, ax = fg.figure(2)
    _lr_lines(ax[0, 0], by_member, g, "train_loss")
    ax[0, 0].set_ylabel("train loss U")
    _lr_lines(ax[0, 1], by_member, g, ent, ylog=False)
    ax[0, 1].set_ylabel(f"entropy S (k = {K})")
    fig.suptitle(f"training, {label}")
    fg.colorbar(fig, ax, sm)
    res.figures.append(fg.save(fig, out_dir, f"fe_{s}_training.png"))

    # 2. stationary U and S vs LR
    fig, ax = fg.figure(2)
    for a, raw, smooth, name in ((ax[0, 0], U_all, fit.U, "stationary train loss U"),
                                 (ax[0, 1], S_all, fit.S, f"stationary entropy S (k = {K})")):
        a.plot(g["lr"], raw, "o-", color="C0", label="stationary (last W logs)")
        a.plot(fit.lrs, smooth, "-", color="C3", lw=2, label="smoothed, segment")
        a.axvspan(fit.lrs[0], fit.lrs[-1], color="C3", alpha=0.08)
        a.set_xscale("log")
        a.set_xlabel(fg.ETA)
        a.set_ylabel(name)
    if S_uni is not None:
        fg.off_scale_line(ax[0, 1], S_uni, S_all, "uniform on sphere")
    if U_uni is not None:
        fg.off_scale_line(ax[0, 0], U_uni, U_all, "uniform on sphere")
    for a in ax[0]:
        a.legend()
    fig.suptitle(f"stationary values, {label}")
    res.figures.append(fg.save(fig, out_dir, f"fe_{s}_stationary.png"))

    # 3. temperature intervals and power law
    fig, ax = fg.figure(1, width=6)
    a = ax[0, 0]
    band = fg.positive(fit.lrs, fit.lower) & fg.positive(fit.lrs, fit.upper)
    a.fill_between(fit.lrs[band], fit.lower[band], fit.upper[band], color="C0", alpha=0.3,
                   label="T interval")
    pos = fg.positive(fit.lrs, fit.T)
    a.plot(fit.lrs[pos], fit.T[pos], "o", color="C0", label="estimate √(lower·upper)")
    if fit.empty.any():
        a.plot(fit.lrs[fit.empty & pos], fit.T[fit.empty & pos], "x", color="C3", ms=10,
               label="empty interval")
    if np.isfinite(fit.a):
        a.plot(fit.lrs, fit.b * fit.lrs**fit.a, "k--",
               label=fr"fit $T = {fit.b:.3g}\,\eta^{{{fit.a:.3f}}}$")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel(fg.ETA)
    a.set_ylabel("temperature T")
    a.set_title(f"T(η), {label}, ε = {st.eps:g}")
    a.legend()
    res.figures.append(fg.save(fig, out_dir, f"fe_{s}_temperature.png"))

    # 4. free-energy curves F_i(η) = U(η) − T_i S(η)
    F = free_energy_curves(fit.U, fit.S, fit.T)
    seg_colors, seg_sm = fg.value_colors(fit.lrs)
    fig, ax = fg.figure(1, width=6)
    a = ax[0, 0]
    for i in range(len(fit.lrs)):
        if not np.all(np.isfinite(F[i])):
            continue
        f = F[i] - F[i].min()
        a.plot(fit.lrs, f, "-", color=seg_colors[i], lw=1)
        m = fit.minima[i]
        a.plot(fit.lrs[m], f[m], "o", color=seg_colors[i], ms=6)
        a.plot(fit.lrs[i], f[i], "s", mfc="none", mec=seg_colors[i], ms=8)
    a.set_xscale("log")
    a.set_xlabel(fg.ETA)
    a.set_ylabel(r"$F_i(\eta) - \min F_i$")
    a.set_title(f"free-energy curves (● minimum, □ own η_i), {label}")
    fg.colorbar(fig, ax, seg_sm, label=r"$\eta_i$ of the curve's $T_i$")
    res.figures.append(fg.save(fig, out_dir, f"fe_{s}_free_energy.png"))

    # 5. OP temperature decay along training: the smallest LRs whose U decreases steadily (§5.6)
    rows, lines = [], []
    for rid in g.index:
        if len(lines) == st.op_lrs:
            break
        it, (Ut, St) = finite_rows(by_member.get(rid), "train_loss", ent)
        keep = it > 0
        it, Ut, St = it[keep][-100:], Ut[keep][-100:], St[keep][-100:]
        if it.size < 5 or not _steadily_decreasing(Ut):
            continue
        if st.op_smooth_sigma is not None:   # CIFAR-100 variant: Gaussian in ln t first
            Ut, St = (smooth_log_gaussian(it, v, st.op_smooth_sigma) for v in (Ut, St))
        Tt = temperature_along_training(Ut, St, delta=2, last=100)
        its = it[2:2 + Tt.size]
        lr = float(g.loc[rid, "lr"])
        rows += [{"run_id": rid, "lr": lr, "iteration": i, "T": t} for i, t in zip(its, Tt)]
        lines.append((lr, its, Tt))
    if lines:
        write_table(pd.DataFrame(rows), out_dir, f"fe_{s}_op_temperature.csv", res)
    if lines and not any(fg.positive(its, Tt).any() for _, its, Tt in lines):
        res.notes.append(f"group {label}: no positive T_t along training (U and S move the same way); "
                         "see the table")
    elif lines:
        fig, ax = fg.figure(1, width=6)
        a = ax[0, 0]
        for lr, its, Tt in lines:
            keep = fg.positive(its, Tt)
            a.plot(its[keep], Tt[keep], "o-", ms=3, label=f"η = {lr:.3g}")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("iteration t")
        a.set_ylabel(r"$T_t = \Delta U / \Delta S$ (Δ = 2 logs)")
        a.set_title(f"temperature along training, {label}")
        a.legend()
        res.figures.append(fg.save(fig, out_dir, f"fe_{s}_op_temperature.png"))
    else:
        res.notes.append(f"group {label}: no member has a steadily decreasing U over its last 100 logs; "
                         "temperature along training not drawn")

    # tables
    seg_pos = {float(v): j for j, v in enumerate(fit.lrs)}
    t = pd.DataFrame({"lr": lrs, "U": U, "S": S})
    j = [seg_pos.get(float(v)) for v in lrs]
    t["in_segment"] = [x is not None for x in j]
    for col, arr in (("U_smooth", fit.U), ("S_smooth", fit.S), ("T_lower", fit.lower),
                     ("T_upper", fit.upper), ("T", fit.T), ("empty", fit.empty)):
        t[col] = [arr[x] if x is not None else np.nan for x in j]
    t["F_min_lr"] = [fit.lrs[fit.minima[x]] if x is not None and fit.minima[x] >= 0 else np.nan
                     for x in j]
    write_table(t, out_dir, f"fe_{s}.csv", res)
    if not np.isfinite(fit.a):
        res.notes.append(f"group {label}: no power-law fit: it needs ≥ 2 interior segment points "
                         "with a positive temperature estimate")
    interior = fit.minima[1:-1] == np.arange(1, len(fit.lrs) - 1)
    res.summary_rows.append({
        "group": label, "k": K, "exponent_a": fit.a, "prefactor_b": fit.b, "holds": bool(fit.holds),
        "n_empty": int(fit.empty.sum()), "lr_lo": float(fit.lrs[0]), "lr_hi": float(fit.lrs[-1]),
        "n_segment": int(len(fit.lrs)), "regime": st.regime, "eps": st.eps, "eps_source": st.eps_source,
        "F_minima_at_own_lr": f"{int(interior.sum())}/{interior.size}"})


# -----------------------------------------------------------------------------
# §6 SNR

SNR_METRICS = ("full_grad_norm", "stoch_grad_mean_norm", "snr")


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
    exps = []
    by_member = split_by_member(sweep.series, tab.index)
    for label, g in group_members(tab, ("lr",)):
        g = g.sort_values("lr")
        window = group_settings(g, opts).phase_window
        s = slug(label)
        colors, sm = fg.value_colors(g["lr"])
        fig, ax = fg.figure(len(present))
        for a, m in zip(ax[0], present):
            _lr_lines(a, by_member, g, m)
            a.set_ylabel({"full_grad_norm": r"$|\bar g|$", "stoch_grad_mean_norm": r"mean $|g_i|$",
                          "snr": "snr"}[m])
        fig.suptitle(f"gradient statistics, {label}")
        fg.colorbar(fig, ax, sm)
        res.figures.append(fg.save(fig, out_dir, f"snr_{s}_training.png"))
        row = {"group": label}
        if "snr" in g:
            fig, ax = fg.figure(1)
            keep = fg.positive(g["lr"], g["snr"])
            ax[0, 0].plot(g["lr"][keep], g["snr"][keep], "o-")
            ax[0, 0].set_xscale("log")
            ax[0, 0].set_yscale("log")
            ax[0, 0].set_xlabel(fg.ETA)
            ax[0, 0].set_ylabel("stationary snr")
            ax[0, 0].set_title(f"stationary snr, {label}")
            res.figures.append(fg.save(fig, out_dir, f"snr_{s}_stationary.png"))
            row["snr_at_lr_min"] = float(g["snr"].iloc[0])
            row["snr_at_lr_max"] = float(g["snr"].iloc[-1])
        if phase_ok:
            fig, ax = fg.figure(1, width=6)
            for (rid, m), c in zip(g.iterrows(), colors):
                it, (full, stoch) = finite_rows(by_member.get(rid), "full_grad_norm", "stoch_grad_mean_norm")
                n_it = m.get("iterations")
                n_it = int(n_it) if n_it is not None and np.isfinite(n_it) else int(it.max(initial=0))
                # the grid's window (ResNet: 1e4 ≤ t ≤ 4e5), else ≥ 2e5 of 1.6M scaled to the run (§6)
                thr, hi = window if window is not None else (default_phase_threshold(max(n_it, 1)), math.inf)
                e = {"group": label, "run_id": rid, "lr": float(m["lr"]), "threshold": thr, "threshold_hi": hi,
                     "samples_per_label": m.get("samples_per_label"),
                     "n_points": int(((it >= thr) & (it <= hi)).sum())}
                try:
                    e["exponent_a"], e["intercept_b"] = gradient_phase_exponent(full, stoch, it, thr, hi)
                except ValueError as err:
                    e["exponent_a"] = e["intercept_b"] = float("nan")
                    res.notes.append(f"{rid} (lr={m['lr']:.4g}): phase fit skipped: {err}")
                exps.append(e)
                k = (it >= thr) & (it <= hi) & fg.positive(full, stoch)
                ax[0, 0].plot(full[k], stoch[k], ".", color=c, ms=4)
                if np.isfinite(e["exponent_a"]) and k.any():
                    x = np.geomspace(full[k].min(), full[k].max(), 20)
                    ax[0, 0].plot(x, np.exp(e["intercept_b"]) * x ** e["exponent_a"], "-", color=c, lw=1)
            ax[0, 0].set_xscale("log")
            ax[0, 0].set_yscale("log")
            ax[0, 0].set_xlabel(r"full gradient norm $|\bar g|$")
            ax[0, 0].set_ylabel(r"mean stochastic gradient norm")
            first = [e for e in exps if e["group"] == label]
            if first:
                ax[0, 0].set_title(f"gradient phase diagram, {label}\n"
                                   f"smallest LR: a = {first[0]['exponent_a']:.3f}")
                row.update(lr_min=first[0]["lr"], exponent_a=first[0]["exponent_a"],
                           intercept_b=first[0]["intercept_b"], threshold=first[0]["threshold"],
                           threshold_hi=first[0]["threshold_hi"])
            fg.colorbar(fig, ax, sm)
            res.figures.append(fg.save(fig, out_dir, f"snr_{s}_phase.png"))
        res.summary_rows.append(row)
    if exps:
        e = pd.DataFrame(exps)
        write_table(e, out_dir, "snr_phase_exponents.csv", res)
        spl = e.dropna(subset=["samples_per_label"])
        if spl["samples_per_label"].nunique() >= 2:
            first = spl.sort_values("lr").groupby("group", sort=False).head(1).sort_values(
                "samples_per_label")
            fig, ax = fg.figure(1)
            ax[0, 0].plot(first["samples_per_label"], first["exponent_a"], "o-")
            ax[0, 0].axhline(1.0, color="k", ls="--", lw=1, label="interpolation (a = 1)")
            ax[0, 0].set_xscale("log")
            ax[0, 0].set_xlabel("samples per label")
            ax[0, 0].set_ylabel("phase exponent a (smallest LR)")
            ax[0, 0].legend()
            res.figures.append(fg.save(fig, out_dir, "snr_exponent_vs_subset.png"))
            write_table(first, out_dir, "snr_exponent_vs_subset.csv", res)
        else:
            res.notes.append("exponent vs samples_per_label not drawn: the sweep has < 2 subset sizes")
    return res


# -----------------------------------------------------------------------------
# §7 ideal gas

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
    tab = tab[tab["protocol"].isin(ig.PROTOCOLS)]
    if tab.empty:
        raise Skip(f"no member with a protocol in {ig.PROTOCOLS}")
    return for_each_group(res, tab, ("lr", "wd", "r0"), lambda label, g: _ideal_gas_group(
        sweep, out_dir, opts, res, label, g, S_key))


def _ideal_gas_group(sweep, out_dir, opts, res, label, g, S_key):
    s = slug(label)
    protocol = g["protocol"].iloc[0]
    D = int(g["D"].iloc[0])
    t = pd.DataFrame({"run_id": g.index, "lr": g["lr"].to_numpy(float)})
    t["wd"] = g["wd"].to_numpy(float) if "wd" in g else 0.0
    t["r0"] = g["r0"].to_numpy(float) if "r0" in g else 1.0
    col = lambda k: g[k].to_numpy(float) if k in g else np.full(len(g), np.nan)  # noqa: E731
    tr, G2 = col("trace_sigma"), col("grad_sq")
    # §3: tr Σ averaged over the stationary logs first, then divided by D − 1
    t["sigma2"] = np.where(np.isfinite(tr), tr / (D - 1), col("sigma2"))
    t["trace_sigma"], t["grad_sq"] = tr, G2
    t["S_full"], t["radius"], t["U"] = col(S_key), col("radius"), col("train_loss")
    if protocol != "fixed_sphere":
        bad = ~(t["wd"] > 0)
        if bad.any():
            res.notes.append(f"group {label}: {int(bad.sum())} member(s) with wd = 0 dropped "
                             f"({protocol} needs λ > 0)")
            t = t[~bad].reset_index(drop=True)
    if len(t) < 2:
        raise Skip(f"only {len(t)} usable member(s)")
    t["T"] = ig.temperature(protocol, t["lr"], t["wd"] if protocol == "fixed_lr" else 0.0,
                            t["sigma2"], D)
    second = "r0" if protocol == "fixed_sphere" else "wd"
    sec_sym = r"$r_0$" if second == "r0" else r"weight decay $\lambda$"
    row = {"group": label, "protocol": protocol, "D": D, "n_members": len(t)}

    # state variables vs LR and vs the second axis
    qty = [("T", "temperature T", True), ("sigma2", r"$\sigma^2$", True),
           ("S_full", r"$S_\mathrm{full}$", False)]
    fig, ax = fg.figure(3, 2)
    for r, (xkey, lines_key, xlab) in enumerate((("lr", second, fg.ETA), (second, "lr", sec_sym))):
        colors, sm = fg.value_colors(np.sort(t[lines_key].unique()))
        for c, (v, sub) in zip(colors, t.sort_values(xkey).groupby(lines_key, sort=True)):
            for a, (k, name, ylog) in zip(ax[r], qty):
                keep = fg.positive(sub[xkey], sub[k]) if ylog else np.isfinite(sub[k]) & (sub[xkey] > 0)
                a.plot(sub[xkey][keep], sub[k][keep], "o-", color=c, ms=4)
        for a, (k, name, ylog) in zip(ax[r], qty):
            a.set_xscale("log")
            if ylog:
                a.set_yscale("log")
            a.set_xlabel(xlab)
            a.set_ylabel(name)
        fg.colorbar(fig, ax[r], sm, label=sec_sym if lines_key == second else fg.ETA)
    fig.suptitle(f"{protocol}, {label}")
    res.figures.append(fg.save(fig, out_dir, f"ig_{s}_state.png"))

    # V1: stationary radius (fixed ELR / LR)
    if protocol != "fixed_sphere":
        t["r_sde"] = ig.radius_sde(protocol, t["lr"], t["wd"], t["sigma2"], D)
        t["r_discrete"] = (ig.radius_discrete(protocol, t["lr"], t["wd"], t["trace_sigma"], t["grad_sq"])
                           if np.isfinite(G2).any() else np.nan)
        if np.isfinite(t["radius"]).any():
            _measured_vs_predicted(t, "radius", ("r_sde", "r_discrete"), row, res, out_dir,
                                   f"ig_{s}_radius.png", r"predicted radius $r^*$",
                                   r"measured stationary radius $r$", f"V1 radius, {label}")
        else:
            res.notes.append(f"group {label}: no radius metric; V1 radius check skipped")

    # fixed sphere: effective pressure from the pre-projection radius
    if protocol == "fixed_sphere":
        if "radius_preproj" not in sweep.running.columns:
            res.notes.append(f"group {label}: no running/radius_preproj; effective pressure skipped")
        else:
            r_tilde, n_used = [], []
            running = split_by_member(sweep.running, t["run_id"])
            for rid in t["run_id"]:
                _, (v,) = finite_rows(running.get(rid), "radius_preproj")
                v = v[-opts.pressure_last:]
                r_tilde.append(v.mean() if v.size else np.nan)
                n_used.append(v.size)
            t["r_tilde"], t["n_running"] = r_tilde, n_used
            t["p_measured"] = ig.effective_pressure(t["r_tilde"], t["r0"], t["lr"])
            t["p_predicted"] = ig.effective_pressure_prediction(t["T"], D, t["r0"])
            t["p_discrete"] = ig.effective_pressure_discrete(t["lr"], t["trace_sigma"], t["grad_sq"], t["r0"])
            if min(n_used) < opts.pressure_last:
                res.notes.append(f"group {label}: r̃ averaged over {min(n_used)}–{max(n_used)} running "
                                 f"logs (fewer than {opts.pressure_last}: short run)")
            _measured_vs_predicted(
                t, "p_measured", ("p_predicted", "p_discrete"), row, res, out_dir, f"ig_{s}_pressure.png",
                r"predicted $\lambda_\mathrm{eff}$",
                r"measured $\lambda_\mathrm{eff} = (\tilde r - r_0)/(\eta_\mathrm{eff} r_0^3)$",
                f"effective pressure, {label}")

    # V3: Maxwell relation (fixed ELR / LR)
    if protocol != "fixed_sphere":
        ok = np.isfinite(t["S_full"]).to_numpy()
        try:
            mf = ig.maxwell_fit(np.log(t["lr"][ok]), np.log(t["wd"][ok]), t["S_full"][ok], D, protocol)
        except ValueError as e:
            res.notes.append(f"group {label}: Maxwell fit skipped: {e}")
        else:
            row.update(maxwell_r2=mf.r2, ratio_1=mf.ratios[0], ratio_2=mf.ratios[1],
                       ratio_3=mf.ratios[2], rel_err_max=mf.rel_err_max, rel_err_mean=mf.rel_err_mean)
            res.notes.append(f"group {label}: Maxwell coefficients c0..c5 = "
                             + ", ".join(f"{c:.5g}" for c in mf.coef))
            t.loc[ok, "maxwell_rel_err"] = mf.rel_err
            fig, ax = fg.figure(2, width=6.2)
            tt = t[ok]
            colors, sm = fg.value_colors(tt["lr"].unique())
            for c, (lr, sub) in zip(colors, tt.sort_values("wd").groupby("lr", sort=True)):
                y = np.log(sub["wd"].to_numpy())
                ax[0, 0].plot(y, sub["S_full"], "o", color=c, ms=4)
                yy = np.linspace(y.min(), y.max(), 30)
                ax[0, 0].plot(yy, mf.value(math.log(lr), yy), "-", color=c, lw=1)
            ax[0, 0].set_xlabel(r"$\ln\lambda$")
            ax[0, 0].set_ylabel(r"$S_\mathrm{full}$ (points) and quadratic fit (lines)")
            ax[0, 0].set_title(f"Maxwell fit, R² = {mf.r2:.4f}")
            fg.colorbar(fig, ax[0, 0], sm)
            heatmap(ax[0, 1], tt["lr"].to_numpy(), tt["wd"].to_numpy(), mf.rel_err, fg.ETA,
                    r"$\lambda$", "relative error of the Maxwell relation", fig, "relative error")
            res.figures.append(fg.save(fig, out_dir, f"ig_{s}_maxwell.png"))

    # V2: potential minimisation, toy models only
    model = g["model"].iloc[0] if "model" in g else None
    if model != "vmf":
        res.notes.append(f"group {label}: potential (V2) map skipped: toy models only (model = {model})")
    else:
        ok = (np.isfinite(t["U"]) & np.isfinite(t["S_full"]) & np.isfinite(t["T"])).to_numpy()
        rank, gap, kind = ig.protocol_potential_ranks_where(ok, protocol, t["U"], t["S_full"], t["radius"],
                                                            t["T"], t["wd"], t["r0"])
        if kind is None:
            res.notes.append(f"group {label}: potential map skipped: needs 2 members with train_loss, {S_key} "
                             "and T (and a radius for Gibbs)")
        else:
            t["potential_rank"], t["potential_gap"] = rank, gap
            ranked = np.isfinite(rank)
            tt, rank, gap = t[ranked], rank[ranked], gap[ranked]
            row.update(potential=kind.split()[0], frac_own_minimum=float(np.mean(rank == 0)),
                       max_rank=int(rank.max()), mean_gap=float(np.mean(gap)))
            fig, ax = fg.figure(2, width=6.2)
            heatmap(ax[0, 0], tt["lr"].to_numpy(), tt[second].to_numpy(), rank, fg.ETA, sec_sym,
                    f"rank of own configuration\n{kind}", fig, "rank (0 = minimiser)")
            heatmap(ax[0, 1], tt["lr"].to_numpy(), tt[second].to_numpy(), gap, fg.ETA, sec_sym,
                    "gap to the minimum", fig, "gap")
            res.figures.append(fg.save(fig, out_dir, f"ig_{s}_potential.png"))

    write_table(t, out_dir, f"ig_{s}.csv", res)
    res.summary_rows.append(row)


for _fn in (free_energy_section, snr_section, ideal_gas_section):
    register_section(_fn)


# -----------------------------------------------------------------------------
# driver

def run_section(fn, sweep, out_dir, opts) -> SectionResult:
    name = getattr(fn, "__name__", "section").removesuffix("_section")
    try:
        res = fn(sweep, out_dir, opts)
    except Skip as e:
        res = SectionResult(name, skipped_reason=str(e))
    except Exception as e:  # noqa: BLE001 - one broken section must not stop the report
        traceback.print_exc(file=sys.stderr)
        res = SectionResult(name, skipped_reason=f"error: {type(e).__name__}: {e}")
    finally:
        plt.close("all")
    if res.skipped_reason:
        print(f"[{res.name}] skipped: {res.skipped_reason}")
    else:
        print(f"[{res.name}] {len(res.figures)} figure(s), {len(res.tables)} table(s)")
    return res


def build_report(sweep: Sweep, out_dir, opts: Options, sections=None) -> list:
    """Run every section into ``out_dir`` and write summary.md / summary.csv; return the results."""
    os.makedirs(out_dir, exist_ok=True)
    results = [run_section(fn, sweep, out_dir, opts) for fn in (SECTIONS if sections is None else sections)]
    sweep.members.to_csv(os.path.join(out_dir, "members.csv"))
    sweep.stationary.to_csv(os.path.join(out_dir, "stationary.csv"))
    rows = [{"section": r.name, **row} for r in results for row in r.summary_rows]
    pd.DataFrame(rows).to_csv(os.path.join(out_dir, "summary.csv"), index=False)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(_summary_md(sweep, opts, results))
    return results


def _summary_md(sweep, opts, results) -> str:
    p = sweep.parent
    lines = [f"# Sweep report: {sweep.experiment}", "",
             f"- parent run: {p['run_id'] if p else '(none)'}"
             + (f" (sweep status {p['tags'].get('thermosweep.sweep_status', '?')})" if p else ""),
             f"- members: {len(sweep.members)}, in the stationary analysis: {len(sweep.stationary)}",
             "- stationary window W (logs): "
             + ", ".join(str(w) for w in sorted(set(sweep.stationary.get("window", pd.Series()).tolist()))),
             f"- options: ε = {'per group' if opts.eps is None else opts.eps}, lr range = "
             f"{opts.lr_range or 'per group'}, k ≤ {opts.k_max}"
             + (f", per-group options {list(opts.group_overrides)}" if opts.group_overrides else "")]
    lines += [f"- note: {n}" for n in sweep.notes]
    if sweep.excluded:
        lines += ["", "## Excluded members", ""]
        lines += [f"- {rid} (lr = {sweep.members.loc[rid].get('lr', '?')}): {why}"
                  for rid, why in sweep.excluded.items()]
    running = sweep.members.index[sweep.members["running"]]
    if len(running):
        lines += ["", "## Members still running (provisional values)", ""]
        lines += [f"- {rid}" for rid in running]
    for r in results:
        lines += ["", f"## {r.name}", ""]
        if r.skipped_reason:
            lines.append(f"**Skipped:** {r.skipped_reason}")
            continue
        if r.summary_rows:
            lines += [md_table(r.summary_rows), ""]
        lines += [f"- {n}" for n in r.notes]
        if r.tables:
            lines += ["", "Tables: " + ", ".join(f"[{t}]({t})" for t in r.tables)]
        lines += [""] + [f"![{fig}]({fig})" for fig in r.figures]
    return "\n".join(lines) + "\n"


def upload(sweep: Sweep, out_dir) -> str | None:
    """Log ``out_dir`` to the parent run under ``report/``; returns the parent run id."""
    if sweep.parent is None:
        return None
    from mlflow.tracking import MlflowClient
    MlflowClient(tracking_uri=sweep.tracking_uri).log_artifacts(
        sweep.parent["run_id"], out_dir, artifact_path="report")
    return sweep.parent["run_id"]


def _load_plugins():
    for name in PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            print(f"warning: could not import report plugin {name}: {e}", file=sys.stderr)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name (the grid's experiment)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own)")
    ap.add_argument("--out", default=None, help="output folder (default reports/NAME)")
    ap.add_argument("--parent-run", default=None, help="parent run id (default: newest sweep run)")
    ap.add_argument("--window", type=int, default=None,
                    help=f"stationary window W in logs (default per log schedule: {WINDOW_IDEAL_GAS} for "
                         f"ideal_gas, {WINDOW_DEFAULT} for free_energy and others, a log:N schedule the "
                         "same share of its N points)")
    ap.add_argument("--eps", action="append", default=[], metavar="[MATCH:]E",
                    help="§5 tolerance ε for every group, or for the groups whose members match MATCH "
                         "(key=value[,key=value], e.g. width=64:0.04); repeatable. Default per group: the "
                         "grid's analysis block, else 0.01 UP / 0.04 OP (docs/theory.md §5)")
    ap.add_argument("--lr-range", action="append", nargs="+", default=[], metavar="[MATCH] LO HI",
                    help="§5 stationary segment by LR (both ends included) for every group, or for the "
                         "groups matching MATCH (e.g. --lr-range width=8 1e-4 1e-2); repeatable. "
                         "Default per group: the grid's analysis block, else the automatic rule")
    ap.add_argument("--k", type=int, default=Options.k_max, help="k-NN entropy k (largest logged k ≤ this)")
    ap.add_argument("--uniform-n", type=int, default=None,
                    help="samples for the uniform-sphere entropy reference (default: the knn window N)")
    ap.add_argument("--no-uniform-loss", action="store_true",
                    help="skip the uniform-reference loss asymptote (it runs the model over the training set "
                         "for each of --uniform-loss-n directions)")
    ap.add_argument("--uniform-loss-n", type=int, default=Options.uniform_loss_n,
                    help=f"uniform directions for the loss asymptote (default {Options.uniform_loss_n})")
    ap.add_argument("--no-upload", action="store_true", help="do not attach the report to the parent run")
    ap.add_argument("--toy-u-window", type=int, default=Options.toy_u_window, metavar="ITERS",
                    help=f"toys: average U and r over the last ITERS iterations (default {Options.toy_u_window}, §8)")
    ap.add_argument("--toy-pressure-window", type=int, default=Options.toy_pressure_window, metavar="ITERS",
                    help=f"toys: average r̃ over the last ITERS iterations (default {Options.toy_pressure_window}, §7)")
    return ap.parse_args(argv)


def _parse_match(text):
    """``key=value[,key=value]`` → {key: value} (values read as YAML scalars: 64 → 64, 1e-3 → 0.001)."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{text!r}: a group is named by key=value[,key=value], e.g. width=64")
        v = yaml.safe_load(value)
        try:
            v = float(v) if isinstance(v, str) else v
        except ValueError:
            pass
        out[key.strip()] = v
    return out


def _group_options(args):
    """(ε for all, lr range for all, per-group overrides) from the repeatable --eps / --lr-range."""
    eps_all, range_all, groups = None, None, []
    for text in args.eps:
        match, _, value = text.rpartition(":")
        eps = float(value)
        if not eps >= 0:
            raise ValueError(f"--eps {text}: ε must be ≥ 0")
        if match:
            groups.append({"match": _parse_match(match), "eps": eps})
        else:
            eps_all = eps
    for words in args.lr_range:
        if len(words) not in (2, 3):
            raise ValueError(f"--lr-range {' '.join(words)}: give LO HI, or MATCH LO HI")
        lo, hi = float(words[-2]), float(words[-1])
        if not 0 < lo <= hi:
            raise ValueError(f"--lr-range {' '.join(words)}: give LO HI with 0 < LO ≤ HI")
        if len(words) == 3:
            groups.append({"match": _parse_match(words[0]), "lr_range": (lo, hi)})
        else:
            range_all = (lo, hi)
    return eps_all, range_all, tuple(groups)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        eps_all, range_all, group_overrides = _group_options(args)
        group_error = None
    except ValueError as e:
        eps_all = range_all = None
        group_overrides, group_error = (), str(e)
    bad = [msg for wrong, msg in (
        (group_error is not None, group_error),
        (args.window is not None and args.window < 1, f"--window {args.window}: must be ≥ 1"),
        (args.uniform_loss_n < 2, f"--uniform-loss-n {args.uniform_loss_n}: must be ≥ 2"),
        (args.toy_u_window < 1, f"--toy-u-window {args.toy_u_window}: must be ≥ 1 (iterations)"),
        (args.toy_pressure_window < 1, f"--toy-pressure-window {args.toy_pressure_window}: must be ≥ 1 (iterations)"),
    ) if wrong]
    if bad:
        print("error: " + "; ".join(bad) + ". Nothing was read; fix the option and run again.", file=sys.stderr)
        return 2
    opts = Options(eps=eps_all, lr_range=range_all, group_overrides=group_overrides,
                   k_max=args.k, uniform_n=args.uniform_n, uniform_loss=not args.no_uniform_loss,
                   uniform_loss_n=args.uniform_loss_n, toy_u_window=args.toy_u_window,
                   toy_pressure_window=args.toy_pressure_window)
    try:
        sweep = load_experiment(args.experiment, tracking_uri=args.tracking_uri,
                                stationary_window=args.window, parent_run=args.parent_run)
    except SweepNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts.grid_block, notes = read_grid_block(sweep)
    sweep.notes += notes
    if args.window is None:          # --window overrides every member's W; else the grid block's per group
        apply_windows(sweep, member_windows(sweep.members, opts.grid_block))
    out_dir = args.out or os.path.join("reports", args.experiment)
    _load_plugins()
    build_report(sweep, out_dir, opts)
    print(f"report written to {out_dir}/summary.md")
    if args.no_upload:
        return 0
    if sweep.parent is None:
        print("no parent run: report not uploaded", file=sys.stderr)
        return 0
    try:
        rid = upload(sweep, out_dir)
        print(f"attached to parent run {rid} under artifacts/report")
    except Exception as e:  # noqa: BLE001
        print(f"warning: upload to the parent run failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
