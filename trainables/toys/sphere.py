"""The 3D sphere toy of docs/theory.md §8: projected SGD with batch size 1 on a few great-circle "objects".

Object i has loss l_i(w) = ⟨n_i, w⟩²/|w|²; the training loss is their mean. On the unit sphere the
gradient is ∇l_i = 2c_i (n_i − c_i w) with c_i = ⟨n_i, w⟩ (already tangent). One object index is
drawn per step from a generator seeded per setting (OP 44, UP 43) and shared by every walker of the
bundle (one per LR): common random numbers, as in the papers' code, so a walker's path does not depend
on which other LRs share its bundle. Each steps w ← w − η ∇l_i(w) and projects back to |w| = 1. Computed in float64 so that OP losses
can reach the 1e-16 convergence threshold.
"""
from __future__ import annotations

import math

import torch

from trainables.schedule import log_iterations
from trainables.defaults import resolve_device
from trainables.member import Key, check, choice
from trainables.toys.vmf import _finish_at_end, check_bundle

MODEL = "sphere_toy"
SEEDS = {"op": 44, "up": 43}  # the object-index generator's seed is fixed by the setting (`seed` unused)
# this toy's own member keys (trainables.member registers them) and its defaults for common keys
KEYS = (Key("setting", "up", choice("setting", lambda: SEEDS), "up (three objects) or op (two)"),)
DEFAULTS = {"log_schedule": "sphere_toy"}


def dimension(cfg: dict) -> int:
    """D of a member of this toy: the walkers live in 3D."""
    return 3


SHARED = ("model", "setting", "iterations", "log_schedule")
START = (-0.8, 0.6, 0.1)
CONVERGED_LOSS = 1e-16
CHUNK = 2000


def sphere_toy_normals(setting):
    """Unit normals of the objects (docs/theory.md §8): OP two, UP three, as a float64 (K, 3) tensor."""
    if setting == "op":
        n = [(math.sqrt(3) / 2, 0.5, 0.0), (math.sqrt(3) / 2, -0.5, 0.0)]
    elif setting == "up":
        n = [(math.cos(2 * math.pi * i / 3), math.sin(2 * math.pi * i / 3), 0.2) for i in range(3)]
    else:
        raise ValueError(f"sphere_toy setting must be 'up' or 'op', got '{setting}'")
    n = torch.tensor(n, dtype=torch.float64)
    return n / n.norm(dim=1, keepdim=True)


def object_gradients(w, normals):
    """Per-object losses (K, n) and exact gradients (K, n, 3) at unit vectors w (n, 3) (docs/theory.md §8)."""
    c = normals @ w.T  # (K, n)
    grads = 2 * c[:, :, None] * (normals[:, None, :] - c[:, :, None] * w[None])
    return c * c, grads


def gradient_metrics(w, normals):
    """§3 gradient metrics from the exact per-object gradients, one value per walker (tensors (n,))."""
    losses, g = object_gradients(w, normals)
    gbar = g.mean(dim=0)
    full = gbar.norm(dim=1)
    dev = (g - gbar[None]).norm(dim=2)  # (K, n)
    rms = dev.square().mean(dim=0).sqrt()
    noise_mean = dev.mean(dim=0)
    return {"train_loss": losses.mean(dim=0), "full_grad_norm": full,
            "stoch_grad_mean_norm": g.norm(dim=2).mean(dim=0), "stoch_grad_rms": rms,
            "noise_mean_norm": noise_mean, "snr": full / rms, "snr_mean": full / noise_mean}


class SphereToyRunner:
    """A bundle of sphere-toy walkers that differ only in LR (DESIGN.md "Runners"). No entropy."""

    def __init__(self, members, device="cpu"):
        self.members = check_bundle([{"model": MODEL, **m} for m in members], SHARED)
        for m in self.members:
            check("lr", m["lr"])
        m0 = self.members[0]
        self.setting = m0["setting"]
        self.device = resolve_device(device)
        self.normals = sphere_toy_normals(self.setting).to(self.device)
        self.D = 3
        self.iterations = int(m0["iterations"])
        self.log_iters = log_iterations(m0["log_schedule"], self.iterations)
        n = len(self.members)
        self.lr = torch.tensor([float(m["lr"]) for m in self.members], dtype=torch.float64,
                               device=self.device)[:, None]
        start = torch.tensor(START, dtype=torch.float64, device=self.device)
        self.w = (start / start.norm()).expand(n, 3).clone()
        self.gen = torch.Generator(device=self.device).manual_seed(SEEDS[self.setting])
        self.iteration = 0
        self.logged_upto = -1
        self.status = ["running"] * n

    def _steps(self, steps):
        idx = torch.randint(len(self.normals), (steps,), generator=self.gen, device=self.device)
        picked = self.normals[idx][:, None, :]  # (steps, 1, 3): one object per step for every walker
        w, lr = self.w, self.lr
        for nk in picked:
            c = torch.linalg.vecdot(nk, w)[:, None]
            w = w - (2 * lr * c) * (nk - c * w)
            w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
        self.w = w

    def run(self, sink=None):
        """Train to the end, yielding one event per log step; `sink` is ignored (no entropy)."""
        if self.iteration == 0 and self.logged_upto < 0 and 0 in self.log_iters:
            yield self._event(0)
        for t in self.log_iters:
            if t <= self.iteration:
                continue
            while self.iteration < t:  # noise is drawn per segment between log steps (exact resume)
                take = min(CHUNK, t - self.iteration)
                self._steps(take)
                self.iteration += take
            yield self._event(t)
        for i, s in enumerate(self.status):
            if s == "running":
                self.status[i] = "done"

    def _event(self, t):
        metrics = {k: v.cpu().tolist() for k, v in gradient_metrics(self.w, self.normals).items()}
        rows = []
        for i, s in enumerate(self.status):
            if s != "running":
                rows.append(None)
                continue
            rows.append({"iteration": t, "radius": 1.0, **{k: v[i] for k, v in metrics.items()}})
            if self.setting == "op" and metrics["train_loss"][i] < CONVERGED_LOSS:
                self.status[i] = "converged"  # this row is the last one; the walker stops
                self.lr[i] = 0.0
        self.logged_upto = t
        _finish_at_end(self.status, t, self.iterations)
        return {"iteration": t, "rows": rows, "running": [[] for _ in self.members],
                "status": list(self.status)}

    def state_dict(self):
        return {"iteration": self.iteration, "logged_upto": self.logged_upto, "status": list(self.status),
                "w": self.w.cpu(), "lr": self.lr.cpu(), "gen": self.gen.get_state()}

    def load_state_dict(self, d):
        if d["w"].shape != self.w.shape:
            raise ValueError(f"state holds {d['w'].shape[0]} walkers, runner has {self.w.shape[0]}; "
                             "load it into a runner built from the same members")
        self.iteration, self.logged_upto = int(d["iteration"]), int(d["logged_upto"])
        self.status = list(d["status"])
        self.w, self.lr = d["w"].to(self.device), d["lr"].to(self.device)
        self.gen.set_state(d["gen"])


Runner = SphereToyRunner
