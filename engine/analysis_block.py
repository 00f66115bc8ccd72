"""The optional ``analysis:`` block of a grid file: the report's defaults for this sweep.

The papers analysed each setup with its own settings (docs/theory.md §5): ε, the stationary window W,
the stationary LR segment, the gradient phase-diagram window and the smoothing of the OP temperature
along training. A grid carries them so its report reproduces the paper without flags:

    analysis:
      window: 50                       # defaults for every group (any key below except match)
      groups:                          # the first entry whose `match` fits a group's members wins
        - match: {width: 8}            # member keys and values (every member of the group must agree)
          regime: up                   # up / op (otherwise: op when a member converged)
          eps: 0.01
          lr_range: [1.778e-4, 1.0e-2] # stationary segment by LR, both ends included ...
        - match: {width: 64}
          regime: op
          eps: 0.04
          lr_slice: [6, -8]            # ... or as a Python slice of the group's sorted LR grid
          phase_window: [1.0e+4, 4.0e+5]   # iterations of the gradient phase-diagram fit (hi optional)
          op_smooth_sigma: 0.2         # Gaussian smoothing in log-iteration before T_t (§5.6)

``engine.grid.load_grid`` checks the block with :func:`analysis_block_problems` before a sweep
starts; ``analysis.settings`` reads it back from the parent run's ``grid.yaml`` with
:func:`normalise_analysis_block`.
"""
from __future__ import annotations

import math

SETTING_KEYS = ("regime", "eps", "window", "lr_range", "lr_slice", "phase_window", "op_smooth_sigma",
                "op_lrs")


def _num(v):
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, str):
        v = float(v)          # PyYAML reads 1e-3 as a string
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError
    return v


def _setting(key, v):
    """One setting's normalised value; ValueError with the fix otherwise."""
    try:
        if key == "regime":
            if v not in ("up", "op"):
                raise ValueError
            return v
        if key == "eps":
            x = float(_num(v))
            if x < 0:
                raise ValueError
            return x
        if key in ("window", "op_lrs"):
            x = _num(v)
            if int(x) != x or x < 1:
                raise ValueError
            return int(x)
        if key == "op_smooth_sigma":
            if v is None:
                return None
            x = float(_num(v))
            if x <= 0:
                raise ValueError
            return x
        if key == "lr_range":
            lo, hi = (float(_num(a)) for a in v)
            if not 0 < lo <= hi:
                raise ValueError
            return (lo, hi)
        if key == "lr_slice":
            a, b = ((None if x is None else int(_num(x))) for x in v)
            return (a, b)
        if key == "phase_window":
            v = list(v)
            if len(v) not in (1, 2):
                raise ValueError
            lo = float(_num(v[0]))
            hi = float(_num(v[1])) if len(v) == 2 and v[1] is not None else math.inf
            if not 0 <= lo < hi:
                raise ValueError
            return (lo, hi)
    except (TypeError, ValueError):
        pass
    raise ValueError({
        "regime": "must be up or op",
        "eps": "must be a number ≥ 0 (loss units)",
        "window": "must be an integer ≥ 1 (logs)",
        "op_lrs": "must be an integer ≥ 1 (LRs)",
        "op_smooth_sigma": "must be a number > 0 (ln-iteration units) or null",
        "lr_range": "must be [lo, hi] with 0 < lo ≤ hi",
        "lr_slice": "must be [start, stop] integers (or null), a Python slice of the sorted LR grid",
        "phase_window": "must be [lo] or [lo, hi] iterations with 0 ≤ lo < hi",
    }[key])


def _settings(node, where, problems, allow_groups):
    out = {}
    if not isinstance(node, dict):
        problems.append(f"{where}: must be a mapping of analysis settings, got {node!r}")
        return out
    for key, v in node.items():
        if key in SETTING_KEYS:
            try:
                out[key] = _setting(key, v)
            except ValueError as e:
                problems.append(f"{where}.{key}: {v!r} {e}")
        elif not ((allow_groups and key == "groups") or (not allow_groups and key == "match")):
            valid = SETTING_KEYS + (("groups",) if allow_groups else ("match",))
            problems.append(f"{where}.{key}: unknown key; valid: {', '.join(valid)}")
    if "lr_range" in node and "lr_slice" in node:
        problems.append(f"{where}: give lr_range or lr_slice, not both")
    return out


def normalise_analysis_block(block):
    """(normalised block, problems): ``{"defaults": {...}, "groups": [{"match": {...}, **settings}]}``."""
    problems: list[str] = []
    if block is None:
        return {"defaults": {}, "groups": []}, problems
    defaults = _settings(block, "analysis", problems, allow_groups=True)
    groups = []
    raw_groups = block.get("groups", []) if isinstance(block, dict) else []
    if not isinstance(raw_groups, list):
        problems.append(f"analysis.groups: must be a list of {{match: {{...}}, ...settings}}, got {raw_groups!r}")
        raw_groups = []
    for i, g in enumerate(raw_groups):
        where = f"analysis.groups[{i}]"
        entry = _settings(g, where, problems, allow_groups=False)
        match = g.get("match", {}) if isinstance(g, dict) else {}
        if not isinstance(match, dict) or not match:
            problems.append(f"{where}.match: must be a non-empty mapping of member keys, e.g. {{width: 64}}")
            match = {}
        groups.append({"match": dict(match), **entry})
    return {"defaults": defaults, "groups": groups}, problems


def analysis_block_problems(block) -> list[str]:
    return normalise_analysis_block(block)[1]
