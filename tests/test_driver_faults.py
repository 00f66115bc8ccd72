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
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from ray.tune import Callback

from conftest import REPO, metric_history, mlflow_member_runs, repo_env

DEMO = REPO / "grids" / "demo.yaml"
KNN = "entropy=[{name: knn, window: 20, stride: 1, ks: [1, 5, 19]}]"
TINY = ["width=1", "num_stoch_grads=2", "batch_size=32", KNN]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real tracking server on 127.0.0.1 with a SQLite store under ``root``; stop/start keep the port."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout=180.0):
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=repo_env(),
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        self.uri + "/health", timeout=2) as r:
                    if r.read().strip() == b"OK":
                        return
            except OSError:
                pass
            time.sleep(0.2)          # polling interval, not synchronisation
        raise AssertionError("mlflow server did not come up:\n" + (self.root / "server.log").read_text()[-3000:])

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)         # the server and its own workers, ours only
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None

    def down(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return False
        except OSError:
            return True


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    srv = MlflowServer(root, free_port())
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

    from engine.config import load_grid
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
        assert run.info.status == "FINISHED" and run.data.tags["thermosweep.status"] == "done"
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"
    assert c.get_run(parent.info.run_id).data.tags["thermosweep.sweep_status"] == "finished"


def _result(member_ids, steps, status):
    """A trial result as engine.trainable reports it, with values fixed by the test."""
    events = [{"iteration": t, "rows": [{"iteration": t, "train_loss": 1.0 / t + i} for i in range(len(member_ids))],
               "running": [[] for _ in member_ids]} for t in steps]
    return {"member_ids": member_ids, "events": events, "status": status, "D": 7}


def test_store_that_stays_down_spills_to_a_file_that_replay_writes(tmp_path, server, monkeypatch, capsys):
    import engine.tracking as tracking
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(tracking, "BUFFER_OPS", 3)
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
        assert run.info.status == "FINISHED" and run.data.tags["thermosweep.status"] == "done"
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"
