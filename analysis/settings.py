"""Per-group analysis settings: which ε, LR segment, stationary window W, phase-diagram window and OP
smoothing each group of a sweep is analysed with (docs/theory.md §3, §5, §6).

Precedence, for each setting of a group (first that gives it wins):
  1. a report option aimed at the group (``--eps width=64:0.04``, ``--lr-range width=8 1e-4 1e-2``);
  2. a report option for every group (``--eps 0.04``, ``--lr-range 1e-4 1e-2``, ``--window 40``);
  3. the grid file's ``analysis:`` block (engine/analysis_block.py), read from the parent run's
     ``grid.yaml`` artifact: its first ``groups`` entry whose ``match`` fits, then its defaults;
  4. built in: ε by regime (``REGIME_EPS``: the papers' 0.01 for UP, 0.04 for OP), the automatic
     segment rule, W by log schedule (analysis.load.default_window), the phase window scaled to the
     run length (analysis.snr.default_phase_threshold).
A group's regime is the block's ``regime`` if given, else OP when one of its members converged
(status or regime tag ``converged``), else UP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import yaml

from engine.analysis_block import normalise_analysis_block

REGIME_EPS = {"up": 0.01, "op": 0.04}     # docs/theory.md §5: the papers' ε (ConvNet CIFAR-10 UP / OP)
OP_LRS = 4                                # §5.6: T_t for the 4 smallest steadily-decreasing LRs


@dataclass
class GroupSettings:
    regime: str
    regime_source: str
    eps: float
    eps_source: str
    lr_range: tuple | None
    lr_slice: tuple | None
    segment_source: str
    phase_window: tuple | None
    op_smooth_sigma: float | None
    op_lrs: int

    def segment_text(self) -> str:
        if self.lr_range:
            return f"lr range [{self.lr_range[0]:.4g}, {self.lr_range[1]:.4g}] ({self.segment_source})"
        if self.lr_slice:
            a, b = self.lr_slice
            return f"lr slice [{'' if a is None else a}:{'' if b is None else b}] ({self.segment_source})"
        return "automatic segment rule"


def _value(frame, key):
    """The single value of member key ``key`` in a group's rows (``radius`` may be named ``r0``)."""
    for col in (key, "r0" if key == "radius" else None, f"param_{key}"):
        if col is not None and col in frame.columns:
            vals = frame[col].tolist()
            return vals[0] if vals else None
    return None


def _same(a, b):
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return str(a) == str(b)


def matches(frame, match: dict) -> bool:
    """Whether every row of ``frame`` (one group's members) has the values of ``match``."""
    for key, want in match.items():
        col = next((c for c in (key, "r0" if key == "radius" else None, f"param_{key}")
                    if c is not None and c in frame.columns), None)
        if col is None or not all(_same(v, want) for v in frame[col].tolist()):
            return False
    return True


def grid_entry(frame, block: dict | None) -> tuple[dict, str]:
    """Merged grid settings for a group: the first matching ``groups`` entry over the defaults; and a
    label saying where they came from."""
    if not block:
        return {}, ""
    for i, g in enumerate(block.get("groups", [])):
        if matches(frame, g["match"]):
            return {**block.get("defaults", {}), **{k: v for k, v in g.items() if k != "match"}}, \
                f"grid analysis.groups[{i}]"
    return dict(block.get("defaults", {})), "grid analysis"


def _cli_entry(frame, overrides) -> dict:
    out = {}
    for o in overrides or ():
        if matches(frame, o["match"]):
            out.update({k: v for k, v in o.items() if k != "match"})
    return out


def _converged(frame) -> bool:
    return any(str(frame[c].tolist()[i]) == "converged" for c in ("status", "regime") if c in frame.columns
               for i in range(len(frame)))


def group_settings(frame, opts) -> GroupSettings:
    """The settings one group of members (rows of ``member_table``) is analysed with."""
    cli = _cli_entry(frame, getattr(opts, "group_overrides", ()))
    grid, where = grid_entry(frame, getattr(opts, "grid_block", None))
    if "regime" in grid:
        regime, regime_src = grid["regime"], where
    elif _converged(frame):
        regime, regime_src = "op", "a member converged"
    else:
        regime, regime_src = "up", "no member converged"
    if "eps" in cli:
        eps, eps_src = cli["eps"], "report option for this group"
    elif opts.eps is not None:
        eps, eps_src = opts.eps, "report option --eps"
    elif "eps" in grid:
        eps, eps_src = grid["eps"], where
    else:
        eps, eps_src = REGIME_EPS[regime], f"papers' ε for {regime.upper()} ({regime_src})"
    lr_range = lr_slice = None
    seg_src = "automatic"
    if "lr_range" in cli:
        lr_range, seg_src = cli["lr_range"], "report option for this group"
    elif opts.lr_range:
        lr_range, seg_src = tuple(opts.lr_range), "report option --lr-range"
    elif "lr_range" in grid or "lr_slice" in grid:
        lr_range, lr_slice, seg_src = grid.get("lr_range"), grid.get("lr_slice"), where
    return GroupSettings(regime=regime, regime_source=regime_src, eps=float(eps), eps_source=eps_src,
                         lr_range=lr_range, lr_slice=lr_slice, segment_source=seg_src,
                         phase_window=grid.get("phase_window"),
                         op_smooth_sigma=grid.get("op_smooth_sigma"), op_lrs=int(grid.get("op_lrs", OP_LRS)))


def slice_range(lrs, lr_slice) -> tuple:
    """The LR range (lo, hi) that a Python slice [a:b] of the sorted grid ``lrs`` keeps."""
    kept = np.sort(np.asarray(lrs, dtype=float))[slice(*lr_slice)]
    if kept.size < 2:
        raise ValueError(f"lr slice {lr_slice} of the {len(lrs)} sorted LRs keeps {kept.size} value(s); need ≥ 2")
    return float(kept[0]), float(kept[-1])


# -----------------------------------------------------------------------------
# the grid block and the stationary window

def read_grid_block(sweep) -> tuple[dict | None, list]:
    """The normalised ``analysis:`` block of the sweep's grid (parent run artifact ``grid.yaml``), and
    notes. None when there is no parent run, no artifact or no block."""
    if sweep.parent is None:
        return None, []
    try:
        from mlflow.tracking import MlflowClient
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = MlflowClient(tracking_uri=sweep.tracking_uri).download_artifacts(
                sweep.parent["run_id"], "grid.yaml", tmp)
            with open(path) as f:
                raw = yaml.safe_load(f)
    except Exception as e:  # noqa: BLE001 - an old sweep without the artifact still reports
        return None, [f"grid.yaml not read from the parent run ({type(e).__name__}); built-in analysis defaults"]
    block = raw.get("analysis") if isinstance(raw, dict) else None
    if block is None:
        return None, []
    norm, problems = normalise_analysis_block(block)
    if problems:
        return None, ["grid analysis block ignored: " + "; ".join(problems)]
    return norm, ["analysis defaults from the grid's analysis block"]


def member_windows(members, block) -> dict:
    """run_id → W for the members the grid block gives a window (per member, first matching entry)."""
    out = {}
    if not block:
        return out
    for rid in members.index:
        entry, _ = grid_entry(members.loc[[rid]], block)
        if "window" in entry:
            out[rid] = int(entry["window"])
    return out


def apply_windows(sweep, windows: dict) -> None:
    """Recompute ``sweep.stationary`` with W = ``windows[run_id]`` for those members (others unchanged)."""
    from analysis.load import stationary_means
    keep = [r for r in sweep.stationary.index if r in windows]
    if not keep:
        return
    w = {r: int(sweep.stationary.loc[r, "window"]) for r in sweep.stationary.index}
    w.update({r: windows[r] for r in keep})
    sweep.stationary = stationary_means(sweep.series, w)
