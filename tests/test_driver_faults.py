"""Faults of the sweep driver (engine/sweep.py, engine/tracking.py), each caused for real and on purpose.

- a real ``mlflow server`` on 127.0.0.1 stopped mid-sweep and restarted on the same port: the outage is
  placed by a driver callback (stop after the first logged result, restart after N more), not by timing;
- a store that stays down: the buffer goes to a file and ``python -m engine.tracking replay`` writes it;
- a stale ``ray_current_cluster`` file pointing at a dead address;
- the driver killed with SIGKILL exactly between the tracker closing a trial's members and Tune
  recording the trial as finished: ``--resume`` must not start that trial again.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray.tune import Callback

from benchmarks.faults import MlflowServer, free_port
from conftest import REPO, metric_history, mlflow_member_runs, repo_env
from engine import layout
from engine.trainable import held_prefix, sweep_held_prefix

DEMO = REPO / "grids" / "demo.yaml"
KNN = "entropy=[{name: knn, window: 20, stride: 1, ks: [1, 5, 19]}]"
TINY = ["width=1", "num_stoch_grads=2", "batch_size=32", KNN]


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    srv = MlflowServer(root, free_port(), env=repo_env())
    srv.start()
    yield srv
    srv.stop()


class Outage(Callback):
    """Driver-side fault: after the tracker has handled result ``stop_after`` the server is stopped; after
    result ``stop_after + length`` it is started again (the tracker meanwhile buffers)."""

    def __init__(self, server: MlflowServer, stop_after: int, length: int):
        self.server, self.stop_after, self.length = server, stop_after, length
        self.seen = 0
        self.down_during: list[int] = []

    def __getstate__(self):              # Tune pickles its callbacks with the sweep state
        return {k: v for k, v in self.__dict__.items() if k != "server"}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen += 1
        if self.seen == self.stop_after:
            self.server.stop()
            assert self.server.down()
        elif self.stop_after < self.seen <= self.stop_after + self.length:
            self.down_during.append(self.seen)
            if self.seen == self.stop_after + self.length:
                self.server.start()


def _series(uri, run_id):
    from mlflow.tracking import MlflowClient
    keys = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    return {k: metric_history(uri, run_id, k) for k in keys}


def test_tracking_outage_only_delays(ray_session, tmp_path, tracking_uri, server, capsys):
    from mlflow.tracking import MlflowClient

    from engine.grid import load_grid
    from engine.sweep import run_sweep

    common = ["iterations=120", "log_schedule=every:10", "checkpoint_every=20", "lr=[0.05, 0.1]",
              "max_concurrent=1", *TINY]
    ref = load_grid(DEMO, overrides=["experiment=outage", *common])
    summary = run_sweep(ref, tracking_uri=tracking_uri, storage_path=str(tmp_path / "rr"), verbose=0)
    assert summary["members"]["done"] == 2, summary
    capsys.readouterr()

    outage = Outage(server, stop_after=1, length=4)
    summary = run_sweep(ref, tracking_uri=server.uri, storage_path=str(tmp_path / "rr2"), verbose=0,
                        _callbacks=[outage])
    err = capsys.readouterr().err
    assert outage.down_during == [2, 3, 4, 5], outage.down_during        # the outage really spanned results
    assert summary["members"]["done"] == 2, summary
    assert err.count("does not answer") == 1, err                        # said once
    assert "keeps running" in err and "answers again" in err, err

    _, want = mlflow_member_runs(tracking_uri, "outage")
    parent, got = mlflow_member_runs(server.uri, "outage")
    assert sorted(got) == sorted(want) == ["m0000", "m0001"]
    c = MlflowClient(tracking_uri=server.uri)
    for mid in want:
        expected, actual = _series(tracking_uri, want[mid].info.run_id), _series(server.uri, got[mid].info.run_id)
        assert sorted(actual) == sorted(expected) and "train_loss" in actual
        for name in expected:
            steps = [s for s, _ in actual[name]]
            assert steps == sorted(set(steps)), f"{mid} {name}: duplicate steps"
            assert actual[name] == expected[name], f"{mid} {name}"
        run = c.get_run(got[mid].info.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[layout.TAG_STATUS] == "done"
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"
    assert c.get_run(parent.info.run_id).data.tags[layout.TAG_SWEEP_STATUS] == "finished"


def _result(member_ids, steps, status):
    """A trial result as engine.trainable reports it, with values fixed by the test."""
    events = [{"iteration": t, "rows": [{"iteration": t, "train_loss": 1.0 / t + i} for i in range(len(member_ids))],
               "running": [[] for _ in member_ids]} for t in steps]
    return {"member_ids": member_ids, "events": events, "status": status, "D": 7}


def test_store_that_stays_down_spills_to_a_file_that_replay_writes(tmp_path, server, monkeypatch, capsys):
    import engine.outbox as outbox
    import engine.tracking as tracking
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(outbox, "BUFFER_OPS", 3)
    members = [("m0000", {"lr": 0.1}), ("m0001", {"lr": 0.2})]
    tr = tracking.MLflowTracker(server.uri, "spill", "grid: text", "g.yaml", members, "spill_1",
                                spill_dir=str(tmp_path / "state"))
    tr.open()
    ids = ["m0000", "m0001"]
    tr.log_result(_result(ids, [10, 20], ["running", "running"]))
    server.stop()
    tr.log_result(_result(ids, [30, 40], ["running", "running"]))
    err = capsys.readouterr().err
    assert err.count("does not answer") == 1 and not (tmp_path / "state").exists(), err
    tr.log_result(_result(ids, [50, 60], ["done", "running"]))        # the buffer overflows: to the file
    tr.log_result(_result(ids, [70], ["done", "done"]))
    tr.close()
    tr.drain(0.0)
    err = capsys.readouterr().err
    spill = tmp_path / "state" / "mlflow-buffer-spill_1.jsonl"
    assert spill.is_file() and str(spill) in err
    command = f"python -m engine.tracking replay {spill} --tracking-uri {server.uri}"
    assert command in err, err

    server.start()
    p = subprocess.run([sys.executable, *command.split()[1:]], cwd=REPO,
                       env=repo_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not spill.exists()
    parent, runs = mlflow_member_runs(server.uri, "spill")
    c = MlflowClient(tracking_uri=server.uri)
    for i, mid in enumerate(ids):
        assert metric_history(server.uri, runs[mid].info.run_id, "train_loss") == \
            [(t, 1.0 / t + i) for t in range(10, 71, 10)]
        run = c.get_run(runs[mid].info.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[layout.TAG_STATUS] == "done"
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"


# ----------------------------------------------------------------------------- a stale local Ray

@pytest.fixture
def ray_tmpdir():
    """A private RAY_TMPDIR (short: Ray's socket paths must stay short); its Ray is ours alone."""
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield Path(d)
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def test_stale_ray_address_file_does_not_hang_the_main_command(tmp_path, ray_tmpdir):
    """A crashed `ray start` leaves ray_current_cluster behind; Ray 2.60's ray.init() without an address
    reads $RAY_TMPDIR/ray/ray_current_cluster and waits for that GCS forever. The sweep must start its own."""
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = dict(repo_env(), RAY_TMPDIR=str(ray_tmpdir))
    args = [sys.executable, "-m", "engine.sweep", str(DEMO), "--num-cpus", "1", "--num-gpus", "0", "--verbose", "0",
            "--storage-path", str(tmp_path / "rr"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
            "--set", "experiment=stale", "--set", "iterations=20", "--set", "log_schedule=every:10",
            "--set", "lr=0.1", "--set", "entropy=[]", "--set", "width=1", "--set", "num_stoch_grads=2"]
    try:
        p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the sweep hung on the stale cluster address:\n{e.stderr}") from None
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "1 done" in p.stdout


def test_ray_temp_dir_too_long_for_its_sockets_is_refused_before_anything_starts(tmp_path):
    """Ray's sockets live under $RAY_TMPDIR; a path over 107 bytes makes ray.init fail (OSError from Ray's
    socket check) after the grid was accepted. The sweep says so first, in --dry-run too, and starts nothing."""
    long_dir = Path("/tmp") / ("r" * 60)          # /tmp/rrr… : 65 characters, the limit is 39
    env = dict(repo_env(), RAY_TMPDIR=str(long_dir))
    db = tmp_path / "m.db"
    base = [sys.executable, "-m", "engine.sweep", str(DEMO), "--storage-path", str(tmp_path / "rr"),
            "--tracking-uri", f"sqlite:///{db}", "--set", "iterations=20"]
    for extra in (["--dry-run"], []):
        p = subprocess.run(base + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stdout[-1000:] + p.stderr[-2000:]
        assert "RAY_TMPDIR" in p.stderr and "107 bytes" in p.stderr, p.stderr[-2000:]
    assert not long_dir.exists() and not db.exists() and not (tmp_path / "rr").exists()


FLAKY_START = """
import sys
import ray
import engine.local_ray as local_ray
from engine.sweep import main

real_init, calls = ray.init, []

def init(*a, fail=int(sys.argv[1]), **k):      # Ray's own message when its raylet misses the 30 s start-up window
    calls.append(1)
    if len(calls) <= fail:
        raise Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.")
    return real_init(*a, **k)

ray.init = init
code = main(sys.argv[2:])
print(f"EXIT {code} STARTS {len(calls)}")
"""


@pytest.mark.parametrize("failures", [1, 3])
def test_local_ray_that_fails_to_start_is_tried_again_then_explained(tmp_path, ray_tmpdir, failures):
    """Fault mocked (Ray's 30 s start-up timeout cannot be caused on purpose): the first failed start of
    the local Ray is tried again and the sweep runs; three failures end in one clear message, exit 1,
    with nothing written to MLflow (before: Ray's traceback)."""
    script = tmp_path / "flaky_start.py"
    script.write_text(FLAKY_START)
    db = tmp_path / "m.db"
    args = [sys.executable, str(script), str(failures), str(DEMO), "--num-cpus", "1", "--num-gpus", "0",
            "--verbose", "0", "--storage-path", str(tmp_path / "rr"), "--tracking-uri", f"sqlite:///{db}",
            "--set", "experiment=flaky", "--set", "iterations=20", "--set", "log_schedule=every:10",
            "--set", "lr=0.1", "--set", "entropy=[]", "--set", "width=1", "--set", "num_stoch_grads=2"]
    env = dict(repo_env(), RAY_TMPDIR=str(ray_tmpdir))
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if failures == 1:
        assert "EXIT 0 STARTS 2" in p.stdout and "1 done" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
        assert "trying again (2/3)" in p.stderr
    else:
        assert "EXIT 1 STARTS 3" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
        assert "error: the local Ray did not start (3 attempts" in p.stderr and "timed out during startup" in p.stderr
        assert not db.exists()


# ----------------------------------------------------------------------------- kill -9 at the resume seam

class KillAtSeam(Callback):
    """Driver fault: SIGKILL the driver right after the tracker has closed ``trial_id``'s members (its
    final result) and before Tune has recorded the trial as finished. Once only (``marker``)."""

    def __init__(self, trial_id: str, marker: str):
        self.trial_id, self.marker = trial_id, marker

    def on_trial_result(self, iteration, trials, trial, result, **info):
        statuses = result.get("status") or []
        if (trial.config["trial"]["trial_id"] == self.trial_id and statuses
                and all(s != "running" for s in statuses) and not os.path.exists(self.marker)):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


SEAM_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import engine.trainable
from test_engine import recording_trainable
engine.trainable.train_bundle = recording_trainable({rec!r})
from test_driver_faults import KillAtSeam
from engine.grid import load_grid
from engine.sweep import run_sweep
grid = load_grid({grid!r}, overrides={overrides!r})
s = run_sweep(grid, tracking_uri={uri!r}, storage_path={storage!r}, resume=(sys.argv[1] if len(sys.argv) > 1 else None),
              max_concurrent=1, num_cpus=1, num_gpus=0, verbose=0, _callbacks=[KillAtSeam("t001", {marker!r})])
print("SUMMARY" + json.dumps(s))
"""


def _session_processes(ray_root: Path) -> dict[str, list[int]]:
    from engine.local_ray import processes_of
    return {d.name: processes_of(str(d)) for d in ray_root.glob("session_2*")}


def test_driver_killed_between_tracker_and_tune_resumes_without_rerunning(tmp_path, tracking_uri, ray_tmpdir):
    from engine.local_ray import DRIVER_MARK
    from mlflow.tracking import MlflowClient
    from test_engine import _records
    from trainables.schedule import log_iterations

    rec = tmp_path / "records"
    rec.mkdir()
    marker = tmp_path / "killed"
    overrides = ["experiment=seam", "iterations=60", "log_schedule=every:10", "checkpoint_every=20",
                 "lr=[0.05, 0.1, 0.2]", *TINY]
    script = tmp_path / "seam.py"
    script.write_text(SEAM_SCRIPT.format(tests=str(REPO / "tests"), rec=str(rec), grid=str(DEMO), overrides=overrides,
                                         uri=tracking_uri, storage=str(tmp_path / "rr"), marker=str(marker)))
    env = dict(repo_env(), RAY_TMPDIR=str(ray_tmpdir))
    first = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=400)
    assert first.returncode == -signal.SIGKILL and marker.exists(), first.stdout[-2000:] + first.stderr[-3000:]
    killed_session = [d.parent for d in (ray_tmpdir / "ray").glob(f"session_2*/{DRIVER_MARK}")]
    assert len(killed_session) == 1

    # the seam: MLflow has closed t001's member, Tune's saved state has not finished the trial
    parent, children = mlflow_member_runs(tracking_uri, "seam")
    assert children["m0001"].data.tags[layout.TAG_STATUS] == "done"
    # what a killed attempt of the finished t001 held (whether or not the kill left one): no attempt of
    # t001 comes again to clear it, so the resumed driver must
    sweep_id = parent.data.tags[layout.TAG_SWEEP_ID]
    planted = tempfile.mkdtemp(prefix=held_prefix(f"{sweep_id}/t001"))
    started_before = [r["trial_id"] for r in _records(rec)]
    assert started_before == ["t000", "t001"], started_before
    series_before = metric_history(tracking_uri, children["m0001"].info.run_id, "train_loss")

    again = subprocess.run([sys.executable, str(script), "latest"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    summary = json.loads(again.stdout.split("SUMMARY")[-1])
    assert summary["members"] == {"done": 3, "diverged": 0, "converged": 0, "stopped": 0, "failed": 0, "unfinished": 0}
    later = [r["trial_id"] for r in _records(rec)][len(started_before):]
    assert sorted(r["trial_id"] for r in _records(rec)) == ["t000", "t001", "t002"], later   # t001 not again
    assert re.search(r"not run again \([^)]*t001", again.stderr), again.stderr[-3000:]

    # nothing of the killed driver's Ray is left, and the sweep is closed in MLflow
    assert _session_processes(ray_tmpdir / "ray")[killed_session[0].name] == []
    parent, children = mlflow_member_runs(tracking_uri, "seam")
    c = MlflowClient(tracking_uri=tracking_uri)
    steps = log_iterations("every:10", 60)
    for mid, run in children.items():
        run = c.get_run(run.info.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[layout.TAG_STATUS] == "done", mid
        assert [s for s, _ in metric_history(tracking_uri, run.info.run_id, "train_loss")] == steps, mid
    assert metric_history(tracking_uri, children["m0001"].info.run_id, "train_loss") == series_before
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"
    assert c.get_run(parent.info.run_id).data.tags[layout.TAG_SWEEP_STATUS] == "finished"
    assert not os.path.exists(planted)
    assert [d for d in os.listdir(tempfile.gettempdir()) if d.startswith(sweep_held_prefix(sweep_id))] == []


def test_next_start_stops_what_a_killed_driver_left(ray_tmpdir, monkeypatch):
    """Where SIGKILL of the driver leaves processes of its local Ray behind (the issue saw Ray's agents),
    the next start stops them: only sessions marked by a driver of ours whose process is gone."""
    from engine.local_ray import DRIVER_MARK, processes_of, reap_killed_drivers

    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sessions = {}
    for name, owner in (("session_2026-01-01_00-00-00_1_1", int(dead.stdout)), ("session_2026-01-01_00-00-00_2_2",
                                                                                  os.getpid())):
        d = ray_tmpdir / "ray" / name
        (d / "logs").mkdir(parents=True)
        (d / DRIVER_MARK).write_text(json.dumps({"pid": owner}))
        # a stand-in for a Ray agent: a real process naming its session directory, as Ray's do
        sessions[name] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                           f"--log-dir={d}/logs"])
    orphan, alive = sessions.values()
    try:
        # a just-started child shows its parent's command line until it execs: wait until both stand-ins
        # name their session (what a running Ray agent always does), or the reaper cannot see them
        deadline = time.monotonic() + 60
        for name, proc in sessions.items():
            while proc.pid not in processes_of(str(ray_tmpdir / "ray" / name)):
                assert time.monotonic() < deadline, f"stand-in {proc.pid} never showed its command line"
                assert proc.poll() is None
        reaped = reap_killed_drivers()
        assert reaped == [orphan.pid]
        assert orphan.wait(30) == -signal.SIGKILL
        assert alive.poll() is None                         # its driver (this process) still runs
        assert not (ray_tmpdir / "ray" / "session_2026-01-01_00-00-00_1_1" / DRIVER_MARK).exists()
    finally:
        for p in sessions.values():
            if p.poll() is None:
                p.kill()
                p.wait()


# ----------------------------------------------------------------------------- MLflow as its users know it

def test_mlflow_layout_uses_mlflow_conventions(tmp_path, tracking_uri, monkeypatch):
    """Experiment kind for MLflow 3's UI (the value its UI names CUSTOM_MODEL_DEVELOPMENT), members
    SCHEDULED until their trial starts, the description as the run note, mlflow.source.* tags, and the
    submitting machine's git state reaching a driver that runs without .git."""
    from mlflow.tracking import MlflowClient

    from engine.source import SOURCE_FILE, source_info, source_tags
    from engine.tracking import MLflowTracker

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    submit = tmp_path / "upload"                # what `ray job submit --working-dir .` ships: no .git
    submit.mkdir()
    p = subprocess.run([sys.executable, "-m", "engine.tracking", "record-source", "--repo", str(REPO)], cwd=submit,
                       env=repo_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    monkeypatch.chdir(submit)
    info = source_info(submit)
    assert info["commit"] == head and (submit / SOURCE_FILE).is_file()

    info = dict(info, diff="diff --git a/x b/x\n+dirty\n")
    members = [("m0000", {"lr": 0.1}), ("m0001", {"lr": 0.2})]
    tr = MLflowTracker(tracking_uri, "layout", "grid: text", "g.yaml", members, "layout_1",
                       tags={**source_tags(info), "mlflow.note.content": "what this sweep is for"},
                       artifacts={"git.diff": info["diff"]})
    tr.open()
    c = MlflowClient(tracking_uri=tracking_uri)
    assert c.get_experiment_by_name("layout").tags["mlflow.experimentKind"] == "custom_model_development"
    parent, runs = mlflow_member_runs(tracking_uri, "layout")
    for run in [parent, *runs.values()]:
        assert run.data.tags["mlflow.source.git.commit"] == head
        assert run.data.tags["mlflow.source.name"] == "engine.sweep"
    assert parent.data.tags["mlflow.note.content"] == "what this sweep is for"
    assert sorted(a.path for a in c.list_artifacts(parent.info.run_id)) == ["git.diff", "grid.yaml"]
    assert {m: r.info.status for m, r in runs.items()} == {"m0000": "SCHEDULED", "m0001": "SCHEDULED"}
    tr._set_status("m0000", "running")
    assert c.get_run(runs["m0000"].info.run_id).info.status == "RUNNING"
    assert c.get_run(runs["m0001"].info.run_id).info.status == "SCHEDULED"


# ----------------------------------------------------------------------------- storage across nodes

def _alive_nodes(address: str, env: dict) -> int:
    code = ("import ray; ray.init(address=%r, log_to_driver=False); "
            "print('NODES', sum(n['Alive'] for n in ray.nodes()))" % address)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(p.stdout.split("NODES")[-1]) if "NODES" in p.stdout else 0


def test_storage_that_a_worker_node_cannot_see_is_refused(tmp_path, ray_tmpdir):
    """A two-node Ray on this machine; the worker node runs in its own mount namespace where the head's
    storage directory is covered by an empty tmpfs: exactly what a worker sees of a head-local path."""
    from engine.local_ray import processes_of
    from engine.preflight import STORAGE_ENV

    ray_cli = str(Path(sys.executable).parent / "ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    hidden, shared = tmp_path / "head_only", tmp_path / "shared"
    hidden.mkdir()
    # loopback only; without this the joining node would need the head's generated auth token
    env = dict(repo_env(), RAY_TMPDIR=str(ray_tmpdir), RAY_AUTH_MODE="disabled")
    worker = None
    try:
        subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--num-gpus", "0", "--include-dashboard", "false"],
                       env=env, check=True, capture_output=True, timeout=180)
        worker = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                   f"mount -t tmpfs none {hidden} && exec {ray_cli} start --address {address} "
                                   "--node-ip-address 127.0.0.1 --num-cpus 1 --num-gpus 0 --block"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.monotonic() + 180
        while _alive_nodes(address, env) < 2:
            assert time.monotonic() < deadline and worker.poll() is None, "the worker node did not join"
        sweep = [sys.executable, "-m", "engine.sweep", str(DEMO), "--address", address, "--verbose", "0",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--set", "experiment=nodes",
                 "--set", "iterations=20", "--set", "log_schedule=every:10", "--set", "lr=0.1",
                 "--set", "entropy=[]", "--set", "width=1", "--set", "num_stoch_grads=2"]
        refused = subprocess.run(sweep + ["--storage-path", str(hidden)], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
        assert "not visible on node" in refused.stderr and STORAGE_ENV in refused.stderr
        assert list(hidden.iterdir()) == []                             # no trial started, marker removed

        on_cluster = dict(env, **{STORAGE_ENV: str(shared)})            # as cluster.yaml sets it on the head
        ran = subprocess.run(sweep, cwd=tmp_path, env=on_cluster, capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
        sweeps = [d.name for d in shared.iterdir() if (d / "tuner.pkl").exists()]
        assert len(sweeps) == 1 and not (tmp_path / "ray_results").exists()
        resumed = subprocess.run(sweep + ["--resume"], cwd=tmp_path, env=on_cluster, capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        assert sweeps[0] in resumed.stdout
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        for d in (ray_tmpdir / "ray").glob("session_2*"):                # this test's Ray, nothing else
            for pid in processes_of(str(d)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ----------------------------------------------------------------------------- SIGTERM of the driver

def test_sigterm_stops_the_sweep_like_ctrl_c_and_closes_what_it_started(tmp_path, ray_tmpdir):
    from mlflow.tracking import MlflowClient

    from engine.local_ray import processes_of

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = [sys.executable, "-m", "engine.sweep", str(DEMO), "--num-cpus", "1", "--num-gpus", "0", "--verbose", "0",
            "--storage-path", str(tmp_path / "rr"), "--tracking-uri", uri, "--set", "experiment=term",
            "--set", "iterations=100000", "--set", "log_schedule=every:50", "--set", "checkpoint_every=200",
            "--set", "lr=0.1", "--set", "entropy=[]", "--set", "width=1", "--set", "num_stoch_grads=2"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=dict(repo_env(), RAY_TMPDIR=str(ray_tmpdir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:               # wait until the member is training and has logged something
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep did not start"
            try:
                _, runs = mlflow_member_runs(uri, "term")
                if metric_history(uri, runs["m0000"].info.run_id, "train_loss"):
                    break
            except Exception:     # store or runs not there yet
                pass
            time.sleep(0.5)       # polling interval, not synchronisation
        sessions = [d for d in (ray_tmpdir / "ray").glob("session_2*")]
        # a checkpoint a killed attempt of this sweep's trial held, and one of another sweep
        sweep_id = mlflow_member_runs(uri, "term")[0].data.tags[layout.TAG_SWEEP_ID]
        planted = tempfile.mkdtemp(prefix=held_prefix(f"{sweep_id}/t000"))
        other = tempfile.mkdtemp(prefix=held_prefix(f"{sweep_id}0/t000"))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:]                     # interrupted: unfinished members, not success
    parent, runs = mlflow_member_runs(uri, "term")
    c = MlflowClient(tracking_uri=uri)
    assert c.get_run(parent.info.run_id).info.status == "KILLED"
    assert c.get_run(parent.info.run_id).data.tags[layout.TAG_SWEEP_STATUS] == "interrupted"
    member = c.get_run(runs["m0000"].info.run_id)
    assert member.info.status == "KILLED" and member.data.tags[layout.TAG_STATUS] == "running"
    assert not os.path.exists(planted) and os.path.isdir(other)     # the driver cleared its sweep's only
    os.rmdir(other)
    deadline = time.monotonic() + 60
    while any(processes_of(str(d)) for d in sessions):          # Ray's shutdown ends its processes
        assert time.monotonic() < deadline, [processes_of(str(d)) for d in sessions]
        time.sleep(0.5)
