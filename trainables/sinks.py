"""Where snapshots go and where windowed entropy is computed.

A runner calls ``sink.put(it, theta)`` at snapshot iterations (``theta`` is ``(n_members, D)``) and
``sink.evaluate(t, spec_ids)`` at log steps (``spec_ids``: the estimator specs the snapshot plan evaluates
at t); ``evaluate`` returns one dict of entropy metrics per member. A bundle whose stopped members left
its batch (trainables.compaction) puts only the rows of the members still in it
(``put(it, theta, members=...)``, original member indices) and has only its running members evaluated
(``evaluate(..., members=...)``; the others get empty dicts). The
``LocalSink`` keeps ring buffers in the training process (the single-trial CLI); the engine's
``ReservoirSink`` ships snapshots to a Ray actor instead. Both use :func:`window_entropy`.

A window whose snapshots are not all present (for example after a restart that lost them) is never
evaluated: the member's dict then holds ``entropy_missing = 1.0`` instead of entropy values. A non-finite
estimate is missing too, marked ``entropy_nonfinite = 1.0``.
"""
from __future__ import annotations

import math

import torch

from trainables import entropy
from trainables.schedule import window_complete, window_iterations


def window_entropy(window: torch.Tensor, spec: dict) -> dict[str, float]:
    """Entropy metrics of one member's window (N, D) for one estimator spec (docs/theory.md §4)."""
    out: dict[str, float] = {}
    if spec["name"] == "knn":
        ks = spec.get("ks") or entropy.DEFAULT_KS
        for k, v in entropy.knn_graph_entropy(window, ks).items():
            out[f"entropy_knn_k{k}"] = float(v)
    elif spec["name"] == "kl":
        s_sphere, s_full = entropy.kl_sphere_entropy(window, standardize=bool(spec.get("standardize", False)))
        out["entropy_kl_sphere"] = float(s_sphere)
        out["entropy_kl_full"] = float(s_full)
    else:
        raise ValueError(f"unknown entropy estimator '{spec['name']}' (use knn or kl)")
    out[f"window_radius_{spec['name']}"] = float(entropy.window_radius(window))
    return without_nonfinite(out)


def without_nonfinite(out: dict[str, float]) -> dict[str, float]:
    """A non-finite estimate is recorded as missing, with its reason, never passed on or dropped silently."""
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if not bad:
        return out
    return {k: v for k, v in out.items() if k not in bad} | {"entropy_missing": 1.0, "entropy_nonfinite": 1.0}


SIGMA_RADIUS_ORDER = ("kl", "knn")   # whose window radius σ² uses when both are evaluated at one step


def add_window_entropy(row: dict, values: dict) -> dict:
    """Merge one estimator's ``window_entropy`` values into a member's row and set ``window_radius``,
    the r̄ that σ², tr Σ and G² use (docs/theory.md §3): the KL window's when it was evaluated at this
    step (the ideal-gas paper's σ² window), else the k-NN window's. Each estimator keeps its own
    ``window_radius_<name>``, so evaluating both at one step never overwrites one with the other."""
    row.update(values)
    for name in SIGMA_RADIUS_ORDER:
        if f"window_radius_{name}" in row:
            row["window_radius"] = row[f"window_radius_{name}"]
            break
    return row


class LocalSink:
    """In-process ring buffers, one per estimator spec, shape (n_members, N, D).

    Slot ``(it // stride) % N`` holds the snapshot of iteration ``it``; ``slot_iter`` remembers which
    iteration each slot holds so that an incomplete window is detected, never evaluated.
    """

    def __init__(self, specs: list[dict], n_members: int, D: int, device="cpu",
                 dtype=torch.float32):
        self.specs = [dict(s) for s in specs]
        self.buffers = [torch.zeros(n_members, int(s["window"]), D, device=device, dtype=dtype)
                        for s in self.specs]
        self.slot_iter = [[-1] * int(s["window"]) for s in self.specs]

    def put(self, it: int, theta: torch.Tensor, members: list[int] | None = None) -> None:
        """Store the snapshot ``theta`` of iteration ``it``: one row per member, or per member of
        ``members`` (original indices) when only those are given."""
        for k, spec in enumerate(self.specs):
            stride, n = int(spec.get("stride", 1)), int(spec["window"])
            if it % stride == 0:
                slot = (it // stride) % n
                if members is None or len(members) == self.buffers[k].shape[0]:
                    self.buffers[k][:, slot].copy_(theta, non_blocking=True)
                else:
                    self.buffers[k][members, slot] = theta.to(self.buffers[k].dtype)
                self.slot_iter[k][slot] = it

    def window_ready(self, k: int, t: int) -> bool:
        spec = self.specs[k]
        n, stride = int(spec["window"]), int(spec.get("stride", 1))
        if not window_complete(t, n, stride):
            return False
        return all(self.slot_iter[k][(i // stride) % n] == i for i in window_iterations(t, n, stride))

    def evaluate(self, t: int, spec_ids: list[int] | None = None,
                 members: list[int] | None = None) -> list[dict[str, float]]:
        """Entropy of every member's window(s) at log step t, for the given specs (default: all whose
        window is complete at t)."""
        n_members = self.buffers[0].shape[0] if self.buffers else 0
        members = range(n_members) if members is None else members
        rows: list[dict[str, float]] = [{} for _ in range(n_members)]
        for k, spec in enumerate(self.specs):
            if spec_ids is not None and k not in spec_ids:
                continue
            n, stride = int(spec["window"]), int(spec.get("stride", 1))
            if not window_complete(t, n, stride):
                continue
            if not self.window_ready(k, t):
                for m in members:
                    rows[m]["entropy_missing"] = 1.0
                continue
            slots = [(i // stride) % n for i in window_iterations(t, n, stride)]   # oldest first
            for m in members:
                add_window_entropy(rows[m], window_entropy(self.buffers[k][m, slots], spec))
        return rows

    def state_dict(self) -> dict:
        return {"buffers": [b.cpu() for b in self.buffers], "slot_iter": [list(s) for s in self.slot_iter]}

    def load_state_dict(self, state: dict) -> None:
        for b, saved in zip(self.buffers, state["buffers"]):
            b.copy_(saved)
        self.slot_iter = [list(s) for s in state["slot_iter"]]
