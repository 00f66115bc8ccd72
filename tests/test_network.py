"""Tests for trainables.network.NetworkRunner (docs/DESIGN.md "Runners", docs/theory.md §2–§3).

Tiny ConvNet(c=2) on sklearn digits (D = 1,530), a few dozen iterations, small M and windows.
"""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from conftest import BASE_NAMES
from trainables.data import load_dataset
from trainables.models import build_model, si_parameters
from trainables.sinks import LocalSink
from trainables.network import NetworkRunner


KS = [1, 2, 5, 10, 1000]


def config(**kw):
    cfg = dict(model="convnet", width=2, dataset="digits", protocol="fixed_sphere", lr=0.01, wd=0.0,
               radius=1.0, batch_size=32, iterations=60, log_schedule="every:20", running_every=5,
               num_stoch_grads=2, seed=3,
               entropy=[{"name": "knn", "window": 6, "stride": 1, "ks": KS}], device="cpu")
    cfg.update(kw)
    return cfg


def make(cfg):
    runner = NetworkRunner([cfg])
    sink = LocalSink(cfg["entropy"], 1, runner.D, device=runner.device) if cfg["entropy"] else None
    return runner, sink


# ---- training ---------------------------------------------------------------------------------

def test_training_lowers_the_train_loss():
    cfg = config(lr=0.003, iterations=150, log_schedule="every:150", entropy=[], num_stoch_grads=1)
    runner, _ = make(cfg)
    runner.log_iters, runner.log_set = [0, 150], {0, 150}  # log the start as well
    rows = [e["rows"][0] for e in runner.run(None)]
    assert [r["iteration"] for r in rows] == [0, 150]
    assert runner.status == ["done"] and runner.iteration == 150
    # ln 10 ≈ 2.3 is chance level; the frozen norm-10 head starts far above it
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    assert rows[-1]["train_loss"] < 1.0
    assert rows[-1]["train_acc"] > rows[0]["train_acc"] + 0.3


@pytest.mark.parametrize("protocol,lr,wd,r0", [("fixed_sphere", 0.05, 0.0, 2.0),
                                               ("fixed_elr", 0.005, 0.05, 0.5),
                                               ("fixed_lr", 0.05, 0.05, 1.0)])
def test_trajectory_matches_hand_written_sgd(protocol, lr, wd, r0):
    """Every step of the runner is one step of plain SGD written out with the §2 formulas, on the batch
    drawn from the ``seed`` generator (iid indices with replacement, §1).

    Each hand step starts from the runner's own θ_t: float32 rounding differs between the flat update
    and the per-tensor one, and along a whole trajectory such differences are amplified (ReLU and
    max-pool switches: ~1e-7 after two steps grew to ~15 % of |θ| after twelve on one CPU), so only a
    step-by-step comparison is exact to rounding."""
    iters, B = 12, 32
    cfg = config(protocol=protocol, wd=wd, radius=r0, lr=lr, iterations=iters,
                 log_schedule=f"every:{iters}", entropy=[], batch_size=B)
    runner, _ = make(cfg)
    runner.log_iters, runner.log_set = list(range(iters + 1)), set(range(iters + 1))   # stop at every t
    thetas = {e["iteration"]: runner.theta.clone() for e in runner.run(None)}
    assert sorted(thetas) == list(range(iters + 1))

    data = load_dataset("digits")
    model = build_model("convnet", 2, 10, in_channels=1, radius=r0)
    params = si_parameters(model)
    gen = torch.Generator().manual_seed(3)
    n = data.x_train.shape[0]
    for t in range(iters):
        vector_to_parameters(thetas[t].clone(), params)          # params become views of the copy
        idx = torch.randint(n, (B,), generator=gen)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            r2 = sum((p.double() ** 2).sum() for p in params).item()
            for p, g in zip(params, grads):
                if protocol == "fixed_sphere":
                    p.sub_(lr * r0 ** 2 * g)
                elif protocol == "fixed_elr":
                    p.sub_(lr * r2 * (g + wd * p))
                else:
                    p.sub_(lr * (g + wd * p))
            if protocol == "fixed_sphere":
                scale = r0 / math.sqrt(sum((p.double() ** 2).sum() for p in params).item())
                for p in params:
                    p.mul_(scale)
        expected = parameters_to_vector(params).detach()
        step = (expected - thetas[t]).norm()
        assert step > 1e-3 * expected.norm(), f"t={t}: the step is too small to test anything"
        assert (thetas[t + 1] - expected).norm() < 1e-5 * step, f"t={t}"     # seen: 0 to 1.3e-7
    moved = (thetas[iters] - thetas[0]).norm()
    assert moved > 0.05 * thetas[0].norm()


# ---- resume -------------------------------------------------------------------------------------

def resume_config():
    return config(iterations=90, log_schedule="every:15", running_every=4, num_stoch_grads=3,
                  entropy=[{"name": "knn", "window": 8, "stride": 1, "ks": KS},
                           {"name": "kl", "window": 3, "stride": 5}])


def test_resume_reproduces_uninterrupted_run_exactly():
    cfg = resume_config()
    whole, sink = make(cfg)
    full = list(whole.run(sink))
    assert whole.status == ["done"]
    assert [e["iteration"] for e in full] == list(range(15, 91, 15))

    runner, sink = make(cfg)
    saved = None
    for e in runner.run(sink):
        if e["iteration"] == 45:
            buf = io.BytesIO()
            torch.save({"runner": runner.state_dict(), "sink": sink.state_dict()}, buf)
            saved = buf.getvalue()
            break
    assert saved is not None
    state = torch.load(io.BytesIO(saved), weights_only=True)

    fresh, fresh_sink = make(cfg)
    fresh.load_state_dict(state["runner"])
    fresh_sink.load_state_dict(state["sink"])
    assert fresh.iteration == 45
    resumed = list(fresh.run(fresh_sink))
    later = [e for e in full if e["iteration"] > 45]
    assert [e["iteration"] for e in resumed] == [e["iteration"] for e in later]
    for a, b in zip(resumed, later):
        assert a["rows"] == b["rows"]          # every metric, entropy included, exactly
        assert a["running"] == b["running"]
    # the entropy columns were present after the restart (windows restored with the sink)
    assert "entropy_knn_k5" in resumed[-1]["rows"][0] and "entropy_kl_sphere" in resumed[-1]["rows"][0]
    assert fresh.status == ["done"] and torch.equal(fresh.theta, whole.theta)


def test_state_dict_is_plain_data():
    runner, _ = make(config(entropy=[]))
    state = runner.state_dict()

    def check(obj):
        if isinstance(obj, dict):
            assert all(isinstance(k, str) for k in obj)
            for v in obj.values():
                check(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                check(v)
        else:
            assert obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool)), type(obj)

    check(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


# ---- logging does not perturb the trajectory ----------------------------------------------------

def test_logging_does_not_change_the_trajectory():
    finals = []
    for m, schedule, entropy in [(2, "every:10", []),
                                 (7, "every:37", [{"name": "knn", "window": 4, "ks": KS}]),
                                 (3, "log:4", [{"name": "kl", "window": 3, "stride": 2}])]:
        runner, sink = make(config(iterations=50, num_stoch_grads=m, log_schedule=schedule, entropy=entropy))
        events = list(runner.run(sink))
        assert runner.status == ["done"] and events[-1]["iteration"] == 50
        finals.append(runner.theta.clone())
    assert torch.equal(finals[0], finals[1]) and torch.equal(finals[0], finals[2])


# ---- divergence ---------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol,wd", [("fixed_lr", 1.0), ("fixed_elr", 0.0)])
def test_huge_lr_diverges_without_exception(protocol, wd):
    runner, sink = make(config(protocol=protocol, lr=1e6, wd=wd, iterations=200, log_schedule="every:10"))
    events = list(runner.run(sink))
    assert runner.status == ["diverged"]
    assert events[-1]["status"] == ["diverged"] and events[-1]["rows"] == [None]
    assert runner.iteration < 200          # the run stopped early
    assert all(e["rows"][0] is not None for e in events[:-1])


def test_forced_nan_detected_at_flush_between_log_steps():
    cfg = config(iterations=500, log_schedule="every:400", running_every=1, entropy=[])
    runner, _ = make(cfg)
    with torch.no_grad():
        runner.theta[0] = float("nan")
    events = list(runner.run(None))
    assert runner.status == ["diverged"]
    assert len(events) == 1 and events[0]["rows"] == [None]
    assert events[0]["iteration"] < 400   # noticed at a running flush, not at the log step
    assert any(math.isnan(r["batch_loss"]) for r in events[0]["running"][0])


def test_forced_nan_detected_at_first_log_step():
    runner, _ = make(config(log_schedule="free_energy", entropy=[]))
    with torch.no_grad():
        runner.theta.fill_(float("nan"))
    events = list(runner.run(None))
    assert runner.status == ["diverged"] and len(events) == 1
    assert events[0]["iteration"] == 0 and events[0]["rows"] == [None]


# ---- configuration errors -----------------------------------------------------------------------

def test_members_that_cannot_share_a_model_are_refused():
    with pytest.raises(ValueError, match=r"differ in 'width' \(2, 4\).*remove 'width' from `bundle`"):
        NetworkRunner([config(), config(width=4, lr=0.02)])
    with pytest.raises(ValueError, match="at least one member"):
        NetworkRunner([])


def test_test_pass_follows_the_full_pass_before_the_stochastic_gradients():
    """docs/theory.md §3 (corrected 2026-12-02): the eval-mode test metrics use the BN running statistics that
    the 1024-chunk full pass left, not those of the M stochastic-gradient passes that follow it."""
    from trainables import metrics
    runner, _ = make(config(log_schedule="free_energy", iterations=3, entropy=[], num_stoch_grads=5))
    row = next(iter(runner.run(None)))["rows"][0]
    data = load_dataset("digits")
    model = build_model("convnet", 2, 10, in_channels=1)
    grad = torch.zeros(sum(p.numel() for p in si_parameters(model)))
    metrics.full_gradient(model, data.x_train, data.y_train, grad, "ce")   # BN running stats of the full pass
    test_loss, test_acc = metrics.evaluate(model, data.x_test, data.y_test, "ce")
    assert row["test_loss"] == pytest.approx(test_loss.item(), rel=1e-5)
    # after the stochastic passes the statistics (and so the test loss) would be another
    gen = torch.Generator().manual_seed(0)
    for _ in metrics.stochastic_gradients(model, data.x_train, data.y_train, grad, "ce", 5, 32, gen):
        pass
    later, _ = metrics.evaluate(model, data.x_test, data.y_test, "ce")
    assert abs(later.item() - test_loss.item()) > 1e-3 * abs(test_loss.item())


# ---- metric names and values --------------------------------------------------------------------

def test_metric_names_match_design():
    specs = [{"name": "knn", "window": 6, "stride": 1, "ks": KS}, {"name": "kl", "window": 3, "stride": 2}]
    cfg = config(iterations=20, log_schedule="log:3", entropy=specs, radius=2.0, lr=0.02)
    runner, sink = make(cfg)
    events = list(runner.run(sink))
    rows = {e["iteration"]: e["rows"][0] for e in events}
    assert sorted(rows) == list(range(10)) + [10, 14, 20]   # log:3 → 10, 14, 20 after 0..9
    # windows incomplete (knn needs t ≥ 5, kl t ≥ 4): base names only
    assert set(rows[0]) == BASE_NAMES and set(rows[3]) == BASE_NAMES
    # kl window complete from t = 4, knn from t = 5; ks clipped to window − 1 = 5
    assert set(rows[4]) == BASE_NAMES | {"entropy_kl_sphere", "entropy_kl_full", "window_radius", "window_radius_kl"}
    knn = {"entropy_knn_k1", "entropy_knn_k2", "entropy_knn_k5"}
    assert set(rows[20]) == BASE_NAMES | knn | {"entropy_kl_sphere", "entropy_kl_full", "window_radius",
                                               "window_radius_kl", "window_radius_knn"}
    # running rows: every running_every iterations, radius_preproj on the fixed sphere
    running = [r for e in events for r in e["running"][0]]
    assert [r["iteration"] for r in running] == [5, 10, 15, 20]
    assert all(set(r) == {"iteration", "batch_loss", "radius", "stoch_grad_norm", "radius_preproj"}
               for r in running)

    cfg = config(iterations=10, log_schedule="every:10", protocol="fixed_elr", entropy=[])
    runner, _ = make(cfg)
    events = list(runner.run(None))
    assert set(events[-1]["rows"][0]) == BASE_NAMES
    assert all(set(r) == {"iteration", "batch_loss", "radius", "stoch_grad_norm"}
               for e in events for r in e["running"][0])


def test_log_row_values_are_consistent_with_theory():
    r0, eta_eff = 2.0, 0.02
    cfg = config(iterations=20, log_schedule="every:20", radius=r0, lr=eta_eff, num_stoch_grads=4,
                 running_every=1, entropy=[{"name": "knn", "window": 4, "ks": [1, 2]}])
    runner, sink = make(cfg)
    events = list(runner.run(sink))
    row = events[-1]["rows"][0]
    assert row["radius"] == pytest.approx(r0, rel=1e-5)
    assert row["window_radius"] == pytest.approx(r0, rel=1e-5)
    assert row["snr"] == pytest.approx(row["full_grad_norm"] / row["stoch_grad_rms"], rel=1e-9)
    assert row["snr_mean"] == pytest.approx(row["full_grad_norm"] / row["noise_mean_norm"], rel=1e-9)
    assert row["noise_mean_norm"] <= row["stoch_grad_rms"] * (1 + 1e-12)   # mean ≤ rms
    assert row["trace_sigma"] == pytest.approx(row["stoch_grad_rms"] ** 2 * row["window_radius"] ** 2, rel=1e-9)
    assert row["grad_sq"] == pytest.approx(row["full_grad_norm"] ** 2 * row["window_radius"] ** 2, rel=1e-9)
    assert row["sigma2"] == pytest.approx(row["trace_sigma"] / (runner.D - 1), rel=1e-9)
    assert 0.0 <= row["train_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
    # running rows: θ ⟂ g (§1) so r̃² = r0² + (η_eff r0²)² |g|² with the logged minibatch gradient norm
    running = [r for e in events for r in e["running"][0]]
    assert len(running) == 20
    for r in running:
        assert r["radius"] == pytest.approx(r0, rel=1e-5)
        expected = math.sqrt(r0 ** 2 + (eta_eff * r0 ** 2 * r["stoch_grad_norm"]) ** 2)
        assert r["radius_preproj"] == pytest.approx(expected, rel=1e-4)
        assert r["radius_preproj"] > r0


@pytest.mark.parametrize("protocol,r0,wd,lr", [("fixed_sphere", 2.0, 0.0, 0.05), ("fixed_elr", 1.5, 0.01, 0.01),
                                               ("fixed_lr", 1.0, 0.01, 0.05)])
def test_stochastic_entropy_of_the_displacements_by_hand(protocol, r0, wd, lr):
    from trainables import metrics
    from trainables.network import METRIC_SEED_OFFSET
    M = 9
    cfg = config(iterations=20, log_schedule="every:10", num_stoch_grads=M, radius=r0, lr=lr, wd=wd,
                 protocol=protocol, entropy=[{"name": "knn", "window": 4, "ks": [1, 3]}])
    runner, sink = make({**cfg, "stochastic_entropy": True})
    events = list(runner.run(sink))
    row = events[-1]["rows"][0]
    plain, plain_sink = make(cfg)
    plain_rows = [e["rows"][0] for e in plain.run(plain_sink)]
    assert runner.status == ["done"] and torch.isfinite(runner.theta).all()
    assert torch.equal(plain.theta, runner.theta)                 # the option does not touch training
    assert {k: v for k, v in row.items() if not k.startswith("stoch_entropy")} == plain_rows[-1]
    assert {"stoch_entropy_knn_k1", "stoch_entropy_knn_k3"} <= set(row)

    # the same M gradients again: the metric generator as it was before the last log step's draws
    gen = torch.Generator().manual_seed(cfg["seed"] + METRIC_SEED_OFFSET)
    d = runner.data
    for _ in range(2):                                              # log steps 10 and 20 draw M each
        grads = [g.clone() for g in metrics.stochastic_gradients(runner.model, d.x_train, d.y_train,
                                                            runner.grad, runner.loss, M,
                                                            cfg["batch_size"], gen)]
    # the step really taken: η_eff r² on the sphere and for fixed ELR, η for fixed LR (docs/theory.md §2)
    r = row["radius"]
    step = lr * r ** 2 if protocol != "fixed_lr" else lr
    X = step * torch.stack(grads).double()
    dist = torch.cdist(X, X)
    dist.fill_diagonal_(float("inf"))
    d_e = runner.D - 1
    for k in (1, 3):
        L = dist.topk(k, dim=1, largest=False).values.sum().item()
        assert row[f"stoch_entropy_knn_k{k}"] == pytest.approx(d_e * math.log(L) - (d_e - 1) * math.log(M),
                                                               rel=1e-4)


def test_stochastic_entropy_memory_limit_is_explained(monkeypatch):
    import trainables.network as trial
    monkeypatch.setattr(trial, "STOCH_ENTROPY_MAX_BYTES", 1000)
    with pytest.raises(ValueError, match="lower num_stoch_grads or set stochastic_entropy: false"):
        NetworkRunner([config(num_stoch_grads=4, stochastic_entropy=True)])


def test_train_loss_at_start_by_hand():
    runner, _ = make(config(log_schedule="free_energy", iterations=3, entropy=[]))
    first = next(iter(runner.run(None)))
    assert first["iteration"] == 0
    data = load_dataset("digits")
    model = build_model("convnet", 2, 10, in_channels=1)
    model.train()
    with torch.no_grad():
        # chunks of 1024 in train-mode BN (§3); digits has 1437 training images
        x, y = data.x_train, data.y_train
        total = sum(F.cross_entropy(model(x[a:a + 1024]), y[a:a + 1024], reduction="sum").item()
                    for a in range(0, x.shape[0], 1024))
    assert first["rows"][0]["train_loss"] == pytest.approx(total / x.shape[0], rel=1e-5)


# ---- the hot loop never waits for the device ----------------------------------------------------

SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class SyncCounter:
    """Counts calls of host-synchronising Tensor methods while ``active``."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.active = False
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapper(t, *args, **kwargs):
            if self.active:
                self.calls.append(name)
            return original(t, *args, **kwargs)
        return wrapper


def test_bare_steps_make_no_host_sync(monkeypatch):
    runner, _ = make(config(entropy=[], running_every=5))
    counter = SyncCounter(monkeypatch)
    counter.active = True
    for t in range(30):  # includes running-metric steps (5, 10, ...), kept on the device
        runner._step(t)
    counter.active = False
    assert counter.calls == []
    assert len(runner._running) == 6
    # the counter does notice a read-back
    counter.active = True
    runner._flush_running()
    counter.active = False
    assert counter.calls


def test_run_between_log_steps_makes_no_host_sync(monkeypatch):
    """Inside run(): the only read-backs are in measure (log steps) and _flush_running."""
    cfg = config(iterations=60, log_schedule="every:30", running_every=7,
                 entropy=[{"name": "knn", "window": 5, "ks": [1, 2]}])
    runner, sink = make(cfg)
    counter = SyncCounter(monkeypatch)
    exempt = {"depth": 0}

    def exempting(method):
        def wrapper(*args, **kwargs):
            exempt["depth"] += 1
            counter.active = False
            try:
                return method(*args, **kwargs)
            finally:
                exempt["depth"] -= 1
                counter.active = exempt["depth"] == 0
        return wrapper

    monkeypatch.setattr(runner, "measure", exempting(runner.measure))
    monkeypatch.setattr(runner, "_flush_running", exempting(runner._flush_running))
    counter.active = True
    events = []
    for e in runner.run(sink):
        counter.active = False
        events.append(e)
        counter.active = exempt["depth"] == 0
    counter.active = False
    assert [e["iteration"] for e in events] == [30, 60]
    assert "entropy_knn_k1" in events[-1]["rows"][0]   # snapshots were taken in the hot loop
    assert counter.calls == []
