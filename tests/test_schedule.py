"""Tests for trainables.schedule (docs/theory.md §3 schedules, §4 windows) and trainables.sinks.LocalSink."""
import math

import pytest
import torch

from trainables import entropy
from trainables.schedule import (SnapshotPlan, log_iterations, window_complete, window_iterations)
from trainables.sinks import LocalSink


# ---- log schedules ------------------------------------------------------------------------------

def test_free_energy_schedule_for_convnet_run():
    its = log_iterations("free_energy", 1_600_000)
    assert its[:10] == list(range(10))
    assert its[10] == 10
    assert its[-1] == 1_600_000
    assert all(a < b for a, b in zip(its, its[1:]))
    assert len(its) <= 10 + 193
    # log spacing: ~192 equal steps in log10 from 1 to log10(1.6e6) ≈ 6.204 → ratio ≈ 1.0644 at the end
    assert its[-2] == int(10 ** (1 + (math.log10(1.6e6) - 1) * 191 / 192))
    # the dense start is de-duplicated, so fewer than 203 points remain, but most survive
    assert len(its) > 150


def test_ideal_gas_schedule():
    n = 1_000_000
    its = log_iterations("ideal_gas", n)
    assert 0 not in its
    assert its[0] == 200
    head = [i for i in its if i <= 10_000]
    assert head == list(range(200, 10_001, 200))
    tail = [i for i in its if i > 10_000]
    # 151 points log-spaced from 1e4 to 1e6 (the first is 1e4 itself): 10^(4 + 2k/150)
    expected = sorted({int(10 ** (4 + 2 * k / 150)) for k in range(1, 151)})
    assert all(abs(a - b) <= 1 for a, b in zip(tail, expected)) and len(tail) == len(expected)
    assert its[-1] == n
    assert all(a < b for a, b in zip(its, its[1:]))


def test_every_and_log_schedules():
    assert log_iterations("every:7", 30) == [7, 14, 21, 28, 30]
    assert log_iterations("every:10", 30) == [10, 20, 30]
    # log:5 → 0..9 and 5 log-spaced points 10^(1, 1.75, 2.5, 3.25, 4) truncated
    assert log_iterations("log:5", 10_000) == list(range(10)) + [10, 56, 316, 1778, 10_000]
    # short runs keep only what fits
    assert log_iterations("log:5", 4) == [0, 1, 2, 3, 4]
    assert log_iterations("free_energy", 5) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("schedule,n", [("free_energy", 50_000), ("free_energy", 10_001),
                                        ("sphere_toy", 50_000), ("ideal_gas", 1_000_000),
                                        ("free_energy", 1_600_000)])
def test_last_log_spaced_point_is_the_last_iteration(schedule, n):
    """§3: the log-spaced points run from 10 (1e4, 100) *to* num_iters, so the last one is num_iters
    itself. Truncating 10**log10(n) = n − ε to n − 1 would add a spurious log step just before the
    end (a wasted measurement and a double-counted row in the stationary averages)."""
    its = log_iterations(schedule, n)
    assert its[-1] == n
    assert n - 1 not in its


@pytest.mark.parametrize("bad", ["linear", "every", "every:", "every:0", "every:-3", "every:x", "log:",
                                 "log:0", "every:1.5", ""])
def test_bad_schedule_names(bad):
    with pytest.raises(ValueError, match="log_schedule"):
        log_iterations(bad, 100)


def test_bad_iteration_count():
    with pytest.raises(ValueError, match="iterations"):
        log_iterations("every:10", 0)


# ---- windows and the snapshot plan --------------------------------------------------------------

def test_window_iterations_and_completeness():
    assert window_iterations(10, 5, 1) == [6, 7, 8, 9, 10]
    assert window_iterations(99, 4, 25) == [0, 25, 50, 75]
    assert window_iterations(130, 4, 25) == [50, 75, 100, 125]
    assert window_complete(4, 5, 1) and not window_complete(3, 5, 1)
    assert window_complete(75, 4, 25) and window_complete(99, 4, 25) and not window_complete(74, 4, 25)


def test_snapshot_plan_stride_one():
    plan = SnapshotPlan([3, 10, 20], [{"name": "knn", "window": 5, "stride": 1}])
    assert plan.snapshot_iters == set(range(6, 11)) | set(range(16, 21))
    assert not plan.evaluates(3)
    assert plan.evaluates(10) and plan.evaluates(20)
    assert [i for i in range(25) if plan.needs_snapshot(i)] == [6, 7, 8, 9, 10, 16, 17, 18, 19, 20]
    assert plan.next_snapshot_after(10) == 16
    assert plan.next_snapshot_after(20) is None


def test_snapshot_plan_stride_25_aligns_to_multiples():
    plan = SnapshotPlan([70, 80, 99, 130, 160], [{"name": "kl", "window": 4, "stride": 25}])
    assert not plan.evaluates(70)  # its window would start at 50 − 75 < 0
    assert {t for t in (80, 99, 130, 160) if plan.evaluates(t)} == {80, 99, 130, 160}
    assert plan.snapshot_iters == {0, 25, 50, 75, 100, 125, 150}
    assert all(i % 25 == 0 for i in plan.snapshot_iters)


def test_snapshot_plan_two_specs():
    specs = [{"name": "knn", "window": 3}, {"name": "kl", "window": 2, "stride": 10}]
    plan = SnapshotPlan([1, 5, 12], specs)
    assert plan.specs_at(1) == []
    assert plan.specs_at(5) == [0]
    assert plan.specs_at(12) == [0, 1]
    assert plan.snapshot_iters == {3, 4, 5, 10, 11, 12, 0}


# ---- LocalSink ----------------------------------------------------------------------------------

def snapshots(iters, D=12, n_members=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randn(n_members, D, generator=g) for i in iters}


def test_local_sink_complete_and_incomplete_windows():
    spec = {"name": "knn", "window": 5, "stride": 1, "ks": [1, 2, 50]}
    snaps = snapshots(range(0, 21))
    sink = LocalSink([spec], n_members=2, D=12)
    # window not complete yet at t = 3: nothing reported
    for i in range(4):
        sink.put(i, snaps[i])
    assert sink.evaluate(3) == [{}, {}]
    # only 7..10 present for t = 10 (6 missing, its slot holds iteration 1): flagged, not evaluated
    for i in range(7, 11):
        sink.put(i, snaps[i])
    assert sink.evaluate(10) == [{"entropy_missing": 1.0}, {"entropy_missing": 1.0}]
    # 16..20 complete (the ring buffer wrapped around several times)
    for i in range(11, 21):
        sink.put(i, snaps[i])
    rows = sink.evaluate(20)
    for m in range(2):
        window = torch.stack([snaps[i][m] for i in range(16, 21)])
        expected = {f"entropy_knn_k{k}": v for k, v in entropy.knn_graph_entropy(window, [1, 2, 50]).items()}
        expected["window_radius"] = expected["window_radius_knn"] = entropy.window_radius(window)
        assert set(rows[m]) == {"entropy_knn_k1", "entropy_knn_k2", "entropy_knn_k4", "window_radius",
                                "window_radius_knn"}
        for key, v in expected.items():
            assert rows[m][key] == pytest.approx(v, rel=1e-12, abs=1e-12)
    # the window radius is the mean snapshot norm
    w0 = torch.stack([snaps[i][0] for i in range(16, 21)]).double()
    assert rows[0]["window_radius"] == pytest.approx(w0.norm(dim=1).mean().item(), rel=1e-6)
    # a member subset is honoured
    assert sink.evaluate(20, members=[1])[0] == {}


def test_local_sink_stride_and_kl_and_state_round_trip():
    spec = {"name": "kl", "window": 3, "stride": 5}
    snaps = snapshots(range(0, 31), D=5, n_members=1, seed=1)
    sink = LocalSink([spec], n_members=1, D=5)
    for i in range(0, 31):
        sink.put(i, snaps[i])  # only multiples of 5 are kept
    rows = sink.evaluate(33)  # window 20, 25, 30
    window = torch.stack([snaps[i][0] for i in (20, 25, 30)])
    s_sphere, s_full = entropy.kl_sphere_entropy(window)
    assert rows[0]["entropy_kl_sphere"] == pytest.approx(s_sphere, rel=1e-12)
    assert rows[0]["entropy_kl_full"] == pytest.approx(s_full, rel=1e-12)

    state = sink.state_dict()
    fresh = LocalSink([spec], n_members=1, D=5)
    assert fresh.evaluate(33) == [{"entropy_missing": 1.0}]
    fresh.load_state_dict(state)
    assert fresh.evaluate(33) == rows


def test_snapshot_plan_evaluate_last_keeps_only_the_last_steps():
    plan = SnapshotPlan([3, 10, 20, 30], [{"name": "knn", "window": 5, "evaluate_last": 2}])
    assert not plan.evaluates(10)
    assert plan.evaluates(20) and plan.evaluates(30)
    assert plan.snapshot_iters == set(range(16, 21)) | set(range(26, 31))


def test_snapshot_plan_evaluate_every_then_last():
    # log every 10, entropy only at multiples of 40, then the last 2 of those
    spec = {"name": "kl", "window": 4, "stride": 5, "evaluate_every": 40, "evaluate_last": 2}
    plan = SnapshotPlan(list(range(10, 201, 10)), [spec])
    assert [t for t in range(0, 201) if plan.evaluates(t)] == [160, 200]
    assert plan.snapshot_iters == {145, 150, 155, 160, 185, 190, 195, 200}


def test_local_sink_evaluates_only_the_requested_specs():
    specs = [{"name": "knn", "window": 3, "ks": [1]}, {"name": "kl", "window": 3}]
    snaps = snapshots(range(0, 3), D=4, n_members=1, seed=2)
    sink = LocalSink(specs, n_members=1, D=4)
    for i in range(3):
        sink.put(i, snaps[i])
    assert set(sink.evaluate(2, [0])[0]) == {"entropy_knn_k1", "window_radius", "window_radius_knn"}
    assert set(sink.evaluate(2, [1])[0]) == {"entropy_kl_sphere", "entropy_kl_full", "window_radius",
                                             "window_radius_kl"}
    assert set(sink.evaluate(2)[0]) == {"entropy_knn_k1", "entropy_kl_sphere", "entropy_kl_full",
                                        "window_radius", "window_radius_knn", "window_radius_kl"}


def test_each_estimator_keeps_its_window_radius_and_sigma_uses_the_kl_one():
    # the radius grows with the iteration, so a k-NN window of the last 3 iterates (8, 9, 10) and a
    # KL window of 3 snapshots every 5 (0, 5, 10) have different mean radii: 10 and 6 (|θ_i| = i + 1)
    D = 4
    direction = torch.ones(1, D) / 2.0                       # a unit vector
    specs = [{"name": "knn", "window": 3, "ks": [1]}, {"name": "kl", "window": 3, "stride": 5}]
    for order in (specs, specs[::-1]):                       # whichever is evaluated last
        sink = LocalSink(order, n_members=1, D=D, dtype=torch.float64)
        for i in range(11):
            sink.put(i, direction * (i + 1))
        row = sink.evaluate(10)[0]
        assert row["window_radius_knn"] == pytest.approx(10.0, rel=1e-12)
        assert row["window_radius_kl"] == pytest.approx(6.0, rel=1e-12)
        assert row["window_radius"] == pytest.approx(6.0, rel=1e-12)    # σ² uses the KL window
        # k-NN alone: its own radius
        assert sink.evaluate(10, [order.index(specs[0])])[0]["window_radius"] == pytest.approx(10.0, rel=1e-12)
