"""Entropy windows that survive a restore: anchors in the checkpoint and a replay (docs/DESIGN.md).

A trial's windows live in the object store, owned by the trial's process; they die with it (worker
kill, node loss, driver restart). Its checkpoint at log step c therefore also carries an *anchor*: the
runner's state at the latest log step L that lies before the first snapshot of every window still to
be evaluated after c (or "the start", a freshly built runner). On restore the runner loads the
anchor, runs forward to c with the sink in replay mode (snapshots are shipped, nothing is evaluated,
events are dropped) and then loads the checkpoint's own state. The trajectory is deterministic
(resume is exact), so the rebuilt windows hold the very snapshots of the undisturbed run.

Anchor states are taken only at log steps, exactly where a checkpoint is taken, so they are as exact
as any checkpoint for every runner (a toy runner's noise is drawn per segment between log steps).
"""
from __future__ import annotations

import bisect
import io
import json
import os

import torch

from engine.grid import checkpoint_due
from trainables.schedule import SnapshotPlan, log_iterations, window_iterations

START = -1                  # anchor "the start": a freshly built runner, nothing to store
ANCHOR_FILE, ANCHOR_META = "anchor.pt", "anchor.json"


class AnchorPlan:
    """For every log step c at which the trial checkpoints: the anchor that checkpoint needs (None: no
    window still to come reaches back to c). The checkpoint steps follow from ``checkpoint_every``
    alone (engine.grid.checkpoint_due, counted from 0), the same after any restore."""

    def __init__(self, member: dict, checkpoint_every: int = 0):
        log_iters = log_iterations(member["log_schedule"], int(member["iterations"]))
        plan = SnapshotPlan(log_iters, member.get("entropy") or [])
        per_spec = []
        for spec, steps in zip(plan.specs, plan.eval_steps):
            window, stride = int(spec["window"]), int(spec.get("stride", 1))
            evals = sorted(steps)
            per_spec.append((evals, [window_iterations(e, window, stride)[0] for e in evals]))
        self.anchor: dict[int, int | None] = {}
        for c in checkpoint_steps(log_iters, int(checkpoint_every)):
            firsts = [first[bisect.bisect_right(evals, c)] for evals, first in per_spec
                      if bisect.bisect_right(evals, c) < len(evals)]
            need = min(firsts, default=None)
            if need is None or need > c:
                self.anchor[c] = None       # every window still to come starts after c
            else:
                i = bisect.bisect_left(log_iters, need)   # log steps before the first needed snapshot
                self.anchor[c] = log_iters[i - 1] if i > 0 else START
        self.last_use: dict[int, int] = {}  # anchor log step -> last log step whose checkpoint needs it
        for c, a in self.anchor.items():
            if a is not None and a != START:
                self.last_use[a] = max(self.last_use.get(a, c), c)


def checkpoint_steps(log_iters: list[int], every: int) -> list[int]:
    """The log steps at which engine.trainable checkpoints (besides the end of the trial)."""
    out, last = [], 0
    for c in log_iters:
        if checkpoint_due(every, last, c):
            out.append(c)
            last = c
    return out


class AnchorKeeper:
    """Holds (serialised) the runner states that future checkpoints may need as their anchor."""

    def __init__(self, plan: AnchorPlan):
        self.plan = plan
        self.states: dict[int, bytes] = {}

    def observe(self, runner, t: int) -> None:
        """Called at each log step t after its event: keep the state if some checkpoint needs it."""
        if t in self.plan.last_use:
            self.states[t] = _serialise(runner.state_dict())   # a copy: toy runners update in place
        for a in [a for a in self.states if self.plan.last_use[a] < t]:
            del self.states[a]

    def nbytes(self) -> int:
        return sum(len(b) for b in self.states.values())

    def write(self, directory: str, c: int) -> None:
        """Put the anchor of a checkpoint at log step c into the checkpoint's directory."""
        a = self.plan.anchor.get(c)
        if a is None:
            return
        if a != START:
            with open(os.path.join(directory, ANCHOR_FILE), "wb") as f:
                f.write(self.states[a])
        with open(os.path.join(directory, ANCHOR_META), "w") as f:
            json.dump({"iteration": a}, f)


def read_anchor(directory: str) -> tuple[int, dict | None] | None:
    """(anchor log step, its state or None for the start) from a checkpoint directory, or None."""
    meta = os.path.join(directory, ANCHOR_META)
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        a = int(json.load(f)["iteration"])
    if a == START:
        return a, None
    return a, torch.load(os.path.join(directory, ANCHOR_FILE), map_location="cpu", weights_only=True)


def rebuild_windows(runner, sink, keeper: AnchorKeeper, anchor: tuple[int, dict | None], until: int,
                    target: dict | None = None) -> int:
    """Run ``runner`` from the anchor to log step ``until``, shipping its snapshots to ``sink``.

    The runner must be freshly built; afterwards load the checkpoint's state (``target``) into it. A
    runner whose stopped members leave its batch (trainables.network) is told ``target`` so that the
    replay compacts where the original run did (the stop rule is not consulted in a replay). Returns
    the number of iterations replayed."""
    a, state = anchor
    if state is not None:
        runner.load_state_dict(state)
        keeper.states[a] = _serialise(state)
    follow = getattr(runner, "follow", None)
    if target is not None and follow is not None:
        follow(target)
    start = runner.iteration
    sink.replaying = True
    try:
        for event in runner.run(sink):
            t = event["iteration"]
            keeper.observe(runner, t)
            if t >= until:
                break
    finally:
        sink.replaying = False
    return runner.iteration - start


def _serialise(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
