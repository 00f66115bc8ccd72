"""What a report section receives, returns and shares (used by analysis.report and its plugins).

A section is a plain function ``section(sweep, out_dir, opts) -> SectionResult``. It raises
``Skip(reason)`` when the sweep lacks what it needs; ``register_section`` appends it to ``SECTIONS``,
the list the report driver (analysis.report) runs in order.

The registry lives here rather than in analysis.report because ``python -m analysis.report`` runs
the report module as ``__main__``: a plugin that imported ``analysis.report`` would load a second
copy of it, with a registry of its own. Plugins import this module instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from trainables.defaults import MEMBER_DEFAULTS

# member keys that define a group (everything physical; bookkeeping keys left out)
# (the ``radius`` param is renamed ``r0`` in member_table: ``radius`` is also a metric)
GROUP_KEYS = tuple("r0" if k == "radius" else k for k in MEMBER_DEFAULTS
                   if k not in ("device", "data_dir")) + ("dim", "noise", "mu_seed", "setting")


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


SECTIONS: list = []


def register_section(fn):
    """Add ``fn(sweep, out_dir, opts) -> SectionResult`` to the report (usable as a decorator).

    Sections are known by function name: under ``python -m analysis.report`` the report module runs
    as ``__main__``, and a plugin that imports ``analysis.report`` loads a second copy whose sections
    are new function objects; they must not run twice."""
    if all(f.__name__ != fn.__name__ for f in SECTIONS):
        SECTIONS.append(fn)
    return fn


# -----------------------------------------------------------------------------
# members and their groups

def member_table(sweep) -> pd.DataFrame:
    """Usable members: params joined with stationary metrics (index run_id).

    The ``radius`` param (r0) is renamed ``r0``; any other param whose name is also a metric
    becomes ``param_<k>``.
    """
    st = sweep.stationary
    m = sweep.members.loc[[r for r in st.index if r in sweep.members.index]]
    m = m.rename(columns={"radius": "r0"})
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
