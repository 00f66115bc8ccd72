"""When to log and which iterations to snapshot (docs/theory.md §3 and §4).

A log schedule is a sorted list of iterations at which the full metrics are computed. An entropy
estimator spec (``{"name": "knn", "window": N, "stride": s}``) defines, for a log step ``t``, a window of
the N most recent iterations that are multiples of ``s`` and not after ``t``. Entropy is evaluated at
every log step whose window is complete (it starts at iteration ≥ 0); ``evaluate_every: M`` keeps only
the log steps that are multiples of M (entropy sparser than the other metrics, as in docs/theory.md §8) and
``evaluate_last: K`` then keeps the last K of those. Only the snapshots that fall in an evaluated window
are ever taken.
"""
from __future__ import annotations

import numpy as np

SCHEDULES = ("free_energy", "ideal_gas", "sphere_toy", "every:N", "log:N")
FREE_ENERGY_POINTS = 193     # log-spaced points of the free_energy schedule after 0…9


def _log_spaced(start: float, stop: float, num: int) -> list[int]:
    # truncate to integers as the papers do, but guard against 10**log10(n) landing just below n
    return [int(np.floor(v * (1 + 1e-12))) for v in np.logspace(np.log10(start), np.log10(stop), num)]


def point_count(schedule: str) -> int:
    """N of an ``every:N`` or ``log:N`` schedule (ValueError unless an integer ≥ 1)."""
    try:
        n = int(schedule.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 1:
        kind = schedule.split(":", 1)[0]
        raise ValueError(f"log_schedule '{schedule}': use {kind}:N with an integer N ≥ 1")
    return n


def log_iterations(schedule: str, iterations: int) -> list[int]:
    """Sorted, de-duplicated iterations (≤ ``iterations``) at which the log metrics are computed.

    - ``free_energy``: 0…9 and 193 log-spaced points from 10 to ``iterations`` (truncated).
    - ``ideal_gas``: every 200 up to 10 000, then 151 log-spaced points from 1e4 to ``iterations``;
      no log at 0.
    - ``sphere_toy``: 1…99 and 401 log-spaced points from 100 to ``iterations``.
    - ``every:N``: N, 2N, … and the last iteration.
    - ``log:N``: 0…9 and N log-spaced points from 10 to ``iterations`` (a sparser ``free_energy``
      for short runs such as the demo).
    The last iteration is always logged so every run ends with a complete row.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be ≥ 1, got {iterations}")
    if schedule == "free_energy":
        its = list(range(0, min(10, iterations + 1)))
        if iterations >= 10:
            its += _log_spaced(10, iterations, FREE_ENERGY_POINTS)
    elif schedule == "ideal_gas":
        its = list(range(200, min(10_000, iterations) + 1, 200))
        if iterations > 10_000:
            its += _log_spaced(10_000, iterations, 151)
    elif schedule == "sphere_toy":
        its = list(range(1, min(100, iterations + 1)))
        if iterations >= 100:
            its += _log_spaced(100, iterations, 401)
    elif schedule.startswith("log:"):
        n = point_count(schedule)
        its = list(range(0, min(10, iterations + 1)))
        if iterations >= 10:
            its += _log_spaced(10, iterations, n)
    elif schedule.startswith("every:"):
        n = point_count(schedule)
        its = list(range(n, iterations + 1, n))
    else:
        raise ValueError(f"unknown log_schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    its.append(iterations)
    return sorted(set(i for i in its if 0 <= i <= iterations))


def window_iterations(t: int, window: int, stride: int) -> list[int]:
    """The N most recent multiples of ``stride`` that are ≤ t, oldest first (may start below 0)."""
    last = (t // stride) * stride
    return [last - j * stride for j in range(window - 1, -1, -1)]


def window_complete(t: int, window: int, stride: int) -> bool:
    return (t // stride) * stride - (window - 1) * stride >= 0


class SnapshotPlan:
    """For each estimator spec: which log steps evaluate it and which iterations must be snapshotted.

    ``needs_snapshot(it)`` answers in O(1) for the hot loop (a Python set lookup, no device work).
    """

    def __init__(self, log_iters: list[int], specs: list[dict]):
        self.specs = list(specs)
        self.eval_steps: list[set[int]] = []
        needed: set[int] = set()
        for spec in self.specs:
            n, s = int(spec["window"]), int(spec.get("stride", 1))
            steps = sorted(t for t in log_iters if window_complete(t, n, s))
            every = spec.get("evaluate_every")
            if every:
                steps = [t for t in steps if t % int(every) == 0]
            last = spec.get("evaluate_last")
            if last:                      # only the last K eligible log steps (e.g. docs/theory.md §8's 10)
                steps = steps[-int(last):]
            steps = set(steps)
            self.eval_steps.append(steps)
            for t in steps:
                needed.update(window_iterations(t, n, s))
        self.snapshot_iters = needed
        self.all_eval_steps = set().union(*self.eval_steps) if self.eval_steps else set()

    def needs_snapshot(self, it: int) -> bool:
        return it in self.snapshot_iters

    def evaluates(self, t: int) -> bool:
        return t in self.all_eval_steps

    def specs_at(self, t: int) -> list[int]:
        """Indices of the specs evaluated at log step t."""
        return [k for k, steps in enumerate(self.eval_steps) if t in steps]

    def next_snapshot_after(self, it: int) -> int | None:
        later = [i for i in self.snapshot_iters if i > it]
        return min(later) if later else None
