"""The entropy reservoir (engine/reservoir.py) against the single-process LocalSink (trainables/sinks.py).

Both sinks get the same snapshot stream and are asked at the same log steps; the reservoir must give
exactly the LocalSink's dicts (same windows, same estimator code), report incomplete windows as
``entropy_missing`` like the LocalSink, keep a bounded number of snapshots, and survive being killed.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from trainables.schedule import SnapshotPlan, log_iterations, window_iterations
from trainables.sinks import LocalSink

N_MEMBERS, D = 2, 300
SPECS = [{"name": "knn", "window": 20, "stride": 1, "ks": [1, 5, 19]},
         {"name": "kl", "window": 12, "stride": 3, "standardize": False}]


def _snapshots(iterations: int, seed: int = 0) -> torch.Tensor:
    """A random walk on the sphere, (iterations + 1, n_members, D): distinct, well-spread points."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(iterations + 1, N_MEMBERS, D, generator=g) * 0.05
    walk = torch.randn(1, N_MEMBERS, D, generator=g) + steps.cumsum(0)
    return walk / walk.norm(dim=-1, keepdim=True)


def _assert_same(remote: list[dict], local: list[dict], t: int) -> None:
    """The same estimates to 1e-12: both sinks hand the estimator the same window, oldest first, but the
    reservoir computes with the node's cores and the test with one thread, so float64 reductions may
    differ in the last bits (seen on an AMD EPYC host). Any other window changes the values at O(1)."""
    assert len(remote) == len(local), f"log step {t}: {remote} vs {local}"
    for r, l in zip(remote, local):
        assert r.keys() == l.keys() and all(r[k] == pytest.approx(l[k], rel=1e-12, abs=1e-12) for k in r), (
            f"log step {t}: reservoir {remote} != local {local}")


def _stream(plan, log_iters, theta, sinks, skip=()):
    """Feed every sink the runner's way: snapshot at plan iterations, evaluate at evaluated log steps."""
    out = {id(s): {} for s in sinks}
    for t in range(theta.shape[0]):
        if plan.needs_snapshot(t) and t not in skip:
            for s in sinks:
                s.put(t, theta[t])
        if t in log_iters and plan.evaluates(t):
            for s in sinks:
                out[id(s)][t] = s.evaluate(t)
    return [out[id(s)] for s in sinks]


@pytest.fixture
def reservoir(ray_session):
    from engine.reservoir import get_reservoir, shutdown_reservoirs

    shutdown_reservoirs()           # a fresh actor (state of an earlier test must not leak in)
    res = _wait_alive(get_reservoir())
    yield res
    shutdown_reservoirs()


def _wait_alive(res, old_pid=None, deadline_s=60.0):
    """Block until the actor answers (from a new process when old_pid is given)."""
    import ray

    end = time.monotonic() + deadline_s
    while True:
        try:
            pid = ray.get(res.pid.remote(), timeout=10)
            if pid != old_pid:
                return res
        except Exception:            # not restarted yet: ask again shortly
            time.sleep(0.1)          # polling interval, not synchronisation
        if time.monotonic() > end:
            raise AssertionError("reservoir actor did not come (back) up within the deadline")


def test_reservoir_equals_local_sink_including_missing_windows(reservoir):
    from engine.reservoir import ReservoirSink

    iterations = 120
    log_iters = log_iterations("every:5", iterations)
    plan = SnapshotPlan(log_iters, SPECS)
    theta = _snapshots(iterations)
    local = LocalSink(SPECS, N_MEMBERS, D)
    remote = ReservoirSink("test/equal", SPECS, N_MEMBERS, D, "cpu", reservoir=reservoir, chunk_snapshots=7)
    skip = {61, 63}                                   # lost snapshots: windows holding them are incomplete
    got_local, got_remote = _stream(plan, log_iters, theta, [local, remote], skip=skip)

    assert sorted(got_local) == sorted(got_remote) and len(got_local) > 15
    for t in got_local:
        _assert_same(got_remote[t], got_local[t], t)
    # independent bookkeeping: which steps must be missing (a skipped iteration inside a window) or full
    knn, kl = SPECS
    for t, rows in got_local.items():
        knn_hole = t >= 19 and bool(skip & set(window_iterations(t, knn["window"], knn["stride"])))
        kl_hole = t >= 33 and bool(skip & set(window_iterations(t, kl["window"], kl["stride"])))
        for row in rows:
            assert ("entropy_missing" in row) == (knn_hole or kl_hole), t
            assert ("entropy_knn_k5" in row) == (t >= 19 and not knn_hole), t
            assert ("entropy_kl_sphere" in row) == (t >= 33 and not kl_hole), t
    assert any("entropy_missing" in r[0] for r in got_local.values())
    # the two members have different walks, so their entropies differ (rows are not copies)
    t_last = max(got_local)
    assert got_local[t_last][0]["entropy_knn_k1"] != got_local[t_last][1]["entropy_knn_k1"]
    remote.close()


def test_window_index_keeps_a_bounded_number_of_snapshots(ray_session):
    """The sink's index fed real object-store refs: old chunks are dropped as windows move on."""
    import ray

    from engine.reservoir import WindowIndex

    window, chunk = 20, 8
    idx = WindowIndex([{"name": "knn", "window": window, "stride": 1, "ks": [1]}])
    data = np.zeros((chunk, 1, 4), dtype=np.float32)
    for start in range(0, 400, chunk):
        idx.add(list(range(start, start + chunk)), ray.put(data))
        kept = sum(len(its) for its, _ in idx.live())
        assert kept <= window + chunk - 1, f"after iteration {start + chunk - 1}: {kept} snapshots kept"
    assert idx.snapshot_counts() == [window]
    # the newest window (380..399) must still be fully indexed, older ones not at all
    assert sorted(idx.index[0]) == list(range(400 - window, 400))
    assert idx.window(0, 399) is not None and idx.window(0, 398) is None


def test_sink_releases_chunks_and_reservoir_counts_its_work(reservoir):
    import ray

    from engine.reservoir import ReservoirSink

    window, chunk = 20, 8
    specs = [{"name": "knn", "window": window, "stride": 1, "ks": [1]}]
    sink = ReservoirSink("test/bounded", specs, 1, 50, "cpu", reservoir=reservoir, chunk_snapshots=chunk)
    g = torch.Generator().manual_seed(0)
    for it in range(500):
        sink.put(it, torch.randn(1, 50, generator=g))
    assert "entropy_knn_k1" in sink.evaluate(499)[0]
    assert sink.windows.snapshot_counts() == [window]
    # a window of 20 consecutive snapshots touches at most 4 chunks of 8 (without release: 63 chunks)
    assert len(sink.windows.chunks) <= (window - 1) // chunk + 2
    assert ray.get(reservoir.stats.remote())["test/bounded"] == {"evaluations": 1}
    sink.close()
    assert "test/bounded" not in ray.get(reservoir.stats.remote())


def test_asynchronous_sink_gives_the_same_rows_in_order(reservoir):
    """evaluate() returns at once with empty rows; collect() hands the synchronous sink's rows over in
    log-step order."""
    from engine.reservoir import ReservoirSink

    iterations = 120
    log_iters = log_iterations("every:5", iterations)
    plan = SnapshotPlan(log_iters, SPECS)
    theta = _snapshots(iterations, seed=7)
    sync = ReservoirSink("test/sync", SPECS, N_MEMBERS, D, "cpu", reservoir=reservoir, chunk_snapshots=5)
    lazy = ReservoirSink("test/async", SPECS, N_MEMBERS, D, "cpu", reservoir=reservoir, chunk_snapshots=5,
                         asynchronous=True)
    got_sync, immediate = _stream(plan, log_iters, theta, [sync, lazy])
    assert all(rows == [{}] * N_MEMBERS for rows in immediate.values())
    collected = lazy.collect(wait=True)
    assert [t for t, _ in collected] == sorted(got_sync) and not lazy.pending()
    for t, rows in collected:
        assert "entropy_knn_k1" in rows[0] or "entropy_kl_sphere" in rows[0], (t, rows)
        _assert_same(rows, got_sync[t], t)


def test_killed_reservoir_loses_no_entropy(reservoir):
    """SIGKILL of the reservoir's process mid-stream: the chunks are the trial's, the reservoir holds
    nothing the trial needs, so every log step's entropy equals the LocalSink's, including the windows
    that reach back before the kill, computed by the restarted process."""
    import os
    import signal

    import ray

    from engine.reservoir import ReservoirSink

    specs = SPECS                                    # knn window 20 and kl window 12 stride 3
    iterations, kill_after = 150, 70
    log_iters = log_iterations("every:10", iterations)
    plan = SnapshotPlan(log_iters, specs)
    theta = _snapshots(iterations, seed=3)
    local = LocalSink(specs, N_MEMBERS, D)
    remote = ReservoirSink("test/kill", specs, N_MEMBERS, D, "cpu", reservoir=reservoir, chunk_snapshots=4)
    got_local, got_remote = {}, {}
    for t in range(iterations + 1):
        if plan.needs_snapshot(t):
            local.put(t, theta[t])
            remote.put(t, theta[t])
        if t in log_iters and plan.evaluates(t):
            got_local[t] = local.evaluate(t)
            got_remote[t] = remote.evaluate(t)          # must never raise
        if t == kill_after:
            old = ray.get(reservoir.pid.remote())
            os.kill(old, signal.SIGKILL)
            _wait_alive(reservoir, old_pid=old)
    after_kill = [t for t in got_local if t > kill_after]
    assert ray.get(reservoir.stats.remote())["test/kill"] == {"evaluations": len(after_kill)}
    assert min(got_local) < kill_after < max(got_local)
    for t in got_local:
        assert all("entropy_missing" not in r for r in got_remote[t]), (t, got_remote[t])
        _assert_same(got_remote[t], got_local[t], t)
    remote.close()


def test_reservoir_reads_chunks_from_its_arguments_never_with_ray_get(monkeypatch):
    """The chunks travel as top-level task arguments, numbered by ``by_number``; the reservoir's task calls
    no ``ray.get`` (a ``ray.get`` from its worker threads once waited forever under CPU load). Run in this
    process with ``ray.get`` made to fail: the rows equal the LocalSink's, a window with a missing
    snapshot gives entropy_missing."""
    import ray

    from engine.reservoir import Reservoir, by_number

    theta = _snapshots(39, seed=3)                                   # iterations 0..39
    chunk_arrays = {f"ref{c}": theta[8 * c:8 * c + 8].numpy() for c in range(5)}
    spec = SPECS[0]                                                   # k-NN, window 20, stride 1
    where = [(f"ref{it // 8}", it % 8, None) for it in range(20, 40)]
    jobs, refs = by_number([(spec, where), (spec, None)])
    assert refs == ["ref2", "ref3", "ref4"]
    assert jobs[0][1][0] == (0, 4, None) and jobs[0][1][-1] == (2, 7, None) and jobs[1] == (spec, None)

    def no_get(*args, **kwargs):
        raise AssertionError("the reservoir called ray.get")
    monkeypatch.setattr(ray, "get", no_get)
    threads = torch.get_num_threads()
    try:
        rows = Reservoir().evaluate("test/args", 39, N_MEMBERS, jobs[:1], None, *[chunk_arrays[r] for r in refs])
        missing = Reservoir().evaluate("test/args", 39, N_MEMBERS, jobs[1:], [1])
    finally:
        torch.set_num_threads(threads)
    local = LocalSink([spec], N_MEMBERS, D)
    for t in range(40):
        local.put(t, theta[t])
    _assert_same(rows, local.evaluate(39), 39)
    assert missing == [{}, {"entropy_missing": 1.0}]


def test_nonfinite_entropy_is_marked_missing():
    """A window whose estimate is not finite (here: NaN weights) gives entropy_missing and the reason,
    and no non-finite value."""
    import math

    local = LocalSink([SPECS[0]], 1, D)
    theta = _snapshots(25, seed=5)
    for t in range(22):
        local.put(t, theta[t, :1])
    clean = local.evaluate(21)[0]                       # window 2..21: finite, a complete row
    for t in range(22, 26):
        local.put(t, theta[t, :1] if t != 22 else torch.full((1, D), float("nan")))
    row = local.evaluate(25)[0]
    assert row["entropy_missing"] == 1.0 and row["entropy_nonfinite"] == 1.0, row
    assert all(math.isfinite(v) for v in row.values()), row
    assert "entropy_knn_k1" not in row
    assert "entropy_missing" not in clean and math.isfinite(clean["entropy_knn_k1"])


def test_late_entropy_gives_the_rows_of_the_synchronous_run(reservoir):
    """A network runner with the engine's asynchronous sink: once the entropy is attached to its rows
    (engine.trainable.attach_entropy, which also redoes σ² with the window radius) every row equals the
    row of a run whose sink answered at once."""
    from engine.reservoir import ReservoirSink
    from engine.trainable import attach_entropy
    from trainables.runner import make_runner

    member = {"model": "convnet", "width": 1, "dataset": "digits", "protocol": "fixed_lr", "lr": 0.5,
              "wd": 0.05, "iterations": 60,
              "batch_size": 32, "num_stoch_grads": 2, "log_schedule": "every:10",
              "entropy": [{"name": "knn", "window": 25, "stride": 1, "ks": [1, 5]}]}

    def run(asynchronous):
        runner = make_runner([member], "cpu")
        sink = ReservoirSink(f"test/late{asynchronous}", runner.members[0]["entropy"], 1, runner.D, "cpu",
                             reservoir=reservoir, asynchronous=asynchronous)
        rows = {e["iteration"]: e["rows"][0] for e in runner.run(sink)}
        for t, ent in sink.collect(wait=True):
            attach_entropy(rows[t], ent[0], runner.D)
        return rows

    now, late = run(False), run(True)
    assert sorted(late) == sorted(now) and "window_radius" in now[60]
    # σ² really depends on the window radius here (it differs from the value with the log radius)
    assert abs(now[60]["window_radius"] - now[60]["radius"]) > 1e-6 * now[60]["radius"]
    for t in now:
        assert late[t] == now[t], t
