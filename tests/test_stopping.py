"""The stopping rule (trainables.stopping) on series with known statistics, the vMF bundle that
lets stopped members leave its batch, and network members (trainables.network) that stop, alone, in a
bundle and through Ray Tune + MLflow (the session Ray of tests/conftest.py)."""
import math

import numpy as np
import pytest
import torch

from trainables.sinks import LocalSink
from trainables.stopping import StopRule, check_spec, drift_z, mean_se
from trainables.toys.vmf import VMFRunner


def test_mean_se_and_drift_by_hand():
    # values 1, 2, 3, 4: mean 2.5, sample variance 5/3, s.e. sqrt(5/12)
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 12), rel=1e-15)
    # windows [1, 3] and [2, 4]: means 2 and 3, s.e. 1 each: z = 1/√2
    assert drift_z([1.0, 3.0, 2.0, 4.0], 2) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert drift_z([1.0, 3.0, 2.0], 2) is None                  # fewer than two windows


def _feed(rule, i, U, S, every_s, t0=0):
    for k, u in enumerate(U):
        row = {"train_loss": u, "radius": 1.0 + 1e-4 * math.sin(k)}
        if k % every_s == every_s - 1:
            row["entropy_kl_sphere"] = S[k // every_s]
        rule.observe(i, row)


def test_stationary_precise_member_stops_and_drifting_or_held_ones_do_not():
    rng = np.random.default_rng(0)
    spec = {"u_rel_se": 0.01, "s_se": 0.05, "u_rows": 25, "s_evals": 10}
    rule = StopRule(spec, 4)
    n = 80                                                     # 80 rows, an entropy value every 4th
    U = 0.1 * (1 + 0.02 * rng.standard_normal(n))              # rel. s.e. of 25 rows ≈ 0.02/5 = 0.004
    S = 1.0 + 0.05 * rng.standard_normal(n // 4)               # s.e. of 10 values ≈ 0.016
    _feed(rule, 0, U, S, 4)
    why = rule.verdict(0, 800_000)
    assert why is not None and why["stopped_at"] == 800_000
    assert why["stop_U_rel_se"] == pytest.approx(mean_se(list(U[-25:]))[1] / U[-25:].mean(), rel=1e-12)
    assert why["stop_S_se"] <= 0.05 and why["stop_U_drift_z"] <= 3
    # U still relaxing: the latest window sits 10 s.e. below the one before
    _feed(rule, 1, U * (1 + 2.0 * np.exp(-np.arange(n) / 20)), S, 4)
    assert rule.verdict(1, 800_000) is None
    # noisy U: stationary but its relative s.e. (≈ 0.04) misses the 0.01 target
    _feed(rule, 2, 0.1 * (1 + 0.2 * rng.standard_normal(n)), S, 4)
    assert rule.verdict(2, 800_000) is None
    # the OP convergence regime is never stopped early
    _feed(rule, 3, U, S, 4)
    rule.hold(3)
    assert rule.verdict(3, 800_000) is None
    # too few entropy values for two windows: keep running
    short = StopRule(spec, 1)
    _feed(short, 0, U[:60], S, 4)                              # 15 entropy values < 2 × 10
    assert short.verdict(0, 600_000) is None


def test_spec_is_checked():
    assert check_spec(None) is None
    assert check_spec({"s_se": "0.05"})["s_se"] == 0.05
    for bad, msg in (({"u_rel": 1}, "unknown key"), ({"u_rel_se": -1}, "> 0"), ({"drift_z": 2}, "at least one"),
                     ({"u_rel_se": 0.1, "u_rows": 1}, "u_rows")):
        with pytest.raises(ValueError, match=msg):
            check_spec(bad)


SPEC = {"name": "kl", "window": 20, "stride": 50, "standardize": True, "evaluate_every": 2000}


def _bundle(stop_when, iterations=60_000):
    # a fast walker (η_eff = 0.1: relaxes in ~10 steps) and a slow one (η_eff = 1e-4: ~10⁴ steps)
    return [dict(protocol="fixed_sphere", lr=lr, iterations=iterations, log_schedule="every:1000",
                 entropy=[SPEC], stop_when=stop_when) for lr in (0.1, 1e-4)]


def test_vmf_member_stops_leaves_the_batch_and_resumes_exactly():
    stop = {"u_rel_se": 0.1, "s_se": 0.3, "u_rows": 10, "s_evals": 5}
    runner = VMFRunner(_bundle(stop))
    events = list(runner.run(LocalSink([SPEC], 2, 3, dtype=torch.float64)))
    assert runner.status == ["stopped", "done"]
    stop_rows = [(e["iteration"], e["rows"][0]) for e in events if e["rows"][0] and "stopped_at" in e["rows"][0]]
    ((t_stop, row),) = stop_rows
    assert row["stopped_at"] == t_stop and t_stop < 60_000
    assert all(e["rows"][0] is None for e in events if e["iteration"] > t_stop)
    assert events[-1]["rows"][1] is not None and events[-1]["iteration"] == 60_000
    # the stopped walker left the batch: its θ is frozen from the stop on while the other moves
    frozen = runner.theta[0].clone()
    # a resume from a state saved after the stop reproduces the uninterrupted run
    first = VMFRunner(_bundle(stop))
    sink = LocalSink([SPEC], 2, 3, dtype=torch.float64)
    it = first.run(sink)
    head = [next(it) for _ in range(t_stop // 1000 + 5)]
    state = {"runner": first.state_dict(), "sink": sink.state_dict()}
    second = VMFRunner(_bundle(stop))
    second.load_state_dict(state["runner"])
    sink2 = LocalSink([SPEC], 2, 3, dtype=torch.float64)
    sink2.load_state_dict(state["sink"])
    assert head + list(second.run(sink2)) == events
    torch.testing.assert_close(second.theta[0], frozen, rtol=0, atol=0)
    # without stop_when every member runs to the end
    plain = VMFRunner(_bundle(None))
    list(plain.run(LocalSink([SPEC], 2, 3, dtype=torch.float64)))
    assert plain.status == ["done", "done"]


# ---- network members (trainables.network.NetworkRunner) ------------------------------------------------
# ConvNet(c=1) on 30 digits per class at η = 1: chance accuracy, a loss that fluctuates around ~6 from
# the first log rows on (stationary and noisy), so a loose target stops it within a few hundred steps;
# η = 0.01 drifts down slowly and must run on.

KNN = {"name": "knn", "window": 20, "stride": 1, "ks": [1, 2, 5, 10]}      # the rule watches k = 10
NET_STOP = {"u_rel_se": 0.1, "s_se": 2.5, "u_rows": 5, "s_evals": 5}


def _net(lr, stop_when=None, **kw):
    cfg = dict(model="convnet", width=1, dataset="digits", samples_per_label=30, batch_size=64, lr=lr,
               iterations=600, log_schedule="every:20", running_every=10, num_stoch_grads=2, entropy=[KNN],
               device="cpu", stop_when=stop_when)
    cfg.update(kw)
    return cfg


def _train(members):
    from trainables.network import NetworkRunner
    runner = NetworkRunner(members)
    sink = LocalSink(members[0]["entropy"], len(members), runner.D)
    return runner, sink, list(runner.run(sink))


def _expected_stop(rows, spec, iterations, z_max=3.0):
    """The first log step at which the rule's conditions hold on these rows, computed here with numpy:
    U and S (entropy_knn_k10) windows of u_rows / s_evals values, drift |Δmean| ≤ z_max combined
    standard errors, relative s.e. of U and s.e. of S within the targets; None if never."""
    def window_ok(x, w, target, relative):
        if len(x) < 2 * w:
            return False
        a, b = np.asarray(x[-2 * w:-w]), np.asarray(x[-w:])
        se_a, se_b = a.std(ddof=1) / math.sqrt(w), b.std(ddof=1) / math.sqrt(w)
        if abs(b.mean() - a.mean()) > z_max * math.hypot(se_a, se_b):
            return False
        return (se_b / abs(b.mean()) if relative else se_b) <= target
    U, S = [], []
    for row in rows:
        U.append(row["train_loss"])
        if "entropy_knn_k10" in row:
            S.append(row["entropy_knn_k10"])
        if row["iteration"] < iterations and window_ok(U, spec["u_rows"], spec["u_rel_se"], True) \
                and window_ok(S, spec["s_evals"], spec["s_se"], False):
            return row["iteration"]
    return None


def _rows(events, k):
    return [e["rows"][k] for e in events if e["rows"][k] is not None]


def _same_rows(stopped, reference):
    """A stopped member's rows are the reference's (stop statistics aside): stopping never changes the run."""
    assert len(stopped) <= len(reference)
    for a, b in zip(stopped, reference):
        assert {k: v for k, v in a.items() if not k.startswith("stop")} == b


def test_solo_network_member_stops_at_the_verdict_of_its_rows():
    _, _, ref_events = _train([_net(1.0)])
    reference = _rows(ref_events, 0)
    expected = _expected_stop(reference, NET_STOP, 600)
    assert expected is not None and expected < 600          # the setting does stop (else nothing is tested)
    runner, _, events = _train([_net(1.0, NET_STOP)])
    rows = _rows(events, 0)
    assert runner.status == ["stopped"] and events[-1]["status"] == ["stopped"]
    assert rows[-1]["iteration"] == expected == rows[-1]["stopped_at"] == runner.iteration
    assert rows[-1]["stop_U_rel_se"] <= 0.1 and rows[-1]["stop_S_se"] <= 2.5
    assert "stop_r_drift_z" not in rows[-1]          # the fixed sphere's radius is not tested for drift
    _same_rows(rows, reference)


@pytest.mark.parametrize("compacts", [False, True], ids=["parked", "compacted"])
def test_bundled_network_member_stops_and_the_other_runs_on_unchanged(compacts, monkeypatch):
    from trainables import compaction
    monkeypatch.setattr(compaction, "COMPACT", compacts)
    _, _, ref_events = _train([_net(1.0), _net(0.01)])
    expected = [_expected_stop(_rows(ref_events, k), NET_STOP, 600) for k in range(2)]
    assert expected[0] is not None and expected[1] is None      # the fast member stops, the slow one not
    runner, _, events = _train([_net(1.0, NET_STOP), _net(0.01, NET_STOP)])
    assert runner.status == ["stopped", "done"]
    fast, slow = _rows(events, 0), _rows(events, 1)
    assert fast[-1]["iteration"] == expected[0] == fast[-1]["stopped_at"]
    # no rows and no running rows after its stop
    after = [e for e in events if e["iteration"] > expected[0]]
    assert after and all(e["rows"][0] is None and not e["running"][0] for e in after)
    _same_rows(fast, _rows(ref_events, 0))
    reference = _rows(ref_events, 1)
    assert len(slow) == len(reference) and slow[-1]["iteration"] == 600
    if not compacts:        # parked: its learning rate masked, the other member's numbers unchanged
        assert runner.lr.flatten().tolist() == [0.0, pytest.approx(0.01, rel=1e-6)]
        assert slow == reference
        return
    # it left the batch: one member (η = 0.01) trains on; up to the stop the bits are the same, then the
    # one-group kernels round differently (float32 here; float64 to 1e-9: tests/test_compaction.py) and
    # SGD amplifies that over a few hundred steps, so only the next log rows are compared
    assert runner.active == [1] and runner.rows.shape[0] == 1
    assert runner.lr.flatten().tolist() == [pytest.approx(0.01, rel=1e-6)]
    n = len(fast)
    assert slow[:n] == reference[:n]
    for a, b in zip(slow[n:n + 3], reference[n:n + 3]):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4) for k in a)


def test_op_converged_member_is_never_stopped():
    # ConvNet(c=4) on 3 digits per class fits them: 100 % train accuracy with a falling loss (the papers'
    # "converged") well before min_iteration; there the loose rule would stop it at once, but it is held
    kw = dict(width=4, samples_per_label=3, batch_size=16, lr=0.01, iterations=400, entropy=[])
    loose = {"u_rel_se": 10.0, "drift_z": 1e9, "u_rows": 3, "min_iteration": 200}
    _, _, ref_events = _train_plain(_net(**kw))
    ref = _rows(ref_events, 0)
    converged_at = next(b["iteration"] for a, b in zip(ref, ref[1:])
                        if b["train_acc"] >= 1.0 and b["train_loss"] < a["train_loss"])
    assert converged_at < 200
    runner, _, events = _train_plain(_net(stop_when=loose, **kw))
    assert runner.regime == ["converged"] and runner.status == ["done"]
    assert _rows(events, 0)[-1]["iteration"] == 400
    assert not any("stopped_at" in r for r in _rows(events, 0))
    # the same rule on a member that is not converged (η = 1, chance accuracy) stops at min_iteration
    runner, _, events = _train_plain(_net(stop_when=loose, **{**kw, "lr": 1.0}))
    assert runner.regime == ["training"] and runner.status == ["stopped"]
    assert _rows(events, 0)[-1]["stopped_at"] == 200


def _train_plain(member):
    from trainables.network import NetworkRunner
    runner = NetworkRunner([member])
    return runner, None, list(runner.run(None))


def test_network_checkpoint_before_the_stop_restores_to_the_same_stop():
    import io

    from trainables.network import NetworkRunner
    cfg = _net(1.0, NET_STOP)
    whole, _, events = _train([cfg])
    t_stop = _rows(events, 0)[-1]["stopped_at"]
    first = NetworkRunner([cfg])
    sink = LocalSink([KNN], 1, first.D)
    head = []
    for e in first.run(sink):
        head.append(e)
        if e["iteration"] == t_stop - 40:                # two log steps before the stop
            break
    buf = io.BytesIO()
    torch.save({"runner": first.state_dict(), "sink": sink.state_dict()}, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["runner"]["stop"]["hist"][0]["train_loss"]         # the rule's histories travel with it
    second = NetworkRunner([cfg])
    second.load_state_dict(state["runner"])
    sink2 = LocalSink([KNN], 1, second.D)
    sink2.load_state_dict(state["sink"])
    rest = list(second.run(sink2))
    assert head + rest == events
    assert second.status == ["stopped"] and second.iteration == t_stop


def test_grid_accepts_stop_when_for_networks_and_explains_what_it_refuses(tmp_path):
    from engine.grid import GridError, load_grid
    base = {"experiment": "s", "fixed": {"model": "convnet", "iterations": 100, "log_schedule": "every:10",
                                          "entropy": [KNN]},
            "axes": {"lr": [0.1, 1.0]}}
    grid = load_grid({**base, "fixed": {**base["fixed"], "stop_when": {"u_rel_se": 0.01, "s_se": 1.0}}})
    cfg = grid.members()[0][1]
    assert cfg["stop_when"]["u_rel_se"] == 0.01 and cfg["stop_when"]["s_key"] is None
    # s_se without a k-NN entropy: nothing to watch
    with pytest.raises(GridError, match="stop_when.s_se needs the k-NN entropy"):
        load_grid({**base, "fixed": {**base["fixed"], "entropy": [], "stop_when": {"s_se": 1.0}}})
    # the sphere toy's runner cannot stop members
    with pytest.raises(GridError, match="stop_when: members stop early only for models"):
        load_grid({"experiment": "t", "fixed": {"model": "sphere_toy", "stop_when": {"u_rel_se": 0.1}},
                   "axes": {"lr": [0.1, 0.2]}})


def test_network_member_stops_through_engine(ray_session, tmp_path, tracking_uri, monkeypatch):
    """stop_when on a network grid through Ray Tune and MLflow: the η = 1 member stops at the log step
    the rule's conditions first hold on its logged U and S, tag ``stopped``, run FINISHED; the η = 0.01
    member runs to the end."""
    from conftest import REPO, metric_history, mlflow_member_runs
    from engine.sweep import main
    monkeypatch.chdir(tmp_path)
    sets = ["width=1", "samples_per_label=30", "iterations=600", "log_schedule=every:20", "running_every=10",
            "num_stoch_grads=2", "lr=[1.0, 0.01]", "checkpoint_every=0",
            "entropy=[{name: knn, window: 20, stride: 1, ks: [1, 2, 5, 10]}]",
            "stop_when={u_rel_se: 0.1, s_se: 2.5, u_rows: 5, s_evals: 5}"]
    argv = [str(REPO / "grids" / "demo.yaml"), "--tracking-uri", tracking_uri, "--storage-path",
            str(tmp_path / "ray_results"), "--verbose", "0"]
    for x in sets:
        argv += ["--set", x]
    assert main(argv) == 0
    parent, children = mlflow_member_runs(tracking_uri, "demo")
    by_lr = {float(r.data.params["lr"]): r for r in children.values()}
    fast, slow = by_lr[1.0], by_lr[0.01]
    assert fast.data.tags["thermosweep.status"] == "stopped" and fast.info.status == "FINISHED"
    (step, stopped_at), = metric_history(tracking_uri, fast.info.run_id, "stopped_at")
    U = dict(metric_history(tracking_uri, fast.info.run_id, "train_loss"))
    S = dict(metric_history(tracking_uri, fast.info.run_id, "entropy_knn_k10"))
    rows = [{"iteration": t, "train_loss": u, **({"entropy_knn_k10": S[t]} if t in S else {})}
            for t, u in sorted(U.items())]
    assert step == stopped_at == max(U) == _expected_stop(rows, NET_STOP, 600) < 600
    assert slow.data.tags["thermosweep.status"] == "done"
    assert metric_history(tracking_uri, slow.info.run_id, "train_loss")[-1][0] == 600
    assert parent.data.tags["thermosweep.sweep_status"] == "finished"
