"""The isotropic-noise toy of docs/theory.md §8: exact von Mises–Fisher formulas and a bundle of walkers.

The loss is L(w) = 1 + ⟨μ, w/|w|⟩ in D dimensions. Its gradient is (μ − ⟨μ,ŵ⟩ŵ)/|w|; the noise is
σ ξ/|w| with ξ standard Gaussian projected onto the tangent space at w. Adding the two,
|w|·g = v − ⟨v,ŵ⟩ŵ with v = μ + σ ξ, so one step needs only v (drawn for many steps at once) and
two dot products. The walker settles at −μ; at stationarity its direction is vMF(−μ, κ = 1/T).

Temperature of this model (§3, §7): the noise covariance is (σ²/r²)·P_tangent, so tr Σ = σ²(D−1)/r²
and §3's σ² = tr Σ·r²/(D−1) is exactly the `noise` parameter squared: the temperature and the
stationary radius are §7's (analysis.ideal_gas) with σ = `noise`. The runner needs neither.

Logging: running values (U = train_loss, radius, pre-projection radius on the fixed sphere) are taken
every `running_every` iterations and reported aggregated into the log rows (mean since the previous
log step, plus the value at the log step as `*_last`); the events' `running` lists stay empty.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import ive

from trainables.defaults import resolve_device
from trainables.member import Key, check, member_config, real, whole
from trainables.schedule import SnapshotPlan, log_iterations
from trainables.stopping import StopRule, check_spec

# -----------------------------------------------------------------------------
# exact vMF formulas (docs/theory.md §8)


def _check_kappa_dim(kappa, D):
    kappa = np.asarray(kappa, dtype=np.float64)
    if np.any(kappa <= 0) or not np.all(np.isfinite(kappa)):
        raise ValueError("kappa must be finite and > 0 (kappa = 1/T with T > 0)")
    if int(D) != D or D < 2:
        raise ValueError(f"D must be an integer ≥ 2, got {D}")
    return kappa, int(D)


def vmf_mean_cos(kappa, D):
    """A_D(κ) = I_{D/2}(κ) / I_{D/2−1}(κ), the mean cosine to the mean direction (docs/theory.md §8).

    Uses exponentially scaled Bessel functions (scipy.special.ive) so large κ does not overflow.
    """
    kappa, D = _check_kappa_dim(kappa, D)
    return ive(D / 2, kappa) / ive(D / 2 - 1, kappa)


def vmf_loss(kappa, D):
    """Stationary loss U = 1 − A_D(κ) of L(w) = 1 + ⟨μ, ŵ⟩ (docs/theory.md §8).

    The density ∝ exp(−L/T) = exp(κ⟨−μ, ŵ⟩) is vMF around −μ, so ⟨μ, ŵ⟩ averages to −A_D(κ).
    """
    return 1.0 - vmf_mean_cos(kappa, D)


def vmf_log_norm(kappa, D):
    """log C_D(κ) with C_D(κ) = κ^{D/2−1} / ((2π)^{D/2} I_{D/2−1}(κ)) (docs/theory.md §8), in log space."""
    kappa, D = _check_kappa_dim(kappa, D)
    log_bessel = np.log(ive(D / 2 - 1, kappa)) + kappa  # log I_{D/2−1}(κ)
    return (D / 2 - 1) * np.log(kappa) - (D / 2) * np.log(2 * np.pi) - log_bessel


def vmf_entropy(kappa, D):
    """Differential entropy on the unit sphere S_sphere = −log C_D(κ) − κ A_D(κ) (docs/theory.md §8)."""
    return -vmf_log_norm(kappa, D) - np.asarray(kappa, dtype=np.float64) * vmf_mean_cos(kappa, D)


def kappa_from_temperature(T):
    """κ = 1/T (docs/theory.md §8)."""
    T = np.asarray(T, dtype=np.float64)
    if np.any(T <= 0):
        raise ValueError("temperature must be > 0")
    return 1.0 / T


# -----------------------------------------------------------------------------
# the walker bundle

MODEL = "vmf"
# this toy's own member keys (trainables.member registers them) and its defaults for common keys
KEYS = (
    Key("dim", 3, whole("dim", 2), "dimension D of the walker", int),
    Key("noise", 1.0, real("noise", ge=0), "noise scale σ", float),
    Key("mu_seed", 44, whole("mu_seed", 0), "seed of the direction μ", int),
)
DEFAULTS = {"seed": 42}


def dimension(cfg: dict) -> int:
    """D of a member of this toy (the planner sizes memory with it)."""
    return int(cfg["dim"])


SHARED = ("model", "protocol", "dim", "mu_seed", "seed", "iterations", "running_every", "log_schedule",
          "entropy", "stop_when")
CHUNK = 2000  # steps of noise drawn at once


def check_bundle(members, shared):
    """Fill defaults (trainables.member) and check that the keys in `shared` agree across the bundle
    (ValueError if not)."""
    if not members:
        raise ValueError("a runner needs at least one member")
    members = [member_config(m) for m in members]
    for key in shared:
        values = {repr(m[key]) for m in members}
        if len(values) > 1:
            raise ValueError(f"all members of a bundle must share '{key}' (got {sorted(values)}); "
                             f"split the grid so that '{key}' is not a bundled axis")
    return members


class VMFRunner:
    """A bundle of independent isotropic-noise walkers, one per member, stepped together (DESIGN.md)."""

    def __init__(self, members, device="cpu"):
        self.members = check_bundle([{"model": MODEL, **m} for m in members], SHARED)
        m0 = self.members[0]
        self.protocol = check("protocol", m0["protocol"])
        for m in self.members:
            for key in ("lr", "radius", "wd", "noise"):
                check(key, m[key])
        self.device = resolve_device(device)
        self.D = int(m0["dim"])
        if self.D < 2:
            raise ValueError(f"dim must be ≥ 2, got {self.D}")
        self.iterations = int(m0["iterations"])
        self.running_every = int(m0["running_every"])
        self.specs = list(m0["entropy"] or [])
        self.log_iters = log_iterations(m0["log_schedule"], self.iterations)
        self.plan = SnapshotPlan(self.log_iters, self.specs)

        n, dd = len(self.members), dict(device=self.device, dtype=torch.float64)
        col = lambda key: torch.tensor([float(m[key]) for m in self.members], **dd)[:, None]  # noqa: E731
        self.lr, self.wd, self.r0, self.sigma = col("lr"), col("wd"), col("radius"), col("noise")
        mu = torch.randn(self.D, generator=torch.Generator().manual_seed(int(m0["mu_seed"])),
                         dtype=torch.float64)
        self.mu = (mu / mu.norm()).to(self.device)
        # start: one direction from `seed` on the CPU (the same on every device), shared by all walkers
        start = torch.randn(self.D, generator=torch.Generator().manual_seed(int(m0["seed"])),
                            dtype=torch.float64).to(self.device)
        self.start = (start / start.norm()).expand(n, self.D) * self.r0
        self.gen = torch.Generator(device=self.device).manual_seed(int(m0["seed"]))  # the noise
        self.theta = self.start.clone()
        self.iteration = 0
        self.logged_upto = -1
        self.status = ["running"] * n
        # members that stop when their answer is known (trainables.stopping); a stopped member leaves
        # the vectorised batch: only running members draw noise and step
        self.stop = StopRule(m0["stop_when"], n) if check_spec(m0["stop_when"]) else None
        self._reset_running()

    def _active(self):
        """Indices of the members that still step (all but the stopped ones), or None when all do (the
        plain full-batch path; a diverged member keeps stepping with lr 0, as before stopping existed)."""
        idx = [i for i, s in enumerate(self.status) if s != "stopped"]
        return None if len(idx) == len(self.status) else torch.tensor(idx, dtype=torch.long,
                                                                         device=self.device)

    # -- running values ------------------------------------------------------
    def _reset_running(self):
        n = len(self.members)
        self.acc = torch.zeros(n, 3, dtype=torch.float64, device=self.device)  # U, r, r̃ sums
        self.acc_count = 0
        self.r_pre = self.r0.clone()  # last pre-projection radius (fixed sphere)

    def _values(self):
        """(U, r) per member, shape (n, 1) each."""
        r = torch.linalg.vector_norm(self.theta, dim=1, keepdim=True)
        return 1.0 + (self.theta @ self.mu)[:, None] / r, r

    def _check_finite(self):
        bad = ~torch.isfinite(self.theta).all(dim=1)
        if bool(bad.any()):
            for i in torch.nonzero(bad).flatten().tolist():
                if self.status[i] == "running":
                    self.status[i] = "diverged"
            self.lr[bad] = 0.0  # frozen at the start point so the sink never sees a NaN
            self.theta[bad] = self.start[bad]

    # -- the hot loop --------------------------------------------------------
    def _steps(self, v, act=None):
        """Apply len(v) protocol steps to the members ``act`` (None: all); v[k] = μ + σ ξ_k, shape
        (n_act, D). Returns the last r̃ of those members (sphere), else None.

        On the CPU the loop runs on numpy views of the same memory: a step is a dozen operations on
        (n, D) arrays, where numpy's per-call cost is about a quarter of torch's (4× faster overall);
        on a GPU it stays in torch."""
        pick = (lambda x: x) if act is None else (lambda x: x[act])  # noqa: E731
        theta, lr, wd, r0 = pick(self.theta), pick(self.lr), pick(self.wd), pick(self.r0)
        if self.theta.device.type == "cpu":
            with np.errstate(over="ignore", invalid="ignore"):   # a diverging walker is caught later
                out, r_pre = _walk(self.protocol, theta.numpy(), v.numpy(), lr.numpy(), wd.numpy(),
                                   r0.numpy(), _np_dot, np.sqrt)
            out, r_pre = torch.from_numpy(out), None if r_pre is None else torch.from_numpy(r_pre)
        else:
            out, r_pre = _walk(self.protocol, theta, v, lr, wd, r0, _torch_dot, torch.sqrt)
        if act is None:
            self.theta = out
        else:
            self.theta[act] = out
        return r_pre

    def _noise(self, steps, act=None):
        # ξ is drawn in float32 (4× faster than float64 on a CPU; ample for Gaussian noise), v = μ + σ ξ
        # and the walkers are float64; only the members ``act`` (None: all) draw
        n = len(self.members) if act is None else len(act)
        xi = torch.randn(steps, n, self.D, generator=self.gen, device=self.device, dtype=torch.float32)
        return torch.addcmul(self.mu, xi.to(torch.float64), self.sigma if act is None else self.sigma[act])

    def run(self, sink=None):
        """Train to the end, yielding one event per log step (DESIGN.md "Runners")."""
        stops = sorted(set(t for t in self.log_iters if t > self.iteration)
                       | set(range((self.iteration // self.running_every + 1) * self.running_every,
                                   self.iterations + 1, self.running_every))
                       | set(t for t in self.plan.snapshot_iters if t > self.iteration))
        if self.iteration == 0 and self.logged_upto < 0:
            stops = [0] + stops
        # the noise is drawn per segment between log steps, in chunks of CHUNK steps: a resume at a
        # log step therefore draws the same numbers as the uninterrupted run
        log_set = set(self.log_iters)
        v, k = None, 0
        act = self._active()
        for t in stops:
            if act is not None and len(act) == 0:
                break                          # every member stopped, diverged or finished
            steps = t - self.iteration
            while steps > 0:
                if v is None or k == len(v):
                    nxt = min([s for s in self.log_iters if s > self.iteration] + [self.iterations])
                    v, k = self._noise(min(CHUNK, nxt - self.iteration), act), 0
                take = min(steps, len(v) - k)
                r_pre = self._steps(v[k:k + take], act)
                if r_pre is not None:
                    if act is None:
                        self.r_pre = r_pre
                    else:
                        self.r_pre[act] = r_pre
                k += take
                steps -= take
                self.iteration += take
            if t % self.running_every == 0 and t > 0:
                self._check_finite()
                U, r = self._values()
                self.acc += torch.cat([U, r, self.r_pre], dim=1)
                self.acc_count += 1
            if sink is not None and self.plan.needs_snapshot(t):
                self._check_finite()
                sink.put(t, self.theta)
            if t in log_set and t > self.logged_upto:
                yield self._event(t, sink)
                v, k = None, 0  # a new segment starts after every log step
                act = self._active()  # members may have stopped or diverged at this step
        for i, s in enumerate(self.status):
            if s == "running":
                self.status[i] = "done"

    def _event(self, t, sink):
        self._check_finite()
        U, r = self._values()
        last = torch.cat([U, r, self.r_pre], dim=1)
        mean = self.acc / self.acc_count if self.acc_count else last
        mean, last = mean.cpu().tolist(), last.cpu().tolist()
        ent = sink.evaluate(t, self.plan.specs_at(t)) if (sink is not None and self.plan.evaluates(t)) else None
        rows = []
        for i, s in enumerate(self.status):
            if s != "running":
                rows.append(None)
                continue
            row = {"iteration": t, "train_loss": mean[i][0], "radius": mean[i][1],
                   "train_loss_last": last[i][0], "radius_last": last[i][1]}
            if self.protocol == "fixed_sphere":
                row["radius_preproj"] = mean[i][2]
            if ent is not None:
                row.update(ent[i])
            if self.stop is not None:
                self.stop.observe(i, row)
                why = self.stop.verdict(i, t) if t < self.iterations else None
                if why is not None:
                    row.update(why)             # the statistics that justified the stop
                    self.status[i] = "stopped"
            rows.append(row)
        self._reset_running_sums()
        self.logged_upto = t
        _finish_at_end(self.status, t, self.iterations)
        return {"iteration": t, "rows": rows, "running": [[] for _ in self.members],
                "status": list(self.status)}

    def _reset_running_sums(self):
        self.acc.zero_()
        self.acc_count = 0

    # -- exact resume --------------------------------------------------------
    def state_dict(self):
        return {"iteration": self.iteration, "logged_upto": self.logged_upto, "status": list(self.status),
                "theta": self.theta.cpu(), "lr": self.lr.cpu(), "gen": self.gen.get_state(),
                "acc": self.acc.cpu(), "acc_count": self.acc_count, "r_pre": self.r_pre.cpu(),
                "stop": self.stop.state_dict() if self.stop is not None else None}

    def load_state_dict(self, d):
        if d["theta"].shape != self.theta.shape:
            raise ValueError(f"state holds {tuple(d['theta'].shape)} walkers×dim, runner has "
                             f"{tuple(self.theta.shape)}; load it into a runner built from the same members")
        self.iteration, self.logged_upto = int(d["iteration"]), int(d["logged_upto"])
        self.status = list(d["status"])
        self.theta = d["theta"].to(self.device)
        self.lr = d["lr"].to(self.device)
        self.gen.set_state(d["gen"])
        self.acc = d["acc"].to(self.device)
        self.acc_count = int(d["acc_count"])
        self.r_pre = d["r_pre"].to(self.device)
        if self.stop is not None and d.get("stop") is not None:
            self.stop.load_state_dict(d["stop"])


def _np_dot(a, b):
    return np.einsum("ij,ij->i", a, b)[:, None]


def _torch_dot(a, b):
    return torch.linalg.vecdot(a, b)[:, None]


def _walk(protocol, theta, v, lr, wd, r0, dot, sqrt):
    """The protocol steps of VMFRunner on numpy arrays or torch tensors alike (``dot`` and ``sqrt``
    from the matching library). Returns the final θ and the last r̃ (fixed sphere, else None)."""
    r_pre = None
    if protocol == "fixed_elr":  # θ ← θ(1 − ηλr² + η⟨v,θ⟩/r) − η r v
        a = lr * wd
        for vk in v:
            r2 = dot(theta, theta)
            r = sqrt(r2)
            theta = theta * (1.0 - a * r2 + lr * dot(vk, theta) / r) - (lr * r) * vk
    elif protocol == "fixed_lr":  # θ ← θ(1 − ηλ + η⟨v,θ⟩/r³) − (η/r) v
        one_minus = 1.0 - lr * wd
        for vk in v:
            r2 = dot(theta, theta)
            b = lr / sqrt(r2)
            theta = theta * (one_minus + b * dot(vk, theta) / r2) - b * vk
    else:  # fixed sphere, |θ| = r0: θ̃ = θ(1 + η_eff⟨v,θ⟩/r0) − η_eff r0 v, then θ ← r0 θ̃/|θ̃|
        b, c = lr * r0, lr / r0
        for vk in v:
            tilde = theta * (1.0 + c * dot(vk, theta)) - b * vk
            r_pre = sqrt(dot(tilde, tilde))
            theta = tilde * (r0 / r_pre)
    return theta, r_pre


def _finish_at_end(status: list, t: int, iterations: int) -> None:
    """Members still running at the last log step are done before its event is reported, so the
    engine sees the final status with the final rows (as the network runner does)."""
    if t >= iterations:
        for i, s in enumerate(status):
            if s == "running":
                status[i] = "done"


Runner = VMFRunner
