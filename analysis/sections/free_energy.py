"""Report section ``free_energy`` (docs/theory.md §5): U and S against the LR, the temperature intervals
and their power law, the free-energy curves, and the OP temperature decay along training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import figures
from analysis.free_energy import (fit_temperature, free_energy_curves, smooth_log_gaussian,
                                  temperature_along_training)
from analysis.sections.common import (SectionResult, Skip, finite_rows, for_each_group, knn_k, log_axes,
                                      lr_label, lr_lines, member_table, slug, split_by_member, write_table)
from analysis.sections.uniform import uniform_asymptotes
from analysis.settings import group_settings, slice_range

ORDER = 10


@dataclass
class _Group:
    """One group of members that differ only in the LR, and where its figures and notes go."""
    label: str
    members: pd.DataFrame      # sorted by lr
    by_member: dict            # run_id → series rows
    entropy: str               # the S metric, entropy_knn_k<K>
    k: int
    out_dir: str
    res: SectionResult

    @property
    def slug(self):
        return slug(self.label)

    def save(self, fig, what):
        self.res.figures.append(figures.save(fig, self.out_dir, f"fe_{self.slug}_{what}.png"))

    def note(self, text):
        self.res.notes.append(f"group {self.label}: {text}")


def free_energy_section(sweep, out_dir, opts):
    """docs/theory.md §5: U, S vs LR, temperature intervals, power law, F curves, OP decay."""
    res = SectionResult("free_energy")
    names = sweep.metric_names
    if "train_loss" not in names:
        raise Skip("no train_loss metric logged; U (§5) is the stationary train loss")
    K = knn_k(names, opts.k_max)
    ent = f"entropy_knn_k{K}"
    tab = member_table(sweep)
    if "lr" not in tab.columns:
        raise Skip("members have no lr param")
    res.notes.append(f"S = {ent}; smoothing h = {opts.h}; ε and the LR segment per group (below)")
    by_member = split_by_member(sweep.series, tab.index)
    return for_each_group(res, tab, ("lr",), lambda label, g: _free_energy_group(
        _Group(label, g.sort_values("lr"), by_member, ent, K, out_dir, res), opts))


def _free_energy_group(grp, opts):
    U_all, S_all, (lrs, U, S) = _stationary_points(grp)
    st, fit = _fit(grp, opts, lrs, U, S)
    S_uniform, U_uniform = uniform_asymptotes(grp.members, grp.label, grp.k, opts, grp.res)
    _training_figure(grp)
    _stationary_figure(grp, fit, U_all, S_all, U_uniform, S_uniform)
    _temperature_figure(grp, fit, st.eps)
    _free_energy_figure(grp, fit)
    _op_temperature(grp, st)
    _fit_table(grp, fit, lrs, U, S)
    if not np.isfinite(fit.a):
        grp.note("no power-law fit: it needs ≥ 2 interior segment points with a positive temperature estimate")
    interior = fit.minima[1:-1] == np.arange(1, len(fit.lrs) - 1)
    grp.res.summary_rows.append({
        "group": grp.label, "k": grp.k, "exponent_a": fit.a, "exponent_a_se": fit.a_se, "prefactor_b": fit.b, "holds": bool(fit.holds),
        "n_empty": int(fit.empty.sum()), "lr_lo": float(fit.lrs[0]), "lr_hi": float(fit.lrs[-1]),
        "n_segment": int(len(fit.lrs)), "regime": st.regime, "eps": st.eps, "eps_source": st.eps_source,
        "F_minima_at_own_lr": f"{int(interior.sum())}/{interior.size}"})


def _stationary_points(grp):
    """(U per member, S per member, (lrs, U, S) averaged per distinct LR over the finite members)."""
    g, ent = grp.members, grp.entropy
    U_all = g["train_loss"].to_numpy(float) if "train_loss" in g else np.full(len(g), np.nan)
    S_all = g[ent].to_numpy(float) if ent in g else np.full(len(g), np.nan)
    ok = np.isfinite(U_all) & np.isfinite(S_all)
    for rid in g.index[~ok]:
        grp.note(f"member {rid} (lr={g.loc[rid, 'lr']:.4g}) has no stationary train_loss/{ent}; dropped")
    finite = g[ok]
    if finite["lr"].duplicated().any():
        grp.note("several members share an LR; their stationary values are averaged")
    agg = finite.groupby("lr")[["train_loss", ent]].mean()
    if len(agg) < 3:
        raise Skip(f"only {len(agg)} distinct LR(s) with finite U and S; need ≥ 3")
    return U_all, S_all, (agg.index.to_numpy(float), agg["train_loss"].to_numpy(), agg[ent].to_numpy())


def _fit(grp, opts, lrs, U, S):
    """(the group's settings, its temperature fit on the stationary segment); prints the choice."""
    st = group_settings(grp.members, opts)
    lr_range = st.lr_range
    try:
        if st.lr_slice is not None:      # a slice of the group's own sorted LR grid (docs/theory.md §5.1)
            lr_range = slice_range(grp.members["lr"].unique(), st.lr_slice)
        fit = fit_temperature(lrs, U, S, st.eps, h=opts.h, lr_range=lr_range)
    except ValueError as e:
        raise Skip(f"temperature fit failed: {e}") from None
    msg = (f"{st.regime.upper()} ({st.regime_source}); ε = {st.eps:g} ({st.eps_source}); "
           f"{st.segment_text()}")
    print(f"[free_energy] group {grp.label}: {msg}")
    grp.note(msg)
    return st, fit


def _training_figure(grp):
    """Training curves of U and S, one line per member coloured by LR."""
    _, sm = figures.value_colors(grp.members["lr"])
    fig, ax = figures.figure(2)
    lr_lines(ax[0, 0], grp.by_member, grp.members, "train_loss")
    ax[0, 0].set_ylabel("train loss U")
    lr_lines(ax[0, 1], grp.by_member, grp.members, grp.entropy, ylog=False)
    ax[0, 1].set_ylabel(f"entropy S (k = {grp.k})")
    fig.suptitle(f"training, {grp.label}")
    figures.colorbar(fig, ax, sm)
    grp.save(fig, "training")


def _stationary_figure(grp, fit, U_all, S_all, U_uniform, S_uniform):
    """Stationary U and S against the LR, raw and smoothed on the segment, with the uniform asymptotes."""
    fig, ax = figures.figure(2)
    xlabel = lr_label(grp.members)
    for a, raw, smooth, name in ((ax[0, 0], U_all, fit.U, "stationary train loss U"),
                                 (ax[0, 1], S_all, fit.S, f"stationary entropy S (k = {grp.k})")):
        a.plot(grp.members["lr"], raw, "o-", color="C0", label="stationary (last W logs)")
        a.plot(fit.lrs, smooth, "-", color="C3", lw=2, label="smoothed, segment")
        a.axvspan(fit.lrs[0], fit.lrs[-1], color="C3", alpha=0.08)
        log_axes(a, xlabel, name, ylog=False)
    if S_uniform is not None:
        figures.off_scale_line(ax[0, 1], S_uniform, S_all, "uniform on sphere")
    if U_uniform is not None:
        figures.off_scale_line(ax[0, 0], U_uniform, U_all, "uniform on sphere")
    for a in ax[0]:
        a.legend()
    fig.suptitle(f"stationary values, {grp.label}")
    grp.save(fig, "stationary")


def _temperature_figure(grp, fit, eps):
    """Temperature intervals along the segment, their estimates and the power-law fit."""
    fig, ax = figures.figure(1, width=6)
    a = ax[0, 0]
    band = figures.positive(fit.lrs, fit.lower) & figures.positive(fit.lrs, fit.upper)
    a.fill_between(fit.lrs[band], fit.lower[band], fit.upper[band], color="C0", alpha=0.3,
                   label="T interval")
    pos = figures.positive(fit.lrs, fit.T)
    a.plot(fit.lrs[pos], fit.T[pos], "o", color="C0", label="estimate √(lower·upper)")
    if fit.empty.any():
        a.plot(fit.lrs[fit.empty & pos], fit.T[fit.empty & pos], "x", color="C3", ms=10,
               label="empty interval")
    if np.isfinite(fit.a):
        a.plot(fit.lrs, fit.b * fit.lrs**fit.a, "k--",
               label=fr"fit $T = {fit.b:.3g}\,\eta^{{{fit.a:.3f}}}$")
    log_axes(a, lr_label(grp.members), "temperature T", f"T(η), {grp.label}, ε = {eps:g}")
    a.legend()
    grp.save(fig, "temperature")


def _free_energy_figure(grp, fit):
    """The free-energy curves F_i(η) = U(η) − T_i S(η), with each curve's minimum and own η_i."""
    F = free_energy_curves(fit.U, fit.S, fit.T)
    seg_colors, seg_sm = figures.value_colors(fit.lrs)
    fig, ax = figures.figure(1, width=6)
    a = ax[0, 0]
    for i in range(len(fit.lrs)):
        if not np.all(np.isfinite(F[i])):
            continue
        f = F[i] - F[i].min()
        a.plot(fit.lrs, f, "-", color=seg_colors[i], lw=1)
        m = fit.minima[i]
        a.plot(fit.lrs[m], f[m], "o", color=seg_colors[i], ms=6)
        a.plot(fit.lrs[i], f[i], "s", mfc="none", mec=seg_colors[i], ms=8)
    log_axes(a, lr_label(grp.members), r"$F_i(\eta) - \min F_i$",
             f"free-energy curves (● minimum, □ own η_i), {grp.label}", ylog=False)
    figures.colorbar(fig, ax, seg_sm, label=r"$\eta_i$ of the curve's $T_i$")
    grp.save(fig, "free_energy")


def _steadily_decreasing(U, frac=0.8):
    d = np.diff(U)
    return d.size > 0 and (d < 0).mean() >= frac and U[-1] < U[0]


def _op_temperature_lines(grp, st):
    """(table rows, [(lr, iterations, T_t)]): T_t = ΔU/ΔS along training for the smallest LRs whose U
    decreases steadily over the last 100 logs (§5.6), at most ``st.op_lrs`` of them."""
    rows, lines = [], []
    for rid in grp.members.index:
        if len(lines) == st.op_lrs:
            break
        it, (Ut, St) = finite_rows(grp.by_member.get(rid), "train_loss", grp.entropy)
        keep = it > 0
        it, Ut, St = it[keep][-100:], Ut[keep][-100:], St[keep][-100:]
        if it.size < 5 or not _steadily_decreasing(Ut):
            continue
        if st.op_smooth_sigma is not None:   # CIFAR-100 variant: Gaussian in ln t first
            Ut, St = (smooth_log_gaussian(it, v, st.op_smooth_sigma) for v in (Ut, St))
        Tt = temperature_along_training(Ut, St, delta=2, last=100)
        its = it[2:2 + Tt.size]
        lr = float(grp.members.loc[rid, "lr"])
        rows += [{"run_id": rid, "lr": lr, "iteration": i, "T": t} for i, t in zip(its, Tt)]
        lines.append((lr, its, Tt))
    return rows, lines


def _op_temperature(grp, st):
    """The OP temperature decay along training: its table and figure (or a note why not)."""
    rows, lines = _op_temperature_lines(grp, st)
    if lines:
        write_table(pd.DataFrame(rows), grp.out_dir, f"fe_{grp.slug}_op_temperature.csv", grp.res)
    if not lines:
        grp.note("no member has a steadily decreasing U over its last 100 logs; "
                 "temperature along training not drawn")
        return
    if not any(figures.positive(its, Tt).any() for _, its, Tt in lines):
        grp.note("no positive T_t along training (U and S move the same way); see the table")
        return
    fig, ax = figures.figure(1, width=6)
    a = ax[0, 0]
    for lr, its, Tt in lines:
        keep = figures.positive(its, Tt)
        a.plot(its[keep], Tt[keep], "o-", ms=3, label=f"η = {lr:.3g}")
    log_axes(a, "iteration t", r"$T_t = \Delta U / \Delta S$ (Δ = 2 logs)",
             f"temperature along training, {grp.label}")
    a.legend()
    grp.save(fig, "op_temperature")


def _fit_table(grp, fit, lrs, U, S):
    """fe_<group>.csv: stationary U and S per LR with the segment's smoothed values and temperatures."""
    seg_pos = {float(v): j for j, v in enumerate(fit.lrs)}
    t = pd.DataFrame({"lr": lrs, "U": U, "S": S})
    j = [seg_pos.get(float(v)) for v in lrs]
    t["in_segment"] = [x is not None for x in j]
    for col, arr in (("U_smooth", fit.U), ("S_smooth", fit.S), ("T_lower", fit.lower),
                     ("T_upper", fit.upper), ("T", fit.T), ("empty", fit.empty)):
        t[col] = [arr[x] if x is not None else np.nan for x in j]
    t["F_min_lr"] = [fit.lrs[fit.minima[x]] if x is not None and fit.minima[x] >= 0 else np.nan
                     for x in j]
    write_table(t, grp.out_dir, f"fe_{grp.slug}.csv", grp.res)


SECTIONS = (free_energy_section,)
