"""Axis specs of a grid: a list of values, or logspace / linspace / geomspace / segments (+ drop_last)."""
from __future__ import annotations

import math

import numpy as np

from trainables.member import BadValue, as_number, suggest, whole

AXIS_SPECS = ("values", "logspace", "linspace", "geomspace", "segments")


def _spaced(kind, args, loc):
    if not isinstance(args, list) or len(args) != 3:
        raise BadValue(f"{loc}.{kind}: write [start, stop, num], got {args!r}")
    try:
        start = float(as_number(args[0], "start"))
        stop = float(as_number(args[1], "stop"))
        num = whole("num", 1)(args[2])
    except BadValue as e:
        raise BadValue(f"{loc}.{kind}: {e}") from None
    fn = {"logspace": np.logspace, "linspace": np.linspace, "geomspace": np.geomspace}[kind]
    if kind == "geomspace" and (start <= 0 or stop <= 0):
        raise BadValue(f"{loc}.geomspace: start and stop must be > 0 (they are values, not exponents)")
    return [float(x) for x in fn(start, stop, num)]


def expand_axis(spec, loc):
    """An axis spec → list of raw values. Raises BadValue with the problem (location included)."""
    if isinstance(spec, list):
        return list(spec)
    if not isinstance(spec, dict):
        raise BadValue(f"{loc}: an axis is a list of values or a mapping such as {{logspace: [-3, -1, 17]}}, "
                   f"got {spec!r}")
    kinds = [k for k in spec if k in AXIS_SPECS]
    extra = [k for k in spec if k not in AXIS_SPECS and k != "drop_last"]
    if extra:
        raise BadValue(f"{loc}.{extra[0]}: unknown axis spec{suggest(extra[0], AXIS_SPECS + ('drop_last',))}; "
                   f"use one of {', '.join(AXIS_SPECS)} (+ drop_last)")
    if len(kinds) != 1:
        raise BadValue(f"{loc}: give exactly one of {', '.join(AXIS_SPECS)}, got {sorted(spec)}")
    kind = kinds[0]
    drop_last = spec.get("drop_last", False)
    if not isinstance(drop_last, bool):
        raise BadValue(f"{loc}.drop_last: must be true or false, got {drop_last!r}")
    if kind == "values":
        if not isinstance(spec["values"], list):
            raise BadValue(f"{loc}.values: must be a list, got {spec['values']!r}")
        values = list(spec["values"])
    elif kind == "segments":
        segs = spec["segments"]
        if not isinstance(segs, list) or not segs:
            raise BadValue(f"{loc}.segments: must be a non-empty list of axis specs")
        pieces = [x for i, s in enumerate(segs) for x in expand_axis(s, f"{loc}.segments[{i}]")]
        values = _sorted_union(pieces, f"{loc}.segments")
    else:
        values = _spaced(kind, spec[kind], loc)
    return values[:-1] if drop_last else values


def _sorted_union(values, loc):
    try:
        nums = sorted(float(as_number(v, "a segment value")) for v in values)
    except BadValue as e:
        raise BadValue(f"{loc}: {e}") from None
    out = []
    for x in nums:
        if not out or not math.isclose(x, out[-1], rel_tol=1e-12, abs_tol=0.0):
            out.append(x)
    return out

