"""The trial loop of a scale-invariant network, read top to bottom.

``NetworkRunner`` trains one member (one grid point). θ_t denotes the weights after t SGD steps. For
t = 0, 1, …: if t is a snapshot iteration θ_t goes to the sink; if t is a log step the full metrics of
θ_t (and the window's entropy) are measured and an event is yielded; then one SGD step makes θ_{t+1}.

The ordinary iteration never waits for the device: batch indices come from the trial's own device
generator, the update is a handful of tensor ops on the flat θ, the running metrics (every
``running_every`` steps) are kept as device tensors and read back together at the next flush, where
divergence (a non-finite minibatch loss) is also noticed. Measurements at log steps use their own
generator, so logging never changes the trajectory.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from trainables import metrics as Mx
from trainables import protocols
from trainables.data import load_dataset, sample_batch_indices
from trainables.defaults import DEFAULT_KS, fill_defaults, resolve_device
from trainables.entropy import knn_graph_entropy
from trainables.models import build_model, flatten_si_parameters
from trainables.schedule import SnapshotPlan, log_iterations

FLUSH_EVERY = 20          # running rows buffered on the device before one read-back
METRIC_SEED_OFFSET = 1_000_003
STOCH_ENTROPY_MAX_BYTES = 4 * 2**30   # the M displacements of the stochastic entropy sit in memory


class NetworkRunner:
    def __init__(self, members: list[dict], device=None):
        if len(members) != 1:
            raise ValueError(
                f"a network trial holds one member, got {len(members)}: bundling is for toy systems; "
                "remove the network axes from `bundle` in the grid")
        cfg = fill_defaults(members[0])
        self.members = [cfg]
        self.device = resolve_device(device if device is not None else cfg["device"])
        self.data = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"],
                                 samples_per_label=cfg["samples_per_label"],
                                 data_seed=cfg["data_seed"], device=self.device)
        self.model = build_model(cfg["model"], cfg["width"], self.data.num_classes,
                                 in_channels=self.data.in_channels, loss=cfg["loss"],
                                 init_seed=cfg["init_seed"], head_seed=cfg["head_seed"],
                                 radius=cfg["radius"]).to(self.device)
        self.model.train()
        self.theta, self.grad = flatten_si_parameters(self.model)
        self.D = self.theta.numel()
        self.update = protocols.get(cfg["protocol"])
        self.lr, self.wd, self.r0 = float(cfg["lr"]), float(cfg["wd"]), float(cfg["radius"])
        self.loss = cfg["loss"]
        self.batch_size = int(cfg["batch_size"])
        self.iterations = int(cfg["iterations"])
        self.running_every = int(cfg["running_every"])
        self.num_stoch_grads = int(cfg["num_stoch_grads"])
        self.stoch_entropy_ks = self._stochastic_entropy_ks(cfg)
        self._stoch_buf = None
        self.log_iters = log_iterations(cfg["log_schedule"], self.iterations)
        self.log_set = set(self.log_iters)
        self.plan = SnapshotPlan(self.log_iters, cfg["entropy"] or [])
        self.gen = torch.Generator(device=self.device).manual_seed(int(cfg["seed"]))
        self.metric_gen = torch.Generator(device=self.device).manual_seed(
            int(cfg["seed"]) + METRIC_SEED_OFFSET)
        self.iteration = 0
        self.host_done = False      # host work (snapshot, log) for θ_iteration already done
        self.status = ["running"]
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self._running: list[tuple[int, torch.Tensor]] = []
        self._pending_running: list[dict] = []

    def _stochastic_entropy_ks(self, cfg) -> list[int] | None:
        """ks of the stochastic entropy (those of the knn spec, else DEFAULT_KS), None when off."""
        if not cfg.get("stochastic_entropy"):
            return None
        need = self.num_stoch_grads * self.D * self.grad.element_size()
        if self.num_stoch_grads < 2 or need > STOCH_ENTROPY_MAX_BYTES:
            raise ValueError(
                f"stochastic_entropy keeps the M = {self.num_stoch_grads} displacements of D = {self.D} "
                f"weights in memory ({need / 2**30:.1f} GiB; the limit is {STOCH_ENTROPY_MAX_BYTES / 2**30:.0f} "
                "GiB) and needs M ≥ 2: lower num_stoch_grads or set stochastic_entropy: false")
        knn = [s for s in (cfg["entropy"] or []) if s["name"] == "knn"]
        return list(knn[0].get("ks") or DEFAULT_KS) if knn else list(DEFAULT_KS)

    def _kept(self, grads):
        """Pass the stochastic gradients through, copying each into the displacement buffer."""
        if self._stoch_buf is None:
            # kept for the runner's life: the same M × D block is refilled at every log step
            self._stoch_buf = torch.empty(self.num_stoch_grads, self.D, device=self.device,
                                          dtype=self.grad.dtype)
        for i, g in enumerate(grads):
            self._stoch_buf[i].copy_(g)
            yield g

    # ---- the hot loop -------------------------------------------------------------------------
    def _step(self, t: int) -> None:
        """θ_t → θ_{t+1}: one minibatch, one backward, one protocol update; no host synchronisation."""
        x, y = self.data.x_train, self.data.y_train
        idx = sample_batch_indices(x.shape[0], self.batch_size, self.gen)
        self.grad.zero_()
        loss = Mx.batch_loss(self.model(x[idx]), y[idx], self.loss)
        loss.backward()
        with torch.no_grad():
            r_tilde = self.update(self.theta, self.grad, self.lr, self.wd, self.r0)
            self._bad |= ~torch.isfinite(loss)
            if (t + 1) % self.running_every == 0:
                pre = r_tilde.reshape(()) if r_tilde is not None else torch.full((), math.nan, device=self.device)
                self._running.append((t + 1, torch.stack([
                    loss.detach().float(), protocols.norm(self.grad).reshape(()).float(),
                    protocols.norm(self.theta).reshape(()).float(), pre.float()])))

    def _flush_running(self) -> None:
        """Read the buffered running rows back in one transfer; notice divergence here."""
        if self._running:
            values = torch.stack([v for _, v in self._running]).cpu().tolist()
            for (it, _), (bl, gn, r, pre) in zip(self._running, values):
                row = {"iteration": it, "batch_loss": bl, "stoch_grad_norm": gn, "radius": r}
                if not math.isnan(pre):
                    row["radius_preproj"] = pre
                self._pending_running.append(row)
            self._running = []
        if bool(self._bad) or not bool(torch.isfinite(self.theta).all()):
            self.status = ["diverged"]

    # ---- log steps ----------------------------------------------------------------------------
    def measure(self, t: int, sink) -> dict:
        """All §3 metrics of θ_t, plus the window entropy when the window is complete."""
        d = self.data
        train_loss, train_acc = Mx.full_gradient(self.model, d.x_train, d.y_train, self.grad, self.loss)
        gbar = self.grad.clone()
        grads = Mx.stochastic_gradients(self.model, d.x_train, d.y_train, self.grad, self.loss,
                                        self.num_stoch_grads, self.batch_size, self.metric_gen)
        stats = Mx.gradient_noise_stats(gbar, grads if self.stoch_entropy_ks is None else self._kept(grads))
        # eval-mode test metrics use the BN running statistics the gradient passes just updated (§3)
        test_loss, test_acc = Mx.evaluate(self.model, d.x_test, d.y_test, self.loss)
        radius = protocols.norm(self.theta).reshape(())
        names = ["train_loss", "train_acc", "test_loss", "test_acc", "radius", *stats]
        values = torch.stack([v.double() for v in (train_loss, train_acc, test_loss, test_acc, radius,
                                                    *stats.values())]).cpu().tolist()
        row = {"iteration": t, **dict(zip(names, values))}
        if self.stoch_entropy_ks is not None:
            # §4a on the M one-step displacements η g_i (η: the protocol's multiplier at this radius);
            # they lie in the tangent space at θ, so d_e = D − 1 as for the trajectory. Scaling every
            # point by η scales each L_k by η, so Ŝ_k(η g) = Ŝ_k(g) + d_e log η (no scaled copy)
            step = protocols.step_lr(self.members[0]["protocol"], self.lr, row["radius"])
            d_e = self.D - 1
            S = knn_graph_entropy(self._stoch_buf, self.stoch_entropy_ks, intrinsic_dim=d_e)
            row.update({f"stoch_entropy_knn_k{k}": v + d_e * math.log(step) for k, v in S.items()})
        if sink is not None and self.plan.evaluates(t):
            row.update(sink.evaluate(t, self.plan.specs_at(t))[0])
        r_bar = row.get("window_radius", row["radius"])
        row.update(Mx.variance_terms(row, r_bar, self.D))
        return row

    def run(self, sink=None) -> Iterator[dict]:
        t = self.iteration
        while self.status[0] == "running":
            if not self.host_done:
                if sink is not None and self.plan.needs_snapshot(t):
                    sink.put(t, self.theta.detach().view(1, -1))
                if t in self.log_set:
                    self._flush_running()
                    row = None
                    if self.status[0] == "running":
                        row = self.measure(t, sink)
                        if not math.isfinite(row["train_loss"]):
                            self.status = ["diverged"]
                            row = None
                    if self.status[0] == "running" and t >= self.iterations:
                        self.status = ["done"]
                    self.host_done = True
                    yield self._event(t, row)
                    continue
                self.host_done = True
            if t >= self.iterations:
                self.status = ["done"]
                break
            self._step(t)
            t += 1
            self.iteration, self.host_done = t, False
            if len(self._running) >= FLUSH_EVERY:
                self._flush_running()
                if self.status[0] == "diverged":
                    yield self._event(t, None)

    def _event(self, t: int, row: dict | None) -> dict:
        running, self._pending_running = self._pending_running, []
        return {"iteration": t, "rows": [row], "running": [running], "status": list(self.status)}

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._flush_running()
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "gen": self.gen.get_state(), "metric_gen": self.metric_gen.get_state(),
            "iteration": self.iteration, "host_done": self.host_done, "status": list(self.status),
            "pending_running": list(self._pending_running),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            own = self.model.state_dict()
            for k, v in state["model"].items():
                own[k].copy_(v)
        self.gen.set_state(state["gen"])
        self.metric_gen.set_state(state["metric_gen"])
        self.iteration = int(state["iteration"])
        self.host_done = bool(state["host_done"])
        self.status = list(state["status"])
        self._pending_running = list(state["pending_running"])
        self._bad.zero_()
