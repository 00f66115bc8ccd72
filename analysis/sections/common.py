"""What every report section shares: its options, its result, members and their groups, output helpers.

A section is a plain function ``section(sweep, out_dir, opts) -> SectionResult`` in a module of this
package (see ``analysis/sections/__init__.py``). It raises ``Skip(reason)`` when the sweep lacks what
it needs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import figures
from trainables import member

# member params renamed in member_table because a metric has the same name (``radius``: r0 vs r)
PARAM_COLUMNS = {"radius": "r0"}
BOOKKEEPING_KEYS = ("device", "data_dir", "stop_when", "compile", "cuda_graph")   # never define a group


def column(key: str) -> str:
    """The member_table column of a member key (``radius`` → ``r0``)."""
    return PARAM_COLUMNS.get(key, key)


def _group_keys() -> tuple:
    return tuple(column(k) for k in member.keys() if k not in BOOKKEEPING_KEYS)


# member keys that define a group: every key of the member schema (common keys, then each toy's own)
# except bookkeeping; a new toy's keys join when the toy registers them
GROUP_KEYS = _group_keys()


class Skip(Exception):
    """Raised by a section (or a group inside it) to skip with a reason."""


@dataclass
class Options:
    eps: float | None = None          # §5 tolerance ε for every group; None = per group (analysis.settings)
    lr_range: tuple | None = None     # §5 stationary segment (lo, hi) for every group; None = per group
    group_overrides: tuple = ()       # per-group report options: ({"match": {...}, "eps"/"lr_range": ...}, ...)
    grid_block: dict | None = None    # the grid's normalised ``analysis:`` block (analysis.settings)
    h: float = 0.3                    # §5 smoothing half-width in ln η
    k_max: int = 50                   # §5 k of the k-NN entropy: 50, or the largest logged k ≤ this
    uniform_n: int | None = None      # samples of the uniform reference (default: the knn window N)
    uniform_loss: bool = True         # §4 uniform-reference loss asymptote (needs the model and data)
    uniform_loss_n: int = 1000        # its samples (the free-energy paper: 1000)
    pressure_last: int = 3000         # §7 running logs averaged for r̃
    toy_u_window: int = 250_000       # §8 toys: iterations of log rows averaged for U and r
                                      # (the last 5000 running values, one every 50 iterations)
    toy_pressure_window: int = 150_000  # §7 toys: iterations averaged for r̃ (3000 running logs)


@dataclass
class SectionResult:
    name: str
    figures: list = field(default_factory=list)        # file names in out_dir
    tables: list = field(default_factory=list)         # CSV file names in out_dir
    summary_rows: list = field(default_factory=list)   # dicts, one per group/fit
    skipped_reason: str | None = None
    notes: list = field(default_factory=list)


# -----------------------------------------------------------------------------
# members and their groups

def member_table(sweep) -> pd.DataFrame:
    """Usable members: params joined with stationary metrics (index run_id).

    The ``radius`` param (r0) is renamed ``r0``; any other param whose name is also a metric
    becomes ``param_<k>``.
    """
    st = sweep.stationary
    m = sweep.members.loc[[r for r in st.index if r in sweep.members.index]]
    m = m.rename(columns=PARAM_COLUMNS)
    clash = [c for c in m.columns if c in st.columns]
    m = m.rename(columns={c: f"param_{c}" for c in clash})
    return m.join(st, how="inner")


def _hashable(v):
    return json.dumps(v, sort_keys=True, default=str)


def group_members(table: pd.DataFrame, vary) -> list:
    """Split members into groups that agree on every GROUP_KEYS key except ``vary``.

    Returns [(label, frame)], the label naming the keys that differ between groups
    ("all" if there is one group).
    """
    keys = [k for k in GROUP_KEYS if k in table.columns and k not in vary]
    if table.empty:
        return []
    if not keys:
        return [("all", table)]
    codes = table[keys].apply(lambda col: col.map(_hashable))
    differ = [k for k in keys if codes[k].nunique() > 1]
    out = []
    for _, idx in codes.groupby(keys, sort=True).groups.items():
        g = table.loc[idx]
        label = ", ".join(f"{k}={g[k].iloc[0]}" for k in differ) or "all"
        out.append((label, g))
    return out


def for_each_group(res, tab, axes, fn):
    """Run ``fn(label, members)`` per group of members that differ only in ``axes``; a group that
    raises Skip becomes a note, and the section is skipped when no group produced a summary row."""
    skipped = []
    for label, g in group_members(tab, axes):
        try:
            fn(label, g)
        except Skip as e:
            skipped.append(f"group {label}: {e}")
    res.notes += skipped
    if not res.summary_rows:
        raise Skip("; ".join(skipped) or "no group of members")
    return res


def split_by_member(frame, run_ids=None) -> dict:
    """run_id → that member's rows of ``frame`` (``sweep.series`` or ``sweep.running``), split in
    one pass; ``run_ids`` limits the split to those members."""
    if run_ids is not None:
        frame = frame[frame["run_id"].isin(list(run_ids))]
    return dict(iter(frame.groupby("run_id", sort=False)))


def finite_rows(rows, *metrics):
    """(iterations, [values...]) of one member's rows (a ``split_by_member`` value, or None for a
    member without rows) where every given metric is present."""
    if rows is None or any(m not in rows.columns for m in metrics):
        return np.array([]), [np.array([]) for _ in metrics]
    cols = [rows[k].to_numpy(float) for k in ("iteration", *metrics)]
    keep = ~np.any(np.isnan(cols), axis=0)
    return cols[0][keep], [c[keep] for c in cols[1:]]


# -----------------------------------------------------------------------------
# output and numbers

def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_") or "all"


def write_table(df, out_dir, name, res):
    df.to_csv(os.path.join(out_dir, name), index=False)
    res.tables.append(name)


def heatmap(ax, x, y, z, xlabel, ylabel, title, fig, zlabel):
    """``z`` on the grid of the distinct ``x`` (columns) and ``y`` (rows) values; NaN where absent."""
    xs, ys = np.unique(x), np.unique(y)
    grid = np.full((ys.size, xs.size), np.nan)
    grid[np.searchsorted(ys, y), np.searchsorted(xs, x)] = z
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(xs.size), [f"{v:.2g}" for v in xs], rotation=60, fontsize=8)
    ax.set_yticks(range(ys.size), [f"{v:.2g}" for v in ys], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=zlabel)


def rel_err(measured, predicted):
    measured, predicted = np.asarray(measured, float), np.asarray(predicted, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(measured - predicted) / np.abs(predicted)


def finite_stat(a, fn=np.median):
    """``fn`` (default the median) of the finite values of ``a``; NaN when there are none."""
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    return float(fn(a)) if a.size else float("nan")


def toy_members(sweep, model):
    """The usable members of one toy model: rows of ``member_table`` (params and stationary values)."""
    models = sweep.members["model"] if "model" in sweep.members.columns else pd.Series(dtype=object)
    if not (models == model).any():
        found = sorted(set(models.dropna()))
        raise Skip(f"no {model} members (models in this sweep: {found or 'none'})")
    m = member_table(sweep)
    m = m[m["model"] == model]
    if m.empty:
        raise Skip(f"every {model} member is excluded (diverged or without logs)")
    return m


def lr_lines(ax, by_member, g, metric, ylog=True):
    """One curve per member of ``metric`` vs iteration (iteration > 0, log x), coloured by LR;
    ``by_member``: the members' series rows from ``split_by_member``."""
    colors, _ = figures.value_colors(g["lr"])
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


def log_axes(ax, xlabel, ylabel, title=None, ylog=True):
    """Log x (and y unless ``ylog`` is False) axes with their labels."""
    ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)


def knn_k(names, k_max):
    """The largest k ≤ k_max of the logged k-NN entropies entropy_knn_k<K> (Skip when there is none)."""
    ks = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"entropy_knn_k(\d+)", n)))
    ok = [k for k in ks if k <= k_max]
    if not ok:
        raise Skip(f"no k-NN entropy metric entropy_knn_k<K> with K ≤ {k_max} logged "
                   f"(found {ks or 'none'}); the free-energy analysis needs S (§4a)")
    return ok[-1]


def lr_label(members) -> str:
    """The LR axis label of a group's protocol (η_eff or η); the generic one without a protocol."""
    from trainables.protocols import BY_NAME
    protocols = set(members["protocol"]) if "protocol" in members else set()
    if len(protocols) == 1 and next(iter(protocols)) in BY_NAME:
        return BY_NAME[next(iter(protocols))].lr_label
    return figures.ETA
