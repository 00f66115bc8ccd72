"""Pick the runner for a bundle of members by model (docs/DESIGN.md, "Runners").

A network bundle trains its members as one vectorised model, so the members may differ only in what
leaves the architecture, the data and the schedule alone: ``BUNDLE_FREE_KEYS`` (learning rate, weight
decay, radius, seeds). ``bundle_conflicts`` names every other key on which they differ; the grid check
and the network runner both use it.
"""
from __future__ import annotations

from trainables import member

NETWORK_MODELS = member.NETWORKS   # trainables.models.MODELS; toys: member.toys()

# a member's status: "running" while it trains; then one that it reached by itself (ENDED) or "failed"
ENDED = ("done", "diverged", "converged", "stopped")
FINAL = ENDED + ("failed",)

# member keys that may differ inside one network bundle (everything else must be equal)
BUNDLE_FREE_KEYS = ("lr", "wd", "radius", "seed", "init_seed", "head_seed")


def bundle_conflicts(members: list[dict]) -> list[str]:
    """Why these network members cannot share one vectorised runner (empty list: they can)."""
    if len(members) < 2:
        return []
    keys = sorted({k for m in members for k in m} - set(BUNDLE_FREE_KEYS))
    problems = []
    for key in keys:
        values = [m.get(key) for m in members]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(dict.fromkeys(repr(v) for v in values))
            problems.append(f"members of one network bundle differ in '{key}' ({shown}); a bundle trains "
                            f"one architecture on one data stream, so only {', '.join(BUNDLE_FREE_KEYS)} may "
                            f"differ: remove '{key}' from `bundle` (or make it a fixed value)")
    return problems


def make_runner(members: list[dict], device=None):
    models = {m.get("model", member.MEMBER_DEFAULTS["model"]) for m in members}
    if len(models) != 1:
        raise ValueError(f"a bundle must share one model, got {sorted(models)}")
    model = models.pop()
    if model in NETWORK_MODELS:
        from trainables.network import NetworkRunner
        return NetworkRunner(members, device)
    if model in member.toys():
        return member.toys()[model].Runner(members, device)
    raise ValueError(f"unknown model '{model}'; choose one of {', '.join(member.model_names())}")
