"""Entropy survives every fault (issue 14): worker kill, reservoir kill, driver SIGINT or kill -9 + resume.

The replay mechanism (engine/replay.py) is first checked on the runners directly (no Ray), then the real
faults are injected into one-trial demo sweeps (real local Ray, real MLflow SQLite store, digits) with
the harness of benchmarks/faults.py, and every metric at every log step is compared with an undisturbed
run: train metrics exactly, entropy to 1e-12, no step twice, no ``entropy_missing``.
"""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks.faults import (FAULT_AT, compare, is_entropy, member_histories, run_driver_fault,
                               run_in_process)
from engine import layout
from engine.replay import START, AnchorKeeper, AnchorPlan, read_anchor, rebuild_windows
from trainables.runner import make_runner
from trainables.sinks import LocalSink

ITERATIONS = 400
VMF = {"model": "vmf", "dim": 5, "iterations": 1500, "log_schedule": "every:100", "lr": 0.05,
       "entropy": [{"name": "kl", "window": 40, "stride": 10, "standardize": True},
                   {"name": "knn", "window": 150, "stride": 1, "ks": [1, 3]}]}
NET = {"model": "convnet", "width": 1, "dataset": "digits", "lr": 0.1, "iterations": 200, "batch_size": 32,
       "num_stoch_grads": 2, "log_schedule": "every:20",
       "entropy": [{"name": "knn", "window": 70, "stride": 1, "ks": [1, 5]}]}


def checkpoint_at(runner, sink, plan, cut: int, directory) -> tuple[dict, tuple | None]:
    """Run ``runner`` to log step ``cut`` keeping anchors by ``plan``; write the checkpoint's anchor into
    ``directory`` and return (the runner's state there, the anchor read back)."""
    keeper = AnchorKeeper(plan)
    for e in runner.run(sink):
        keeper.observe(runner, e["iteration"])
        if e["iteration"] == cut:
            break
    state = runner.state_dict()
    keeper.write(str(directory), cut)
    return state, read_anchor(str(directory))


def _fresh(member):
    runner = make_runner([member], "cpu")
    return runner, LocalSink(runner.members[0]["entropy"], len(runner.members), runner.D)


def _entropy(rows):
    return [{k: v for k, v in (r or {}).items() if is_entropy(k)} for r in rows]


@pytest.mark.parametrize("member, every, cut", [(VMF, 400, 800), (NET, 60, 120)], ids=["vmf", "convnet"])
def test_replay_from_the_anchor_rebuilds_the_windows(member, every, cut, tmp_path):
    """Checkpoint (state + anchor) at log step ``cut``; a new runner and an empty sink restored from it
    give the undisturbed run's entropy at every later log step. Without the replay the first
    evaluations after the cut are missing, so the comparison can fail."""
    runner, sink = _fresh(member)
    clean = {e["iteration"]: _entropy(e["rows"]) for e in runner.run(sink)}
    plan = AnchorPlan(runner.members[0], every)

    state, anchor = checkpoint_at(*_fresh(member), plan, cut, tmp_path)
    assert anchor is not None and START < anchor[0] < cut and anchor[1] is not None

    def resumed(replay: bool):
        runner, sink = _fresh(member)
        if replay:
            rebuild_windows(runner, sink, AnchorKeeper(plan), anchor, until=cut)
        runner.load_state_dict(state)
        return {e["iteration"]: _entropy(e["rows"]) for e in runner.run(sink)}

    after = resumed(replay=True)
    assert sorted(after) == [t for t in sorted(clean) if t > cut]
    assert all(r for t in after for r in clean[t]), "every later log step evaluates entropy here"
    assert after == {t: clean[t] for t in after}
    without = resumed(replay=False)
    assert "entropy_missing" in without[min(without)][0]


def test_anchor_plan_keeps_few_states():
    """The anchor of a checkpoint at c is the last log step before the oldest snapshot any later window
    needs; only anchors of checkpoints still to come are kept (here: at most two states at a time)."""
    every_step = AnchorPlan(NET, 0)                 # checkpoint_every 0: a checkpoint at every log step
    assert every_step.anchor[40] == START           # the window of 80 starts at 11, before log step 20
    assert every_step.anchor[100] == 40             # the window of 120 is 51..120
    plan = AnchorPlan(NET, 60)                      # checkpoints at 60, 120, 180 (and the end)
    # log every 20, knn window 70: the window of 140 is 71..140, so a checkpoint at 120 needs the state
    # at 60 (the last log step before 71); the window of 200 (131..200) needs 120 for a checkpoint at 180
    assert plan.anchor == {60: START, 120: 60, 180: 120}

    class Stub:                                     # state_dict is all the keeper needs from a runner
        def state_dict(self):
            return {"x": torch.zeros(3)}

    keeper, most = AnchorKeeper(plan), 0
    for t in range(0, 201, 20):
        keeper.observe(Stub(), t)
        most = max(most, len(keeper.states))
        needed = plan.anchor.get(t)
        if needed not in (None, START):
            assert needed in keeper.states, t
    assert most <= 2 and not keeper.states


# ----------------------------------------------------------------------------- real faults in sweeps

@pytest.fixture(scope="module")
def clean_run(ray_session, tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    uri, storage = f"sqlite:///{work}/mlflow.db", str(work / "rr")
    summary = run_in_process("clean", None, uri, storage, ITERATIONS)
    assert summary["members"]["done"] == 1, summary
    hist, _ = member_histories(uri, "clean")
    assert any(is_entropy(n) for n in hist) and "entropy_missing" not in hist
    # windows reach back across checkpoints: some checkpoint needs a replay from an earlier log step
    return {"work": work, "uri": uri, "storage": storage, "hist": hist}


def _assert_identical(clean_hist: dict, uri: str, experiment: str, storage: str) -> None:
    # the trial's checkpoints carried anchors: its windows reach back across checkpoints
    assert list(Path(storage).glob(f"{experiment}_*/t000/checkpoint_*/anchor.json")), experiment
    hist, tags = member_histories(uri, experiment)
    assert tags[layout.TAG_STATUS] == "done"
    d = compare(clean_hist, hist)
    assert d == {"train": [], "entropy": [], "duplicates": []}, d
    assert sum(len(h) for n, h in hist.items() if n.startswith("entropy_knn")) > 30


@pytest.mark.parametrize("case, fault, failures", [("worker_kill", {"worker": FAULT_AT}, 1),
                                                   ("reservoir_kill", {"reservoir": FAULT_AT}, 0)])
def test_worker_or_reservoir_kill_loses_no_entropy(clean_run, case, fault, failures):
    from ray.tune import ExperimentAnalysis

    summary = run_in_process(case, fault, clean_run["uri"], clean_run["storage"], ITERATIONS)
    assert summary["members"]["done"] == 1, summary
    trials = ExperimentAnalysis(summary["sweep_dir"]).trials
    assert [t.num_failures for t in trials] == [failures]     # the worker kill did happen and was retried
    _assert_identical(clean_run["hist"], clean_run["uri"], case, clean_run["storage"])
    from engine.trainable import sweep_held_prefix
    left = [d for d in os.listdir(tempfile.gettempdir()) if d.startswith(sweep_held_prefix(summary["sweep_id"]))]
    assert left == []                      # nothing the killed attempt held is left in the temp dir


def test_a_trial_attempt_clears_only_its_own_trials_held_checkpoints(tmp_path, monkeypatch):
    """A worker killed while it holds a checkpoint (written, not yet handed to Tune) leaves its directory;
    the trial's next attempt removes those of the same sweep and trial, and nothing else."""
    from engine.trainable import clear_held, held_prefix

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours = [tempfile.mkdtemp(prefix=held_prefix("demo_1/t001")) for _ in range(2)]
    others = [tempfile.mkdtemp(prefix=held_prefix(k)) for k in ("demo_1/t0010", "demo_2/t001", "demo_1/t000")]
    (tmp_path / "unrelated").mkdir()
    Path(ours[0], "runner.pt").write_bytes(b"state")
    assert clear_held("demo_1/t001") == 2
    assert not any(os.path.exists(d) for d in ours)
    assert all(os.path.isdir(d) for d in others) and (tmp_path / "unrelated").is_dir()


def test_the_driver_clears_its_sweeps_held_checkpoints_and_no_other_sweeps(tmp_path, monkeypatch):
    """At the end of a sweep (or its interruption) the driver removes what any trial of that sweep held
    here: trials that finished, or that nobody resumes, never clear their own."""
    from engine.trainable import clear_sweep_held, held_prefix

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours = [tempfile.mkdtemp(prefix=held_prefix(k)) for k in ("demo_1/t001", "demo_1/t000", "demo_1/t0010")]
    others = [tempfile.mkdtemp(prefix=held_prefix(k)) for k in ("demo_10/t001", "demo_2/t000", "xdemo_1/t000")]
    (tmp_path / "demo_1_t000").mkdir()
    assert clear_sweep_held("demo_1") == 3
    assert not any(os.path.exists(d) for d in ours)
    assert all(os.path.isdir(d) for d in others) and (tmp_path / "demo_1_t000").is_dir()


@pytest.mark.parametrize("case, sig", [("driver_sigint", signal.SIGINT), ("driver_kill9", signal.SIGKILL)])
def test_driver_fault_then_resume_loses_no_entropy(clean_run, case, sig):
    import os

    work = clean_run["work"]
    base = os.environ.get("RAY_TMPDIR", "/tmp")
    r = run_driver_fault(case, sig, clean_run["uri"], clean_run["storage"], str(work), ITERATIONS,
                         (f"{base}/{case[7:]}a", f"{base}/{case[7:]}b"))
    assert r["first_rc"] != 0 and r["rc"] == 0, r["out"][-3000:]
    assert r["held_at"] >= FAULT_AT and r["held_at"] < ITERATIONS
    assert r["starts"] == ["fresh", "restored"]            # resumed from its checkpoint, not from 0
    _assert_identical(clean_run["hist"], clean_run["uri"], case, clean_run["storage"])
