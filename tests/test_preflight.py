"""Inputs checked before anything starts (engine/preflight.py through ``python -m engine.sweep``).

Every case runs ``main`` in one fresh Python (no Ray yet) and records its exit status, its messages,
whether Ray was started and which files appeared; the faults are real (a file where a directory is
expected, a port nobody listens on, a proxy that refuses, a data directory without the data).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, repo_env
from test_data import _fake_batch, _write

DEMO = str(REPO / "grids" / "demo.yaml")

SCRIPT = """
import contextlib, io, json, os, sys, time
sys.argv = ["x"]
from engine.sweep import main
out = []
for case in json.loads(sys.stdin.read()):
    os.environ.update(case["env"])
    o, e = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc = main(case["argv"])
        except SystemExit as x:
            rc = x.code
    for k in case["env"]:
        os.environ.pop(k)
    import ray
    out.append({"rc": rc, "stdout": o.getvalue(), "stderr": e.getvalue(), "ray": ray.is_initialized(),
                "files": sorted(os.listdir(".")), "seconds": time.monotonic() - t0})
print("RESULT" + json.dumps(out))
"""


def dead_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    work = d / "work"
    work.mkdir()
    (d / "a_file").write_text("not a directory")
    cifar = d / "data"
    rng = np.random.default_rng(0)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        _write(cifar / "cifar-10-batches-py" / f, _fake_batch(rng, 4, {"labels": 10}, 2, True))
    port = dead_port()
    refusing_proxy = {"HTTPS_PROXY": f"http://127.0.0.1:{port}", "HTTP_PROXY": f"http://127.0.0.1:{port}",
                      "https_proxy": f"http://127.0.0.1:{port}", "http_proxy": f"http://127.0.0.1:{port}"}
    cifar_grid = ["--set", "dataset=cifar10", "--set", "width=1", "--set", "iterations=10"]
    cases = {
        "escape_dry": ([DEMO, "--dry-run", "--set", "experiment=../../escape"], {}),
        "escape_run": ([DEMO, "--set", "experiment=../../escape", "--set", "iterations=10"], {}),
        "slash": ([DEMO, "--dry-run", "--set", "experiment=a/b"], {}),
        "storage_file": ([DEMO, "--dry-run", "--storage-path", str(d / "a_file")], {}),
        "storage_under_file": ([DEMO, "--storage-path", str(d / "a_file" / "sub"), "--set", "iterations=10"], {}),
        "unknown_scheme": ([DEMO, "--dry-run", "--tracking-uri", "mlfow://127.0.0.1:5000"], {}),
        "sqlite_no_dir": ([DEMO, "--dry-run", "--tracking-uri", f"sqlite:///{d}/nowhere/mlflow.db"], {}),
        "server_down": ([DEMO, "--tracking-uri", f"http://127.0.0.1:{port}", "--set", "iterations=10"], {}),
        "ray_down": ([DEMO, "--address", f"127.0.0.1:{port}", "--set", "iterations=10"], {}),
        "ray_down_env": ([DEMO, "--dry-run"], {"RAY_ADDRESS": f"127.0.0.1:{port}"}),
        "cifar_missing": ([DEMO, *cifar_grid], {"THERMOSWEEP_DATA": str(d / "empty"), **refusing_proxy}),
        "cifar_missing_dry": ([DEMO, "--dry-run", *cifar_grid],
                              {"THERMOSWEEP_DATA": str(d / "empty"), **refusing_proxy}),
        "cifar_present_dry": ([DEMO, "--dry-run", *cifar_grid], {"THERMOSWEEP_DATA": str(cifar)}),
        "cifar_on_cluster_dry": ([DEMO, "--dry-run", *cifar_grid, "--address", "auto"],
                                 {"THERMOSWEEP_DATA": str(d / "empty")}),
    }
    payload = [{"argv": a, "env": e} for a, e in cases.values()]
    p = subprocess.run([sys.executable, "-c", SCRIPT], input=json.dumps(payload), cwd=work, env=repo_env(),
                       capture_output=True, text=True, timeout=300)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    return d, dict(zip(cases, json.loads(line[0][len("RESULT"):])))


@pytest.mark.parametrize("case,words", [
    ("escape_dry", ["experiment", "'../../escape'", "--set experiment=escape"]),
    ("escape_run", ["experiment", "not a safe name"]),
    ("slash", ["experiment", "'a/b'", "--set experiment=a_b"]),
    ("storage_file", ["storage path", "is a file, not a directory", "--storage-path"]),
    ("storage_under_file", ["storage path", "is a file, not a directory"]),
    ("unknown_scheme", ["unknown scheme 'mlfow:'", "sqlite", "--tracking-uri"]),
    ("sqlite_no_dir", ["does not exist", "nowhere"]),
    ("server_down", ["did not answer", "/health", "mlflow server"]),
    ("ray_down", ["Ray address", "nothing answers", "--address"]),
    ("ray_down_env", ["Ray address", "RAY_ADDRESS"]),
    ("cifar_missing", ["dataset cifar10", "cifar-10-batches-py", "cannot be reached", "empty"]),
])
def test_bad_input_exits_2_before_anything_starts(checked, case, words):
    d, results = checked
    r = results[case]
    assert r["rc"] == 2, r
    for w in words:
        assert w in r["stderr"], (w, r["stderr"])
    assert r["stderr"].count("error:") == 1, r["stderr"]          # reported once
    assert r["ray"] is False and r["files"] == [], r
    assert r["seconds"] < 30, r                                   # every probe is bounded
    assert not (d.parent / "escape").exists() and not (d / "escape").exists()


def test_dry_run_plans_without_local_data_and_says_a_local_run_would_stop(checked):
    """A dry run plans for the cluster (where the head fetches CIFAR once); data missing on this
    machine is said, once, as a note, and the plan is still printed."""
    _, results = checked
    r = results["cifar_missing_dry"]
    assert r["rc"] == 0, r
    assert "t000" in r["stdout"] and "launch plan" in r["stdout"]
    for w in ("a run on this machine would stop here", "dataset cifar10", "cannot be reached"):
        assert w in r["stderr"], (w, r["stderr"])
    assert r["stderr"].count("dataset cifar10") == 1, r["stderr"]
    assert r["ray"] is False and r["files"] == [], r


def test_good_inputs_pass_and_the_cluster_case_says_where_data_is_expected(checked):
    _, results = checked
    assert results["cifar_present_dry"]["rc"] == 0, results["cifar_present_dry"]
    assert "t000" in results["cifar_present_dry"]["stdout"]
    cluster = results["cifar_on_cluster_dry"]
    assert cluster["rc"] == 0, cluster
    assert "cifar10 is read on each worker node" in cluster["stderr"] and "THERMOSWEEP_DATA" in cluster["stderr"]
    assert cluster["ray"] is False and cluster["files"] == []
