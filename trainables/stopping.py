"""Members that stop when their answer is known (opt-in per grid: the member key ``stop_when``).

A member stops at a log step when
  * it is stationary: for U (``train_loss``), the radius and S (the entropy key ``s_key``), the mean of
    its latest window and the mean of the window just before agree within ``drift_z`` combined
    standard errors (windows: the ``u_rows`` latest log rows for U and r, the ``s_evals`` latest entropy
    evaluations for S — the windows the analysis averages, docs/theory.md §8), and
  * its estimates over the latest window reached the precision asked for: the standard error of the
    mean relative to the mean for U (``u_rel_se``) and r (``r_rel_se``), in nats for S (``s_se``);
    a target left out (or null) is not required, but its drift still is when the metric is logged;
  * it is at or after ``min_iteration`` and not held (a member in the OP convergence regime is never
    stopped early: its decay is the measurement; a runner calls ``hold``).
A network runner feeds its log rows (U: the full-train ``train_loss``, r: ``radius``, S: the k-NN entropy
the §5 analysis reads, ``network_s_key``); the radius is left out where the protocol fixes it (fixed
sphere), since a constant has no drift to test.
Standard errors treat the window's values as independent batch means (each log row averages a whole
log interval; entropy windows barely overlap), as the toy report does.

The rule is model-agnostic: a runner feeds it each member's log rows (``observe``) and asks
``verdict`` at log steps; a non-None verdict is a dict of the statistics that justified the stop (the
runner adds them to the member's last row and sets its status to ``stopped``). Its whole state is
plain lists (``state_dict`` / ``load_state_dict``) for exact resume.
"""
from __future__ import annotations

import math

SPEC_DEFAULTS = {"u_rel_se": None, "s_se": None, "r_rel_se": None, "drift_z": 3.0, "u_rows": 25,
                 "s_evals": 10, "min_iteration": 0, "s_key": None}
VMF_S_KEY = "entropy_kl_sphere"     # s_key None: the vMF toy watches its KL entropy, networks network_s_key
_POSITIVE = ("u_rel_se", "s_se", "r_rel_se", "drift_z")
ANALYSIS_K_MAX = 50     # the §5 analysis reads the k-NN entropy of the largest logged k ≤ 50 (docs/theory.md §5)


def check_spec(spec) -> dict | None:
    """Normalised ``stop_when`` (defaults filled in), None when off; ValueError naming the fix."""
    if spec is None or spec is False:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"must be a mapping such as {{u_rel_se: 0.01, s_se: 0.05}}, got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; valid: {', '.join(SPEC_DEFAULTS)}")
    out = {**SPEC_DEFAULTS, **spec}
    for k in _POSITIVE:
        if out[k] is not None:
            try:
                out[k] = float(out[k])
            except (TypeError, ValueError):
                raise ValueError(f"{k} must be a number > 0, got {out[k]!r}") from None
            if not out[k] > 0:
                raise ValueError(f"{k} must be > 0, got {out[k]!r}")
    for k, lo in (("u_rows", 2), ("s_evals", 2), ("min_iteration", 0)):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{k} must be an integer ≥ {lo}, got {v!r}")
    if out["u_rel_se"] is None and out["s_se"] is None and out["r_rel_se"] is None:
        raise ValueError("give at least one precision target: u_rel_se, s_se or r_rel_se")
    return out


def network_s_key(spec: dict, entropy_specs: list[dict], default_ks: list[int]) -> str | None:
    """The S a network member's rule watches: ``s_key`` when the grid names it, else the k-NN entropy the
    §5 analysis uses (largest k ≤ ANALYSIS_K_MAX of the grid's knn spec); None when no knn entropy is
    evaluated. ValueError when ``s_se`` is asked for but no such S is logged."""
    if spec["s_key"] is not None:
        return spec["s_key"]
    knn = [s for s in entropy_specs or [] if s.get("name") == "knn"]
    top = min(ANALYSIS_K_MAX, int(knn[0]["window"]) - 1) if knn else 0
    ks = [k for k in (knn[0].get("ks") or default_ks) if k <= top] if knn else []
    if ks:
        return f"entropy_knn_k{max(ks)}"
    if spec["s_se"] is not None:
        raise ValueError("stop_when.s_se needs the k-NN entropy the analysis uses: add a knn spec to "
                         "`entropy` (or name the entropy metric as stop_when.s_key)")
    return None


def mean_se(values):
    """(mean, standard error of the mean) of a list of batch means (ddof 1)."""
    n = len(values)
    m = sum(values) / n
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def drift_z(values, w):
    """|mean(latest w) − mean(previous w)| over their combined standard error; None below 2w values."""
    if len(values) < 2 * w:
        return None
    m1, s1 = mean_se(values[-2 * w:-w])
    m2, s2 = mean_se(values[-w:])
    se = math.hypot(s1, s2)
    if se == 0:
        return 0.0 if m1 == m2 else math.inf
    return abs(m2 - m1) / se


class StopRule:
    """Per-member histories and the stop decision (module docstring)."""

    METRICS = ("train_loss", "radius")

    def __init__(self, spec: dict, n_members: int, default_s_key: str = VMF_S_KEY):
        self.spec = check_spec(spec)
        if self.spec["s_key"] is None:
            self.spec["s_key"] = default_s_key
        self.hist = [{"train_loss": [], "radius": [], "S": []} for _ in range(n_members)]
        self.held = [False] * n_members

    def hold(self, i: int) -> None:
        """Member i must not stop early (OP convergence regime)."""
        self.held[i] = True

    def observe(self, i: int, row: dict) -> None:
        h = self.hist[i]
        for k in self.METRICS:
            v = row.get(k)
            if v is not None and math.isfinite(v):
                h[k].append(float(v))
        s = row.get(self.spec["s_key"])
        if s is not None and math.isfinite(s):
            h["S"].append(float(s))
        keep = 2 * max(self.spec["u_rows"], self.spec["s_evals"])     # older values are never read
        for k in h:
            del h[k][:-keep]

    def verdict(self, i: int, t: int) -> dict | None:
        """The statistics that justify stopping member i at log step t, or None (keep running)."""
        sp, h = self.spec, self.hist[i]
        if self.held[i] or t < sp["min_iteration"]:
            return None
        out = {"stopped_at": float(t)}
        for key, series, w, target, relative in (
                ("U", h["train_loss"], sp["u_rows"], sp["u_rel_se"], True),
                ("r", h["radius"], sp["u_rows"], sp["r_rel_se"], True),
                ("S", h["S"], sp["s_evals"], sp["s_se"], False)):
            if target is None and not series:
                continue                       # not asked for and not logged (e.g. no radius)
            z = drift_z(series, w)
            if z is None or z > sp["drift_z"]:
                return None
            m, se = mean_se(series[-w:])
            prec = se / abs(m) if relative else se
            if relative and m == 0:
                return None
            if target is not None and not prec <= target:
                return None
            out[f"stop_{key}_drift_z"] = z
            out[f"stop_{key}_{'rel_se' if relative else 'se'}"] = prec
        return out

    def state_dict(self) -> dict:
        return {"hist": [{k: list(v) for k, v in h.items()} for h in self.hist], "held": list(self.held)}

    def load_state_dict(self, d: dict) -> None:
        self.hist = [{k: list(v) for k, v in h.items()} for h in d["hist"]]
        self.held = list(d["held"])
