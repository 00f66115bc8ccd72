"""Small plotting helpers for the sweep report (matplotlib, Agg backend, files only)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

plt.rcParams.update({"font.size": 11, "axes.labelsize": 12, "axes.titlesize": 12,
                     "xtick.labelsize": 10, "ytick.labelsize": 10,
                     "legend.fontsize": 9, "figure.dpi": 100})

ETA = r"learning rate $\eta$"


def figure(ncols=1, nrows=1, width=5.2, height=4.0):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
    return fig, axes


def value_colors(values, cmap="viridis", log=True):
    """(colours per value, ScalarMappable) for a colour bar over ``values`` (log norm if > 0)."""
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (1.0, 10.0)
    if log and lo > 0:
        norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    else:
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=plt.get_cmap(cmap))
    return [sm.to_rgba(x) for x in v], sm


def colorbar(fig, axes, sm, label=ETA):
    sm.set_array([])
    return fig.colorbar(sm, ax=np.ravel(axes).tolist(), label=label, pad=0.02)


def save(fig, out_dir, name):
    """Write ``out_dir/name`` as PNG, close the figure, return ``name``."""
    path = os.path.join(out_dir, name)
    _tidy_log_ticks(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return name


def positive(x, y):
    """Mask of finite points with x > 0 and y > 0 (for log–log plots)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    return np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)


def identity_line(ax, values):
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size:
        lo, hi = v.min() / 1.3, v.max() * 1.3
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")


def _tidy_log_ticks(fig):
    """No minor tick labels on log axes showing ≥ 2 powers of ten (they overlap)."""
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(lim)
            if (axis.get_scale() == "log" and lo > 0
                    and np.floor(np.log10(hi)) - np.ceil(np.log10(lo)) >= 1):
                axis.set_minor_formatter(NullFormatter())


def off_scale_line(ax, value, data, label):
    """Horizontal reference line, or a note in the corner when it lies far outside the data."""
    d = np.asarray(data, dtype=float)
    d = d[np.isfinite(d)]
    span = np.ptp(d) if d.size else 0.0
    if d.size and (value < d.min() - 3 * span or value > d.max() + 3 * span):
        ax.text(0.02, 0.98, f"{label} = {value:.6g} (off scale)", transform=ax.transAxes,
                va="top", fontsize=9)
    else:
        ax.axhline(value, color="k", ls="--", lw=1, label=label)
