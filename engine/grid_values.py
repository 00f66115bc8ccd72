"""Located member values for the grid loader: a refused value becomes a problem naming where it is."""
from __future__ import annotations

import math

from trainables import member


def check_value(key, value, loc, problems):
    """Normalise one member value (trainables.member); on failure append located problems, return None."""
    try:
        return member.keys()[key].check(value)
    except member.BadValue as e:
        msgs = e.args[0] if isinstance(e.args[0], list) else [e.args[0]]
        for m in msgs:
            problems.append(f"{loc}{m}" if m.startswith("[") else f"{loc}: {m}")
        return None


def same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
