"""The sweep engine end to end (engine/sweep.py, trainable.py, tracking.py) with real local Ray and MLflow.

Everything is tiny (ConvNet width 1, a few hundred iterations on digits) so the whole file stays within
a few minutes on 2 CPU cores. One Ray session (tests/conftest.py) is shared by the in-process tests;
the interruption and invalid-grid tests run ``python -m engine.sweep`` in subprocesses.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, metric_history, mlflow_member_runs, repo_env
from engine import layout
from trainables.schedule import log_iterations

DEMO = REPO / "grids" / "demo.yaml"
KNN = "entropy=[{name: knn, window: 20, stride: 1, ks: [1, 5, 19]}]"
TINY = ["width=1", "num_stoch_grads=2", "batch_size=32", KNN]


def _steps(uri, run_id, name):
    return [s for s, _ in metric_history(uri, run_id, name)]


# ----------------------------------------------------------------------------- a recording trainable

def recording_trainable(out_dir: str):
    """Wrap the real ``train_bundle``; each start writes a JSON record (what Ray gave the trial, when).

    The wrapper is a closure, so Ray ships it by value; ``original`` is the unpatched function.
    """
    from engine.trainable import train_bundle as original

    def train_bundle(config):
        import json as _json
        import os as _os
        import time as _time

        import ray as _ray
        import torch as _torch
        from ray import tune as _tune

        from engine.trainable import trial_device

        trial = config["trial"]
        rec = {"trial_id": trial["trial_id"], "pid": _os.getpid(), "start": _time.time(),
               "gpu_ids": [str(g) for g in _ray.get_gpu_ids()],
               "assigned": _ray.get_runtime_context().get_assigned_resources(),
               "device": str(trial_device([dict(c) for _, c in trial["members"]])),
               "cuda": _torch.cuda.is_available(), "restored": _tune.get_checkpoint() is not None}
        path = _os.path.join(out_dir, f"{trial['trial_id']}-{rec['pid']}-{rec['start']:.6f}.json")
        with open(path, "w") as f:
            _json.dump(rec, f)
        original(config)
        rec["end"] = _time.time()
        with open(path, "w") as f:
            _json.dump(rec, f)

    return train_bundle


def _records(out_dir):
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))]


# ----------------------------------------------------------------------------- 1. demo end to end

def test_demo_grid_end_to_end(ray_session, tmp_path, monkeypatch):
    from engine.sweep import main

    monkeypatch.chdir(tmp_path)
    iterations, schedule = 200, "log:10"
    rc = main([str(DEMO), "--storage-path", str(tmp_path / "ray_results"), "--verbose", "0",
               "--set", f"iterations={iterations}", "--set", f"log_schedule={schedule}",
               "--set", "lr=[0.01, 0.1]", *(a for s in TINY for a in ("--set", s))])
    assert rc == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"          # the default store in the working directory
    assert (tmp_path / "mlflow.db").exists()
    parent, children = mlflow_member_runs(uri, "demo")

    from mlflow.tracking import MlflowClient
    c = MlflowClient(tracking_uri=uri)
    assert parent.data.tags[layout.TAG_ROLE] == layout.ROLE_SWEEP
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert parent.data.tags["mlflow.source.git.commit"] == head
    dirty = subprocess.run(["git", "diff", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout != ""
    assert sorted(a.path for a in c.list_artifacts(parent.info.run_id)) == ["git.diff"] * dirty + ["grid.yaml"]
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"
    assert c.get_run(parent.info.run_id).data.tags[layout.TAG_SWEEP_STATUS] == "finished"

    expected_steps = log_iterations(schedule, iterations)
    entropy_steps = [t for t in expected_steps if t >= 19]          # window 20, stride 1
    assert sorted(children) == ["m0000", "m0001"]
    lrs = {}
    for mid, run in children.items():
        run = c.get_run(run.info.run_id)
        p = run.data.params
        assert (p["width"], p["protocol"], p["model"], p["dataset"]) == ("1", "fixed_sphere", "convnet", "digits")
        assert p["iterations"] == str(iterations) and json.loads(p["entropy"])[0]["window"] == 20
        lrs[mid] = float(p["lr"])
        assert run.data.tags[layout.TAG_ROLE] == layout.ROLE_MEMBER
        assert run.data.tags[layout.TAG_STATUS] == "done"
        assert run.info.status == "FINISHED"
        for name in ("train_loss", "snr", "radius"):
            assert _steps(uri, run.info.run_id, name) == expected_steps, name
        for k in (1, 5, 19):
            assert _steps(uri, run.info.run_id, f"entropy_knn_k{k}") == entropy_steps
        # fixed sphere of radius 1: every logged radius is 1 (docs/theory.md: the sphere protocol)
        assert all(abs(v - 1.0) < 1e-5 for _, v in metric_history(uri, run.info.run_id, "radius"))
    assert sorted(lrs.values()) == [0.01, 0.1]


# ----------------------------------------------------------------------------- 2. fractional packing

def test_fractional_gpus_pack_four_trials(ray_session, tmp_path, monkeypatch, tracking_uri):
    import engine.trainable
    from engine.grid import load_grid
    from engine.sweep import run_sweep

    assert ray_session.cluster_resources().get("GPU") == 2
    rec_dir = tmp_path / "records"
    rec_dir.mkdir()
    monkeypatch.setattr(engine.trainable, "train_bundle", recording_trainable(str(rec_dir)))
    grid = load_grid(DEMO, overrides=[
        "experiment=packing", "iterations=120", "log_schedule=every:60", "lr=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5]",
        "width=1", "num_stoch_grads=2", "entropy=[]", "resources.gpu=0.5", "resources.cpu=0",
        "max_concurrent=null"])
    assert len(grid.trials()) == 6
    summary = run_sweep(grid, tracking_uri=tracking_uri, storage_path=str(tmp_path / "rr"), verbose=0)
    assert summary["members"]["done"] == 6

    recs = _records(rec_dir)
    assert sorted(r["trial_id"] for r in recs) == [f"t{i:03d}" for i in range(6)]
    for r in recs:
        assert len(r["gpu_ids"]) == 1 and r["gpu_ids"][0] in ("0", "1"), r       # half of one GPU
        assert r["assigned"].get("GPU") == pytest.approx(0.5), r
        assert r["device"] == "cpu" and r["cuda"] is False, r                    # no CUDA here
    # concurrency from the trials' own wall-clock intervals
    peak = _peak(recs)
    assert 1 < peak <= 4, f"peak concurrency {peak}"
    # at any moment each (logical) GPU carries at most two half-GPU trials
    for gpu in ("0", "1"):
        assert _peak([r for r in recs if r["gpu_ids"] == [gpu]]) <= 2, gpu


def _peak(recs) -> int:
    events = sorted([(r["start"], 1) for r in recs] + [(r["end"], -1) for r in recs])
    running, peak = 0, 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    return peak


# ----------------------------------------------------------------------------- 4. kill and resume

def test_killed_trial_resumes_and_matches(ray_session, tmp_path, tracking_uri):
    from engine.grid import load_grid
    from engine.sweep import run_sweep

    iterations, kill_at = 300, 130
    common = [f"iterations={iterations}", "log_schedule=every:20", "lr=0.1", "checkpoint_every=50",
              "max_failures=2", *TINY]
    runs = {}
    for name, fault in (("clean", None), ("faulty", kill_at)):
        grid = load_grid(DEMO, overrides=[f"experiment={name}", *common])
        assert len(grid.trials()) == 1
        summary = run_sweep(grid, tracking_uri=tracking_uri, storage_path=str(tmp_path / "rr"), verbose=0,
                            _fault_kill_at=fault)
        assert summary["members"]["done"] == 1, summary
        runs[name] = summary

    from ray.tune import ExperimentAnalysis
    for name, failures in (("clean", 0), ("faulty", 1)):
        trials = ExperimentAnalysis(runs[name]["sweep_dir"]).trials
        assert [t.num_failures for t in trials] == [failures], name
        assert trials[0].status == "TERMINATED"

    ids = {name: next(iter(mlflow_member_runs(tracking_uri, name)[1].values())).info.run_id for name in runs}
    steps = log_iterations("every:20", iterations)
    for name in ("train_loss", "radius", "snr", "test_loss", "full_grad_norm"):
        clean = metric_history(tracking_uri, ids["clean"], name)
        faulty = metric_history(tracking_uri, ids["faulty"], name)
        assert [s for s, _ in faulty] == steps, f"{name}: duplicate or missing steps {[s for s, _ in faulty]}"
        assert faulty == clean, name
    for k in (1, 5, 19):
        clean = metric_history(tracking_uri, ids["clean"], f"entropy_knn_k{k}")
        faulty = metric_history(tracking_uri, ids["faulty"], f"entropy_knn_k{k}")
        assert faulty[-1] == clean[-1] and faulty[-1][0] == iterations
        assert len({s for s, _ in faulty}) == len(faulty)


def test_resume_closes_members_tune_finished_but_mlflow_left_running(ray_session, tmp_path, tracking_uri):
    """The fault: the driver dies after Tune saved a trial as TERMINATED but before our callback closed
    its members (it cannot be timed from outside, so the test puts the store in that state by hand).
    ``--resume`` has nothing to rerun and must still close the members and the sweep."""
    from mlflow.tracking import MlflowClient

    from engine.grid import load_grid
    from engine.sweep import run_sweep

    # checkpoints force reports: several results per trial, as in any real sweep, so that Tune's
    # saved state holds the last *reported* result of a finished trial (done = False)
    grid = load_grid(DEMO, overrides=["experiment=reconcile", "iterations=60", "log_schedule=every:10",
                                      "checkpoint_every=20", "lr=[0.05, 0.1]", *TINY])
    storage = str(tmp_path / "rr")
    first = run_sweep(grid, tracking_uri=tracking_uri, storage_path=storage, verbose=0)
    assert first["members"]["done"] == 2, first
    from ray.tune import ExperimentAnalysis
    saved = ExperimentAnalysis(first["sweep_dir"]).trials
    assert all(t.status == "TERMINATED" and t.last_result["training_iteration"] >= 3 for t in saved)
    c = MlflowClient(tracking_uri=tracking_uri)
    parent, children = mlflow_member_runs(tracking_uri, "reconcile")
    victim = children["m0001"].info.run_id
    before = {m: metric_history(tracking_uri, r.info.run_id, "train_loss") for m, r in children.items()}
    c.set_tag(victim, layout.TAG_STATUS, "running")
    c.update_run(victim, status="RUNNING")
    c.set_tag(parent.info.run_id, layout.TAG_SWEEP_STATUS, "interrupted")

    again = run_sweep(grid, tracking_uri=tracking_uri, storage_path=storage, resume="latest", verbose=0)
    assert again["sweep_id"] == first["sweep_id"]
    run = c.get_run(victim)
    assert run.data.tags[layout.TAG_STATUS] == "done"
    assert run.info.status == "FINISHED"
    assert run.data.tags[layout.TAG_REGIME] in ("stationary", "converged")
    assert c.get_run(parent.info.run_id).data.tags[layout.TAG_SWEEP_STATUS] == "finished"
    after = {m: metric_history(tracking_uri, r.info.run_id, "train_loss") for m, r in children.items()}
    assert after == before          # nothing re-ran and nothing was logged twice


# ----------------------------------------------------------------------------- 5. interrupt and --resume

RECORDING_MAIN = """
import sys
sys.path.insert(0, {tests!r})
import engine.trainable
from test_engine import recording_trainable
engine.trainable.train_bundle = recording_trainable({rec!r})
from engine.sweep import main
sys.exit(main(sys.argv[1:]))
"""


INTERRUPT_LRS = [0.01, 0.02, 0.03, 0.1, 0.2, 0.3]   # enough trials that Ctrl-C lands mid-sweep
INTERRUPT_ITERS = 1200   # long enough that Ctrl-C lands inside a trial, not as the sweep ends


def test_interrupted_sweep_resumes_only_what_was_left(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    rec = tmp_path / "records"
    rec.mkdir()
    script = tmp_path / "sweep_main.py"
    script.write_text(RECORDING_MAIN.format(tests=str(REPO / "tests"), rec=str(rec)))
    uri = tracking_uri
    args = [sys.executable, str(script), str(DEMO), "--num-cpus", "2", "--num-gpus", "0", "--max-concurrent", "1",
            "--tracking-uri", uri, "--storage-path", str(tmp_path / "rr"), "--verbose", "0",
            "--set", "experiment=resume", "--set", f"iterations={INTERRUPT_ITERS}", "--set", "log_schedule=every:50",
            "--set", f"lr={INTERRUPT_LRS}", "--set", "checkpoint_every=100",
            *(a for s in TINY for a in ("--set", s))]
    proc = subprocess.Popen(args, cwd=tmp_path, env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 240
    done_before: dict[str, int] = {}
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                _, children = mlflow_member_runs(uri, "resume")
                done_before = {m: r.info.start_time for m, r in children.items()
                               if r.data.tags.get(layout.TAG_STATUS) == "done"}
            except Exception:        # store or runs not created yet
                done_before = {}
            if done_before:
                break
            time.sleep(0.2)          # polling interval, not synchronisation
        assert done_before, "no member finished before the deadline"
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, children = mlflow_member_runs(uri, "resume")
    done_before = {m: r.info.start_time for m, r in children.items()
                   if r.data.tags.get(layout.TAG_STATUS) == "done"}
    assert len(done_before) < len(INTERRUPT_LRS), "the interrupt came too late: the sweep had finished\n" + out[-3000:]
    assert proc.returncode != 0, "an interrupted sweep must not report success:\n" + out[-4000:]
    first_starts = _records(rec)
    # trials that had written a Tune checkpoint when the sweep was interrupted
    checkpointed_before = {p.parent.name for p in (tmp_path / "rr").glob("*/t*/checkpoint_*")}

    proc2 = subprocess.run(args + ["--resume"], cwd=tmp_path, env=repo_env(), capture_output=True, text=True,
                           timeout=300)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    parent, children = mlflow_member_runs(uri, "resume")
    c = MlflowClient(tracking_uri=uri)
    assert sorted(children) == [f"m{i:04d}" for i in range(len(INTERRUPT_LRS))]
    steps = log_iterations("every:50", INTERRUPT_ITERS)
    for mid, run in children.items():
        run = c.get_run(run.info.run_id)
        assert run.data.tags[layout.TAG_STATUS] == "done", mid
        assert _steps(uri, run.info.run_id, "train_loss") == steps, mid
    assert c.get_run(parent.info.run_id).data.tags[layout.TAG_SWEEP_STATUS] == "finished"

    # members finished before the interruption were not started again
    trial_of = {f"m{i:04d}": f"t{i:03d}" for i in range(len(INTERRUPT_LRS))}
    all_starts = _records(rec)
    later = [r for r in all_starts if r not in first_starts]
    for mid, start in done_before.items():
        assert children[mid].info.start_time == start
        assert [r["trial_id"] for r in later].count(trial_of[mid]) == 0, (mid, later)
    assert {r["trial_id"] for r in later} == {trial_of[m] for m in children if m not in done_before}
    # the one that was running when interrupted continued from its checkpoint if it had one
    for r in later:
        if r["trial_id"] in checkpointed_before:
            assert r["restored"], r


# ----------------------------------------------------------------------------- 6, 7. checks before start

CHECK_SCRIPT = """
import contextlib, io, json, os, sys
sys.argv = ["x"]
from engine.sweep import main
out = []
for argv in json.loads(sys.stdin.read()):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc = main(argv)
        except SystemExit as x:
            rc = x.code
    import ray
    out.append({"rc": rc, "stdout": o.getvalue(), "stderr": e.getvalue(), "ray": ray.is_initialized(),
                "files": sorted(os.listdir("."))})
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def preflight(tmp_path_factory):
    """Run every pre-start case in one fresh Python (no Ray yet); the resource case goes last."""
    d = tmp_path_factory.mktemp("preflight")
    (d / "typo.yaml").write_text(DEMO.read_text().replace("  batch_size: 64", "  batch_sise: 64"))
    g = str(DEMO)
    cases = {
        "dry_run": [g, "--dry-run"],
        "unknown_key": [str(d / "typo.yaml")],
        "negative_lr": [g, "--set", "lr=[0.1, -0.01]"],
        "unknown_model": [g, "--set", "model=vgg16"],
        "gpu_fraction": [g, "--set", "resources.gpu=0.3"],
        "too_many_gpus": [g, "--num-gpus", "0", "--num-cpus", "1", "--set", "resources.gpu=1",
                          "--set", "iterations=10"],
    }
    p = subprocess.run([sys.executable, "-c", CHECK_SCRIPT], input=json.dumps(list(cases.values())), cwd=d,
                       env=repo_env(), capture_output=True, text=True, timeout=180)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    return dict(zip(cases, json.loads(line[0][len("RESULT"):])))


@pytest.mark.parametrize("case,where", [
    ("unknown_key", "fixed.batch_sise"), ("negative_lr", "axes.lr[1]"), ("unknown_model", "fixed.model"),
    ("gpu_fraction", "resources.gpu"), ("too_many_gpus", "resources.gpu")])
def test_invalid_grid_fails_before_anything_starts(preflight, case, where):
    r = preflight[case]
    assert r["rc"] == 2, r
    assert where in r["stderr"], r["stderr"]
    assert "mlflow.db" not in r["files"] and "ray_results" not in r["files"] and "mlruns" not in r["files"], r
    # engine/sweep.py: on any grid problem, resources included, no Ray is started
    assert r["ray"] is False, f"{case}: Ray was started for a grid that cannot run"


def test_dry_run_prints_table_and_plan_and_starts_nothing(preflight):
    r = preflight["dry_run"]
    assert r["rc"] == 0 and r["ray"] is False
    assert r["files"] == ["typo.yaml"], r["files"]
    out = r["stdout"]
    # expected table from the YAML itself (read with PyYAML, not the loader): width × logspace(lr)
    import yaml
    raw = yaml.safe_load(DEMO.read_text())
    widths = [str(w) for w in raw["axes"]["width"]]
    lo, hi, num = raw["axes"]["lr"]["logspace"]
    lrs = [10 ** (lo + (hi - lo) * k / (num - 1)) for k in range(num)]
    n = len(widths) * num
    assert f"{n} member(s) in {n} trial(s)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("t0")]
    assert len(rows) == n
    assert [r_[2] for r_ in rows] == [w for w in widths for _ in range(num)]     # the last axis varies fastest
    assert [float(r_[3]) for r_ in rows] == pytest.approx(lrs * len(widths), rel=1e-3)
    assert "each reserves cpu 1, gpu 0" in out and "max_concurrent 2" in out


# ----------------------------------------------------------------------------- end-of-sweep counts

def test_summary_counts_members_of_trials_tune_never_created():
    """Tune creates grid trials lazily: a sweep interrupted just after its first trial finished returns
    one result although the grid has more members. They must count as unfinished (exit code 1)."""
    from types import SimpleNamespace

    from engine.sweep import summarise

    def result(ids, status, error=None, metrics=True):
        return SimpleNamespace(metrics={"member_ids": ids, "status": status} if metrics else {},
                               config={"trial": {"members": [[m, {}] for m in ids]}}, error=error)

    grid_members = ["m0000", "m0001", "m0002", "m0003", "m0004", "m0005"]
    only_first = summarise([result(["m0000"], ["done"])], "uri", "s", "d", "e", grid_members)
    assert only_first["members"] == {"done": 1, "diverged": 0, "converged": 0, "stopped": 0, "failed": 0, "unfinished": 5}
    mixed = summarise([result(["m0000", "m0001"], ["done", "diverged"]),
                       result(["m0002"], ["running"]),                       # interrupted mid-run
                       result(["m0003"], None, metrics=False),                # started, nothing reported
                       result(["m0004"], ["running"], error=RuntimeError("boom"))],
                      "uri", "s", "d", "e", grid_members)
    assert mixed["members"] == {"done": 1, "diverged": 1, "converged": 0, "stopped": 0, "failed": 1, "unfinished": 3}
