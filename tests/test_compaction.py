"""Stopped members leave a bundle's vectorised batch (trainables.compaction, issue 11 item 4).

A bundle of 4 ConvNet(c=4) members on 3 digits per class, float64, heavy-ball momentum (so optimizer rows
exist): the two η = 0.001 members fit the digits (the OP "converged" regime, so the loose rule holds them)
and run on, the two η = 1 members stop at the first log step after ``min_iteration``. Seeds 1, 2, 3, 2:
the stopped members take the generators of seeds 1 and 3 with them, the running ones keep sharing seed 2.
"""
from __future__ import annotations

import io

import pytest
import torch

from trainables.network import NetworkRunner
from trainables.sinks import LocalSink

KNN = {"name": "knn", "window": 70, "stride": 1, "ks": [1, 3]}
LOOSE = {"u_rel_se": 10.0, "drift_z": 1e9, "u_rows": 3, "s_evals": 2, "min_iteration": 100}
ITERATIONS, WIDTH = 240, 4


def _members():
    return [dict(model="convnet", width=WIDTH, dataset="digits", samples_per_label=3, batch_size=16, lr=lr,
                 seed=seed, iterations=ITERATIONS, log_schedule="every:20", running_every=10, num_stoch_grads=2,
                 stochastic_entropy=True, optimizer="momentum", entropy=[KNN], device="cpu", stop_when=LOOSE,
                 dtype="float64")
            for lr, seed in ((1.0, 1), (0.001, 2), (1.0, 3), (0.001, 2))]


def _fresh(compacts=True):
    runner = NetworkRunner(_members())
    runner.compacts = compacts
    return runner, LocalSink([KNN], 4, runner.D, dtype=torch.float64)


def _run(compacts):
    runner, sink = _fresh(compacts)
    return runner, list(runner.run(sink))


def _stopped_at(events, k):
    return next(e["rows"][k]["stopped_at"] for e in events if e["rows"][k] and "stopped_at" in e["rows"][k])


def test_stopped_members_leave_the_batch_and_the_others_run_on_unchanged():
    compact, events = _run(True)
    parked, reference = _run(False)
    assert compact.status == parked.status == ["stopped", "done", "stopped", "done"]
    t_stop = _stopped_at(events, 0)
    assert t_stop == _stopped_at(events, 2) < ITERATIONS - 60          # a good stretch runs compacted
    # the batch really holds 2 members: θ rows, the grouped conv blocks, the heads, the generators
    assert compact.active == [1, 3] and compact.compactions == [[t_stop, [1, 3]]]
    assert compact.rows.shape == (2, compact.D) and parked.rows.shape == (4, compact.D)
    assert compact.model.features[0].weight.shape[0] == 2 * WIDTH and compact.model.head.weight.shape[0] == 2
    assert compact.seeds == [2] and len(compact.gens) == len(compact.metric_gens) == 1
    assert compact.opt_state["buf"].shape == (2, compact.D)
    # the outside view is the same: K rows per event, in the trial's member order
    assert [e["iteration"] for e in events] == [e["iteration"] for e in reference]
    after = [(a, b) for a, b in zip(events, reference) if a["iteration"] > t_stop]
    assert len(after) >= 3
    for a, b in zip(events, reference):
        assert a["status"] == b["status"] and len(a["rows"]) == 4
        for k in range(4):
            ra, rb = a["rows"][k], b["rows"][k]
            assert (ra is None) == (rb is None) and (ra is None or ra.keys() == rb.keys()), (a["iteration"], k)
            if ra is not None:
                for name in ra:        # stochastic entropy, k-NN entropy, test metrics (BN statistics), ...
                    assert ra[name] == pytest.approx(rb[name], rel=1e-9, abs=1e-12), (a["iteration"], k, name)
            assert len(a["running"][k]) == len(b["running"][k])
            for x, y in zip(a["running"][k], b["running"][k]):     # running rows are float32 on the host
                assert x.keys() == y.keys() and all(x[n] == pytest.approx(y[n], rel=1e-6) for n in x)
    assert all(a["rows"][k] is None for a, _ in after for k in (0, 2))
    assert all("entropy_knn_k3" in a["rows"][k] for a, _ in after[-2:] for k in (1, 3))


def _saved(runner, sink) -> dict:
    buf = io.BytesIO()
    torch.save({"runner": runner.state_dict(), "sink": sink.state_dict()}, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def test_checkpoint_after_the_compaction_restores_into_a_full_runner():
    runner, sink = _fresh()
    events = list(runner.run(sink))
    t_stop = _stopped_at(events, 0)
    first, sink1 = _fresh()
    head = []
    for e in first.run(sink1):
        head.append(e)
        if e["iteration"] == t_stop + 40:
            break
    state = _saved(first, sink1)
    assert state["runner"]["active"] == [1, 3]
    second, sink2 = _fresh()
    assert second.active == [0, 1, 2, 3]
    second.load_state_dict(state["runner"])
    sink2.load_state_dict(state["sink"])
    assert second.active == [1, 3] and second.rows.shape[0] == 2 and len(second.gens) == 1
    assert head + list(second.run(sink2)) == events
    torch.testing.assert_close(second.rows, runner.rows, rtol=0, atol=0)


def test_replay_through_the_reservoir_from_an_anchor_before_the_compaction(ray_session, tmp_path):
    """Checkpoint (state + anchor) after the compaction whose anchor predates it; a fresh runner with an
    empty reservoir sink replays from the anchor (compacting where the original run did) and then gives
    the undisturbed run's entropy for the running members at every later log step."""
    from engine.replay import AnchorKeeper, AnchorPlan, rebuild_windows
    from test_faults_entropy import checkpoint_at
    from engine.reservoir import ReservoirSink

    def fresh(key):
        runner = NetworkRunner(_members())
        return runner, ReservoirSink(key, [KNN], 4, runner.D, "cpu", chunk_snapshots=7)

    def entropy(rows):
        return [{k: v for k, v in (r or {}).items() if k.startswith("entropy")} for r in rows]

    runner, sink = fresh("compact/clean")
    clean = {e["iteration"]: entropy(e["rows"]) for e in runner.run(sink)}
    t_stop = runner.compactions[0][0]
    every, cut = 60, 180
    plan = AnchorPlan(runner.members[0], every)
    state, anchor = checkpoint_at(*fresh("compact/first"), plan, cut, tmp_path)
    assert anchor is not None and anchor[0] < t_stop < cut and anchor[1]["active"] == [0, 1, 2, 3]

    runner, sink = fresh("compact/restored")
    rebuild_windows(runner, sink, AnchorKeeper(plan), anchor, until=cut, target=state)
    assert runner.active == [1, 3] and runner.compactions == state["compactions"]
    runner.load_state_dict(state)
    after = {e["iteration"]: entropy(e["rows"]) for e in runner.run(sink)}
    assert sorted(after) == [t for t in sorted(clean) if t > cut]
    assert all(after[t][k] and "entropy_missing" not in after[t][k] for t in after for k in (1, 3))
    assert after == {t: clean[t] for t in after}
