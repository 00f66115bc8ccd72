"""A sweep on a real multi-node Ray on this machine, driven through ``python -m engine.sweep --address``.

The cluster (ray.cluster_utils.Cluster: separate raylets and object stores, one GCS) looks like the AWS
one: a head with no CPU for trials and two worker nodes with one CPU each and a custom resource of
their own, so each runs one trial at a time. While the sweep runs, a watcher process connected to the
cluster records every node's reservoir stats and which processes (pids: children of each node's raylet)
are on which node.

- the two trials run on different nodes, and each node's reservoir holds only the trial that runs
  on that node (pids from Tune's own results, nodes from the raylets' child processes);
- once node B's trial has written a checkpoint, node B is killed: its trial fails over to node A,
  restores that checkpoint (Tune counts one failure) and ends with the same train metrics and the same
  entropy at every log step as the same member trained without interruption in this process (the k-NN
  window spans 96 iterations, log steps are 50 apart: the windows after the checkpoint reach back
  across it, so they are rebuilt by the replay from the checkpoint's anchor on node A).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, metric_history, mlflow_member_runs, repo_env
from trainables.schedule import log_iterations

DEMO = REPO / "grids" / "demo.yaml"
ITERATIONS, EVERY, CKPT = 3000, 50, 400
LRS = [0.05, 0.02]
TRIAL_IDS = ["t000", "t001"]          # the grid's trials, in the order of the lr axis
GRID = ["experiment=multinode", "width=1", f"lr={LRS}", f"iterations={ITERATIONS}",
        f"log_schedule=every:{EVERY}", f"checkpoint_every={CKPT}", "num_stoch_grads=2", "batch_size=32",
        "max_failures=3", "max_concurrent=null",
        "entropy=[{name: knn, window: 20, stride: 5, ks: [1, 5, 19]}]"]

WATCHER = r"""
import json, os, sys, time
import ray
from engine.reservoir import NAMESPACE, reservoir_name
ray.init(address=sys.argv[1], log_to_driver=False)
out, nodes = sys.argv[2], sys.argv[3].split(",")
raylets = dict(zip(sys.argv[4].split(","), nodes))      # raylet pid -> node id
seen = {"reservoirs": {n: {"keys": [], "evaluations": 0} for n in nodes}, "pids": {}}
while True:
    for n in nodes:
        try:
            st = ray.get(ray.get_actor(reservoir_name(n), namespace=NAMESPACE).stats.remote(), timeout=5)
        except Exception:
            continue
        r = seen["reservoirs"][n]
        r["keys"] = sorted(set(r["keys"]) | {k for k in st if not k.startswith("_")})
        r["evaluations"] = max(r["evaluations"], st["_evaluations"])
    # Ray's worker processes are children of their node's raylet: record which node each pid is on
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError, ValueError):
            continue
        if ppid in raylets:
            seen["pids"][entry] = raylets[ppid]
    with open(out + ".tmp", "w") as f:
        json.dump(seen, f)
    import os; os.replace(out + ".tmp", out)
    time.sleep(0.2)      # sampling period of the watcher, not a synchronisation
"""


def _wait(what, cond, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"sweep ended while waiting for {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    for k, v in repo_env().items():        # raylets started here pass PYTHONPATH on to their workers
        if k in ("PYTHONPATH", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"):
            monkeypatch.setenv(k, v)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    a = c.add_node(num_cpus=1, resources={"node_a": 1})
    b = c.add_node(num_cpus=1, resources={"node_b": 1})
    yield c, a, b
    c.shutdown()


def _last_step(uri, lr):
    try:
        _, members = mlflow_member_runs(uri, "multinode")
    except Exception:                    # the store or the runs are not there yet
        return -1
    run = next((r for r in members.values() if float(r.data.params["lr"]) == lr), None)
    steps = [s for s, _ in metric_history(uri, run.info.run_id, "train_loss")] if run else []
    return max(steps, default=-1)


def reference_series(lr):
    """The member trained in this process, without Ray, reservoir or interruption, its entropy from the
    single-process sink: {metric name: [(log step, value)]} for the train loss and every entropy key."""
    import torch

    from benchmarks.faults import is_entropy
    from engine.grid import load_grid
    from trainables.runner import make_runner
    from trainables.sinks import LocalSink

    grid = load_grid(DEMO, [o for o in GRID if not o.startswith("lr=")] + [f"lr={lr}"])
    runner = make_runner([grid.trials()[0]["members"][0][1]], torch.device("cpu"))
    sink = LocalSink(runner.members[0]["entropy"], 1, runner.D)
    series: dict = {}
    for e in runner.run(sink):
        row = e["rows"][0] or {}
        for name, value in row.items():
            if name == "train_loss" or is_entropy(name):
                series.setdefault(name, []).append((e["iteration"], value))
    return series


def test_sweep_spreads_over_nodes_and_survives_losing_one(cluster, tmp_path):
    c, node_a, node_b = cluster
    storage, uri = tmp_path / "sweeps", f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen_file = tmp_path / "seen.json"
    env = repo_env()
    raylets = ",".join(str(n.all_processes["raylet"][0].process.pid) for n in (node_a, node_b))
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, c.address, str(seen_file),
                                f"{node_a.node_id},{node_b.node_id}", raylets], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    argv = [sys.executable, "-m", "engine.sweep", str(DEMO), "--address", c.address, "--storage-path",
            str(storage), "--tracking-uri", uri, "--verbose", "0"] + [a for o in GRID for a in ("--set", o)]
    sweep = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        # both reservoirs serve a trial; then B's trial checkpoints and node B is killed
        def keys_on(node):
            s = _read(seen_file)
            return s and s["reservoirs"][node.node_id]["keys"]
        key_b = _wait("a trial on node B", lambda: keys_on(node_b), 180, sweep)[0]
        key_a = _wait("a trial on node A", lambda: keys_on(node_a), 180, sweep)[0]
        assert key_a != key_b
        trial_b = key_b.split("/")[-1]
        _wait(f"a checkpoint of {trial_b}",
              lambda: list(storage.glob(f"multinode_*/{trial_b}/checkpoint_*")), 180, sweep)
        # the driver handles results in order: once a step after the checkpoint's has reached MLflow,
        # Tune has registered that checkpoint as the trial's latest
        lr_b = dict(zip(TRIAL_IDS, LRS))[trial_b]
        _wait("a report after the checkpoint", lambda: _last_step(uri, lr_b) > CKPT, 180, sweep)
        before_kill = _read(seen_file)
        c.remove_node(node_b, allow_graceful=False)
        out, _ = sweep.communicate(timeout=420)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        watcher.kill()
        watcher.wait()
    assert sweep.returncode == 0, out[-4000:]
    seen = _read(seen_file)

    # before the kill, each reservoir held exactly the trial of its own node
    assert before_kill["reservoirs"][node_b.node_id]["keys"] == [key_b]
    assert before_kill["reservoirs"][node_a.node_id]["keys"] == [key_a]
    assert seen["reservoirs"][node_a.node_id]["evaluations"] > 0
    assert before_kill["reservoirs"][node_b.node_id]["evaluations"] > 0

    # Tune's own record: B's trial failed once and finished; which process (pid) ran each last
    from ray.tune import ExperimentAnalysis
    sweep_dir = next(storage.glob("multinode_*"))
    trials = {t.trial_id: t for t in ExperimentAnalysis(str(sweep_dir)).trials}
    by_name = {t.config["trial"]["trial_id"]: t for t in trials.values()}
    trial_a = key_a.split("/")[-1]
    assert by_name[trial_b].num_failures == 1 and by_name[trial_a].num_failures == 0
    last_b = by_name[trial_b].last_result
    assert last_b["iterations_since_restore"] < last_b["training_iteration"], "restarted from scratch"
    assert all(t.status == "TERMINATED" for t in trials.values())
    for name in (trial_a, trial_b):          # both ended on node A (B was gone): their pids were A's
        pid = str(by_name[name].last_result["pid"])
        assert seen["pids"].get(pid) == node_a.node_id, (name, pid, seen["pids"])
    # after failing over, B's trial was served by node A's reservoir
    assert key_b in seen["reservoirs"][node_a.node_id]["keys"]

    # resumed from its checkpoint: same train metrics as an undisturbed run, no repeated log steps
    _, members = mlflow_member_runs(uri, "multinode")
    assert by_name[trial_b].config["trial"]["members"][0][1]["lr"] == lr_b
    run_b = next(r for r in members.values() if float(r.data.params["lr"]) == lr_b)
    logged = metric_history(uri, run_b.info.run_id, "train_loss")
    assert [s for s, _ in logged] == log_iterations(f"every:{EVERY}", ITERATIONS)
    reference = reference_series(lr_b)
    assert logged == reference["train_loss"]
    # and the same entropy at every log step, to float64 rounding (the reservoir's reductions use the
    # node's threads): no value missing, none added, none changed
    from benchmarks.faults import compare, is_entropy
    from mlflow.tracking import MlflowClient
    names = [n for n in MlflowClient(tracking_uri=uri).get_run(run_b.info.run_id).data.metrics if is_entropy(n)]
    entropy = {n: metric_history(uri, run_b.info.run_id, n) for n in names}
    assert sorted(entropy) == sorted(n for n in reference if is_entropy(n))
    assert "entropy_knn_k5" in entropy and len(entropy["entropy_knn_k5"]) > 50
    expected = {n: h for n, h in reference.items() if is_entropy(n)}
    assert compare(expected, entropy) == {"train": [], "entropy": [], "duplicates": []}
