"""The trial loop of scale-invariant networks, read top to bottom.

``NetworkRunner`` trains a bundle of K members (grid points that share architecture, data and schedule;
docs/DESIGN.md "Bundled network runner"). θ_t denotes the weights after t SGD steps, one row per member:
(K, D). For t = 0, 1, …: if t is a snapshot iteration θ_t goes to the sink; if t is a log step the full
metrics of every running member's θ_t (and the window's entropy) are measured and an event is yielded;
then one SGD step makes θ_{t+1}.

One member (K = 1) trains the plain model whose weights are views of θ (``_Solo``). K > 1 members train as
one model with grouped convolutions (``_Bundle``): one forward and one backward of the summed member
losses per step give every member its own gradient, whatever K.

The ordinary iteration never waits for the device: batch indices come from the trial's own device
generators (one per distinct ``seed``: members with equal seeds see the same minibatches), the update is a
handful of tensor ops on θ, the running metrics (every ``running_every`` steps) are kept as device tensors
and read back together at the next flush, where divergence (a non-finite minibatch loss) is also noticed.
A diverged member stops: its row is reset to its start and its learning rate masked to zero, the others go
on. Measurements at log steps use their own generators, so logging never changes the trajectory.

With ``stop_when`` (trainables.stopping) a member whose U, S (and radius) are stationary and precise
enough stops at that log step (status ``stopped``, the rule's statistics in its last row); a member in the
OP convergence regime is held (never stopped early). Alone, its trial ends. In a bundle a stopped or
diverged member is parked (learning rate masked to zero, no more rows) and then leaves the vectorised
batch (trainables.compaction): at the end of the log step, or right after the running flush that found
the divergence, the bundle is rebuilt with the running members only, so they run faster. ``active``
lists the original indices of the members in the batch; the outside view does not change (events carry
K rows and K statuses in the trial's member order, None for members that left).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from trainables import compaction, metrics
from trainables import optimizers, protocols
from trainables.cuda_graph import replayed_step
from trainables.data import load_dataset, sample_batch_indices
from trainables.defaults import resolve_device
from trainables.member import DEFAULT_KS, member_config
from trainables.entropy import knn_graph_entropy
from trainables.models import FlatBundle, build_bundle, build_model, flatten_si_parameters
from trainables.runner import bundle_conflicts
from trainables.schedule import SnapshotPlan, log_iterations
from trainables.stopping import StopRule, check_spec, network_s_key

FLUSH_EVERY = 20          # running rows buffered on the device before one read-back
METRIC_SEED_OFFSET = 1_000_003
STOCH_ENTROPY_MAX_BYTES = 4 * 2**30   # the M displacements of the stochastic entropy sit in memory
DTYPES = {"float32": torch.float32, "float64": torch.float64}
METRIC_NAMES = ("train_loss", "train_acc", "test_loss", "test_acc", "radius")


class _Solo:
    """One member: the plain model, its SI weights views of θ (D,) (the fastest path at K = 1)."""

    def __init__(self, cfgs, data, device, dtype):
        cfg = cfgs[0]
        self.model = build_model(cfg["model"], cfg["width"], data.num_classes, in_channels=data.in_channels,
                                 loss=cfg["loss"], init_seed=cfg["init_seed"], head_seed=cfg["head_seed"],
                                 radius=cfg["radius"]).to(device=device, dtype=dtype)
        self.model.train()
        self.data = data
        self.theta, self.grad = flatten_si_parameters(self.model)
        # opt-in (docs/DESIGN.md "The single-member step"): torch.compile of the training forward and
        # backward only (measurements stay eager), and recording the step once to replay it
        self.train_model = torch.compile(self.model) if cfg.get("compile") else self.model
        self.cuda_graph = bool(cfg.get("cuda_graph", False))
        self._replay = None         # the step's ReplayedStep, made at the first step when cuda_graph is on

    def train_losses(self, gens, batch_size, loss):
        """Draw a minibatch, leave its gradient in ``grad``; the loss, shape (1,). With ``cuda_graph``
        the same work is recorded once and replayed (trainables.cuda_graph; on CUDA only a graph)."""
        if not self.cuda_graph:
            return self._losses(gens[0], batch_size, loss)
        if self._replay is None:
            self._replay = replayed_step(lambda: self._losses(gens[0], batch_size, loss), gens[0],
                                         self.theta.device)
        return self._replay()

    def _losses(self, gen, batch_size, loss):
        x, y = self.data.x_train, self.data.y_train
        idx = sample_batch_indices(x.shape[0], batch_size, gen)
        self.grad.zero_()
        l = metrics.batch_loss(self.train_model(x[idx]), y[idx], loss)
        l.backward()
        return l.detach().reshape(1)

    def full_pass(self, loss):
        d = self.data
        return metrics.full_gradient(self.model, d.x_train, d.y_train, self.grad, loss)

    def test_pass(self, loss):
        return metrics.evaluate(self.model, self.data.x_test, self.data.y_test, loss)

    def stochastic_gradients(self, gens, M, batch_size, loss):
        d = self.data
        return metrics.stochastic_gradients(self.model, d.x_train, d.y_train, self.grad, loss, M, batch_size, gens[0])


class _Bundle:
    """K members as one model with grouped convolutions; θ and ∇ are (K, D) (``models.FlatBundle``)."""

    def __init__(self, cfgs, data, device, dtype=None, model=None):
        """Members ``cfgs`` built from their seeds, or (``model``) those of an existing bundled model
        (trainables.compaction)."""
        if model is None:
            cfg = cfgs[0]
            model = build_bundle(cfg["model"], cfg["width"], data.num_classes, cfgs,
                                 in_channels=data.in_channels).to(device=device, dtype=dtype)
        self.model = model
        self.model.train()
        self.data, self.K = data, len(cfgs)
        self.flat = FlatBundle(self.model, self.K)
        self.theta, self.grad = self.flat.theta, self.flat.grad
        seeds = compaction.distinct_seeds(cfgs)       # the order of the runner's generators
        self.group = torch.tensor([seeds.index(int(c["seed"])) for c in cfgs], device=device)

    def _batch(self, gens, batch_size):
        """One minibatch per seed; shared input (B, C, H, W) when all members share a seed, else the
        members' own batches side by side as channels (B, K·C, H, W)."""
        x, y = self.data.x_train, self.data.y_train
        idx = [sample_batch_indices(x.shape[0], batch_size, g) for g in gens]
        if len(idx) == 1:
            return x[idx[0]], y[idx[0]]
        idx = torch.stack(idx)[self.group]                                       # (K, B)
        xb = x[idx].transpose(0, 1).reshape(batch_size, -1, *x.shape[2:])
        return xb, y[idx]

    def _backward_losses(self, xb, yb, loss):
        self.flat.flat_grad.zero_()
        losses = metrics.member_batch_losses(self.model(xb), yb, loss)
        losses.sum().backward()          # member k's loss depends on member k's weights only
        self.flat.store_grad()
        return losses.detach()

    def train_losses(self, gens, batch_size, loss):
        self.flat.load()
        return self._backward_losses(*self._batch(gens, batch_size), loss)

    def full_pass(self, loss):
        self.flat.load()
        d = self.data
        out = metrics.full_gradient(self.model, d.x_train, d.y_train, self.flat.flat_grad, loss)
        self.flat.store_grad()
        return out

    def test_pass(self, loss):
        return metrics.evaluate(self.model, self.data.x_test, self.data.y_test, loss)

    def stochastic_gradients(self, gens, M, batch_size, loss):
        self.model.train()
        for _ in range(M):
            self._backward_losses(*self._batch(gens, batch_size), loss)
            yield self.grad


class NetworkRunner:
    def __init__(self, members: list[dict], device=None):
        if not members:
            raise ValueError("a network trial needs at least one member")
        cfgs = [member_config(m) for m in members]
        problems = bundle_conflicts(cfgs)
        if problems:
            raise ValueError("; ".join(problems))
        cfg = cfgs[0]
        self.members, self.K = cfgs, len(cfgs)
        self.device = resolve_device(device if device is not None else cfg["device"])
        dtype = self._dtype(cfg)
        self.data = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"],
                                 samples_per_label=cfg["samples_per_label"],
                                 data_seed=cfg["data_seed"], device=self.device)
        if dtype != self.data.x_train.dtype:
            self.data.x_train, self.data.x_test = self.data.x_train.to(dtype), self.data.x_test.to(dtype)
        self.net = (_Solo if self.K == 1 else _Bundle)(cfgs, self.data, self.device, dtype)
        self.model = self.net.model
        self.theta, self.grad = self.net.theta, self.net.grad      # (D,) alone, (K, D) in a bundle
        self.rows = self.theta.view(self.K, -1)
        self.theta0 = self.rows.detach().clone()                     # where a diverged member is parked
        self.D = self.rows.shape[1]
        self.protocol = cfg["protocol"]
        self.opt = optimizers.optimizer_config(cfg)   # sgd: exactly the protocol update of docs/theory.md §2
        self.loss = cfg["loss"]
        if self.K == 1:   # plain floats: the numbers of the one-member runner stay what they were
            self.lr, self.wd, self.r0 = float(cfg["lr"]), float(cfg["wd"]), float(cfg["radius"])
        else:
            col = lambda key: torch.tensor([[float(m[key])] for m in cfgs], device=self.device, dtype=dtype)
            self.lr_members, self.wd, self.r0 = col("lr"), col("wd"), col("radius")
            self.lr = self.lr_members.clone()                         # zero in the rows of stopped members
        self.batch_size = int(cfg["batch_size"])
        self.iterations = int(cfg["iterations"])
        self.running_every = int(cfg["running_every"])
        self.num_stoch_grads = int(cfg["num_stoch_grads"])
        self.stoch_entropy_ks = self._stochastic_entropy_ks(cfg)
        self._stoch_buf = None
        self.opt_state = optimizers.init_state(self.opt, self.theta)
        self.log_iters = log_iterations(cfg["log_schedule"], self.iterations)
        self.log_set = set(self.log_iters)
        self.plan = SnapshotPlan(self.log_iters, cfg["entropy"] or [])
        self.seeds = compaction.distinct_seeds(cfgs)                  # one generator per distinct seed
        self.gens = [torch.Generator(device=self.device).manual_seed(s) for s in self.seeds]
        self.metric_gens = [torch.Generator(device=self.device).manual_seed(s + METRIC_SEED_OFFSET)
                            for s in self.seeds]
        self.iteration = 0
        self.host_done = False      # host work (snapshot, log) for θ_iteration already done
        self.status = ["running"] * self.K
        self.regime = ["training"] * self.K
        self._last_train_loss: list[float | None] = [None] * self.K
        self._bad = torch.zeros(self.K, dtype=torch.bool, device=self.device)
        self._running: list[tuple[int, torch.Tensor]] = []
        self._pending_running: list[list[dict]] = [[] for _ in range(self.K)]
        self.stop = self._stop_rule(cfg)
        self.compacts = compaction.COMPACT     # parked members leave the batch (False: they ride it)
        self.compactions: list[list] = []       # [iteration, active after], one per compaction
        self._script: dict[int, list[int]] = {} # a replay's compactions still to come (``follow``)
        self.set_active(list(range(self.K)))

    def set_active(self, active: list[int]) -> None:
        """The members in the batch (original indices, in order) and each one's row in it."""
        self.active = list(active)
        self._row = {k: i for i, k in enumerate(self.active)}

    def _stop_rule(self, cfg) -> StopRule | None:
        spec = check_spec(cfg["stop_when"])
        if spec is None:
            return None
        # the fixed sphere fixes the radius: a constant has no drift to test (and float noise on it must
        # not hold a member back), so the rule sees r only where the radius moves
        self._rule_drops_radius = self.protocol == "fixed_sphere"
        return StopRule(spec, self.K, default_s_key=network_s_key(spec, cfg["entropy"], DEFAULT_KS))

    @staticmethod
    def _dtype(cfg):
        name = cfg.get("dtype", "float32")
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
        return DTYPES[name]

    def _stochastic_entropy_ks(self, cfg) -> list[int] | None:
        """ks of the stochastic entropy (those of the knn spec, else DEFAULT_KS), None when off."""
        if not cfg.get("stochastic_entropy"):
            return None
        need = self.num_stoch_grads * self.K * self.D * self.grad.element_size()
        if self.num_stoch_grads < 2 or need > STOCH_ENTROPY_MAX_BYTES:
            raise ValueError(
                f"stochastic_entropy keeps the M = {self.num_stoch_grads} displacements of D = {self.D} "
                f"weights of {self.K} member(s) in memory ({need / 2**30:.1f} GiB; the limit is "
                f"{STOCH_ENTROPY_MAX_BYTES / 2**30:.0f} GiB) and needs M ≥ 2: lower num_stoch_grads or set "
                "stochastic_entropy: false (or bundle fewer members)")
        knn = [s for s in (cfg["entropy"] or []) if s["name"] == "knn"]
        return list(knn[0].get("ks") or DEFAULT_KS) if knn else list(DEFAULT_KS)

    def _kept(self, grads):
        """Pass the stochastic gradients through, copying each into the displacement buffer (M, K, D)."""
        n = len(self.active)
        if self._stoch_buf is None:
            # kept for the runner's life: the same block is refilled at every log step
            self._stoch_buf = torch.empty(self.num_stoch_grads, n, self.D, device=self.device,
                                          dtype=self.grad.dtype)
        for i, g in enumerate(grads):
            self._stoch_buf[i].copy_(g.view(n, -1))
            yield g

    # ---- the hot loop -------------------------------------------------------------------------
    def _step(self, t: int) -> None:
        """θ_t → θ_{t+1}: one minibatch, one backward, one protocol update; no host synchronisation."""
        losses = self.net.train_losses(self.gens, self.batch_size, self.loss)
        with torch.no_grad():
            r_tilde = optimizers.step(self.opt, self.protocol, self.theta, self.grad, self.opt_state,
                                      self.lr, self.wd, self.r0)
            self._bad |= ~torch.isfinite(losses)
            if (t + 1) % self.running_every == 0:
                K = self.rows.shape[0]
                pre = r_tilde.reshape(K) if r_tilde is not None else torch.full((K,), math.nan, device=self.device)
                self._running.append((t + 1, torch.stack([
                    losses.float(), protocols.norm(self.grad).reshape(K).float(),
                    protocols.norm(self.theta).reshape(K).float(), pre.float()])))

    def _flush_running(self) -> list[int]:
        """Read the buffered running rows back in one transfer; notice divergence here. Returns the
        members that diverged now."""
        running = [k for k, s in enumerate(self.status) if s == "running"]
        if self._running:
            values = torch.stack([v for _, v in self._running]).cpu().tolist()   # (n, 4, batch rows)
            for (it, _), (bl, gn, r, pre) in zip(self._running, values):
                for k in running:
                    i = self._row[k]
                    row = {"iteration": it, "batch_loss": bl[i], "stoch_grad_norm": gn[i], "radius": r[i]}
                    if not math.isnan(pre[i]):
                        row["radius_preproj"] = pre[i]
                    self._pending_running[k].append(row)
            self._running = []
        bad = (self._bad | ~torch.isfinite(self.rows).all(dim=1)).cpu().tolist()
        diverged = [k for k in running if bad[self._row[k]]]
        for k in diverged:
            self._park(k, "diverged")
        return diverged

    def _park(self, k: int, status: str) -> None:
        """Member k leaves the run with ``status``; in a bundle its learning rate is masked to zero (the
        others go on) and a diverged member's θ goes back to its start (no NaN left in the batch)."""
        self.status[k] = status
        if self.K > 1:
            i = self._row[k]
            with torch.no_grad():
                self.lr[i] = 0.0
            if status == "diverged":
                with torch.no_grad():
                    self.rows[i].copy_(self.theta0[i])
                    for v in self.opt_state.values():      # no NaN moments left in a parked row
                        if v.dim() == 2:
                            v[i].zero_()
                    self._bad[i] = False

    def _compact(self, at_log_step: bool) -> None:
        """Parked members leave the batch (trainables.compaction) when some member still runs. A replay
        (``follow``) first parks, at the end of a log step, the members the original run stopped there."""
        t = self.iteration
        if at_log_step and t in self._script:
            for k in self.active:
                if k not in self._script[t] and self.status[k] == "running":
                    self._park(k, "stopped")
        keep = compaction.members_to_keep(self)
        if keep is not None:
            compaction.compact(self, keep)
            self.compactions.append([t, list(keep)])

    def follow(self, target: dict) -> None:
        """A replay from an anchor towards the checkpoint ``target`` (engine.replay) compacts where the
        original run did: the stop rule is not consulted there, so ``target``'s record says who left."""
        self._script = {int(t): list(keep) for t, keep in target.get("compactions", [])}

    # ---- log steps ----------------------------------------------------------------------------
    def measure(self, t: int, sink) -> list[dict]:
        """All §3 metrics of every member's θ_t, plus the window entropy when the window is complete.

        Order (docs/theory.md §3, corrected 2026-12-02): the full-train pass, then the eval-mode test pass (its
        BN running statistics are those the 1024-chunk full pass left), then the M stochastic gradients.
        """
        n = len(self.active)
        train_loss, train_acc = self.net.full_pass(self.loss)
        gbar = self.grad.clone()
        test_loss, test_acc = self.net.test_pass(self.loss)
        grads = self.net.stochastic_gradients(self.metric_gens, self.num_stoch_grads, self.batch_size, self.loss)
        stats = metrics.gradient_noise_stats(gbar, grads if self.stoch_entropy_ks is None else self._kept(grads))
        radius = protocols.norm(self.theta)
        names = [*METRIC_NAMES, *stats]
        values = torch.stack([v.double().reshape(n) for v in (train_loss, train_acc, test_loss, test_acc,
                                                               radius, *stats.values())]).cpu().tolist()
        rows: list[dict | None] = [None] * self.K
        for r, k in enumerate(self.active):
            rows[k] = {"iteration": t, **{name: values[i][r] for i, name in enumerate(names)}}
        entropy = None
        if sink is not None and self.plan.evaluates(t):
            running = [k for k in self.active if self.status[k] == "running"]
            entropy = sink.evaluate(t, self.plan.specs_at(t), members=running)
        for k in self.active:
            row = rows[k]
            if self.stoch_entropy_ks is not None:
                row.update(self._stochastic_entropy(k, row["radius"]))
            if entropy is not None:
                row.update(entropy[k])
            r_bar = row.get("window_radius", row["radius"])
            row.update(metrics.variance_terms(row, r_bar, self.D))
        return rows

    def _stochastic_entropy(self, k: int, radius: float) -> dict:
        # §4a on the M one-step displacements η g_i (η: the protocol's multiplier at this radius);
        # they lie in the tangent space at θ, so d_e = D − 1 as for the trajectory. Scaling every
        # point by η scales each L_k by η, so Ŝ_k(η g) = Ŝ_k(g) + d_e log η (no scaled copy)
        m = self.members[k]
        step = optimizers.step_lr(self.opt, m["protocol"], float(m["lr"]), radius)
        d_e = self.D - 1
        S = knn_graph_entropy(self._stoch_buf[:, self._row[k]], self.stoch_entropy_ks, intrinsic_dim=d_e)
        return {f"stoch_entropy_knn_k{kk}": v + d_e * math.log(step) for kk, v in S.items()}

    def _update_regime(self, k: int, row: dict) -> None:
        """The papers' "converged": 100 % train accuracy with a train loss still falling. A tag only;
        the member keeps training (its ``status`` stays ``running``)."""
        last = self._last_train_loss[k]
        if row["train_acc"] >= 1.0 and last is not None and row["train_loss"] < last:
            self.regime[k] = "converged"
        self._last_train_loss[k] = row["train_loss"]

    def _consider_stop(self, k: int, t: int, row: dict) -> None:
        """Feed member k's log row to the stop rule; stop it when the rule's verdict says so (never in the
        OP convergence regime, never at the last iteration: there it is simply done)."""
        if self.regime[k] == "converged":
            self.stop.hold(k)
        seen = {n: v for n, v in row.items() if not (n == "radius" and self._rule_drops_radius)}
        self.stop.observe(k, seen)
        why = self.stop.verdict(k, t) if t < self.iterations else None
        if why is not None:
            row.update(why)                 # the statistics that justified the stop
            self._park(k, "stopped")

    def _log_step(self, t: int, sink) -> list[dict | None]:
        # a restored trial rebuilding its entropy windows (engine.replay) sees no entropy: the rule's
        # state comes from the checkpoint instead
        replaying = sink is not None and getattr(sink, "replaying", False)
        self._flush_running()
        rows: list[dict | None] = [None] * self.K
        if "running" in self.status:
            measured = self.measure(t, sink)
            for k, row in enumerate(measured):
                if self.status[k] != "running":
                    continue
                if not math.isfinite(row["train_loss"]):
                    self._park(k, "diverged")
                    continue
                rows[k] = row
                self._update_regime(k, row)
                if self.stop is not None and not replaying:
                    self._consider_stop(k, t, row)
        if t >= self.iterations:
            self.status = ["done" if s == "running" else s for s in self.status]
        else:
            self._compact(at_log_step=True)
        return rows

    def run(self, sink=None) -> Iterator[dict]:
        t = self.iteration
        while "running" in self.status:
            if not self.host_done:
                if sink is not None and self.plan.needs_snapshot(t):
                    sink.put(t, self.rows.detach(), members=self.active)
                if t in self.log_set:
                    rows = self._log_step(t, sink)
                    self.host_done = True
                    yield self._event(t, rows)
                    continue
                self.host_done = True
            if t >= self.iterations:
                self.status = ["done" if s == "running" else s for s in self.status]
                break
            self._step(t)
            t += 1
            self.iteration, self.host_done = t, False
            if len(self._running) >= FLUSH_EVERY and self._flush_running():
                self._compact(at_log_step=False)
                yield self._event(t, [None] * self.K)

    def _event(self, t: int, rows: list) -> dict:
        running, self._pending_running = self._pending_running, [[] for _ in range(self.K)]
        return {"iteration": t, "rows": rows, "running": running, "status": list(self.status),
                "regime": list(self.regime)}

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._flush_running()
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "theta": self.rows.detach().cpu().clone(),
            "lr": self.lr.detach().cpu().clone() if torch.is_tensor(self.lr) else self.lr,
            "gens": [g.get_state() for g in self.gens],
            "metric_gens": [g.get_state() for g in self.metric_gens],
            "iteration": self.iteration, "host_done": self.host_done, "status": list(self.status),
            "regime": list(self.regime), "last_train_loss": list(self._last_train_loss),
            "pending_running": [list(p) for p in self._pending_running],
            "optimizer": {k: v.cpu() for k, v in optimizers.state_dict(self.opt_state).items()},
            "stop": self.stop.state_dict() if self.stop is not None else None,
            "active": list(self.active), "compactions": [list(c) for c in self.compactions],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; a runner whose batch still holds members that had left it when the state
        was saved is compacted to the saved ``active`` first."""
        active = list(state.get("active", range(self.K)))
        if active != self.active:
            compaction.compact(self, active)
        self.compactions = [list(c) for c in state.get("compactions", [])]
        self._script = {}
        with torch.no_grad():
            own = self.model.state_dict()
            for k, v in state["model"].items():
                own[k].copy_(v)
            self.rows.copy_(state["theta"])
            if torch.is_tensor(self.lr):
                self.lr.copy_(state["lr"])
        for g, s in zip(self.gens, state["gens"], strict=True):
            g.set_state(s)
        for g, s in zip(self.metric_gens, state["metric_gens"], strict=True):
            g.set_state(s)
        self.iteration = int(state["iteration"])
        self.host_done = bool(state["host_done"])
        self.status = list(state["status"])
        self.regime = list(state["regime"])
        self._last_train_loss = list(state["last_train_loss"])
        self._pending_running = [list(p) for p in state["pending_running"]]
        optimizers.load_state_dict(self.opt_state, state.get("optimizer", {}))
        if self.stop is not None and state.get("stop") is not None:
            self.stop.load_state_dict(state["stop"])
        self._bad.zero_()
