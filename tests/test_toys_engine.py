"""The toy grids end to end: engine.sweep (Ray Tune + MLflow) on reduced copies of the four toy grids,
then analysis.report on each experiment, checking the MLflow layout and the toy report sections.

Reductions: vMF toys 20k iterations logged every 2000 with a 3 × 2 sub-grid and a KL window of 100
snapshots every 20 iterations evaluated at the last 3 log steps; sphere toy 3000 iterations, 3 LRs,
log schedule log:30.
Uses the session Ray of tests/conftest.py.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, metric_history, mlflow_member_runs
from engine import layout

pytest.importorskip("mlflow")

ITERS, EVERY = 20_000, 2000
KL = "entropy=[{name: kl, window: 100, stride: 20, standardize: true, evaluate_last: 3}]"
VMF_SETS = [f"iterations={ITERS}", f"log_schedule=every:{EVERY}", "lr=[0.01, 0.05, 0.1]", KL,
            "checkpoint_every=0"]
CASES = {
    "vmf_fixed_elr": [*VMF_SETS, "wd=[0.01, 0.1]"],
    "vmf_fixed_lr": [*VMF_SETS, "wd=[0.01, 0.1]"],
    "vmf_fixed_sphere": [*VMF_SETS, "radius=[0.5, 1.0]"],
}


def _sweep(tmp_path, uri, grid, sets):
    from engine.sweep import main
    argv = [str(REPO / "grids" / f"{grid}.yaml"), "--tracking-uri", uri, "--storage-path",
            str(tmp_path / "ray_results"), "--verbose", "0"]
    for s in sets:
        argv += ["--set", s]
    return main(argv)


def _report(tmp_path, grid, uri):
    from analysis.report import main
    out = tmp_path / "report"
    assert main(["--experiment", grid, "--tracking-uri", uri, "--out", str(out), "--no-upload"]) == 0
    return out, pd.read_csv(out / "summary.csv")


@pytest.mark.parametrize("grid", sorted(CASES))
def test_vmf_grid_through_engine_and_report(ray_session, tmp_path, tracking_uri, monkeypatch, grid):
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri
    assert _sweep(tmp_path, uri, grid, CASES[grid]) == 0
    parent, children = mlflow_member_runs(uri, grid)
    assert parent.data.tags[layout.TAG_SWEEP_STATUS] == "finished"
    assert len(children) == 6
    protocol = grid.removeprefix("vmf_")
    steps = list(range(EVERY, ITERS + 1, EVERY))
    for run in children.values():
        p = run.data.params
        assert p["model"] == "vmf" and p["protocol"] == protocol and p["iterations"] == str(ITERS)
        assert json.loads(p["entropy"])[0]["evaluate_last"] == 3
        assert run.data.tags[layout.TAG_STATUS] == "done"
        U = metric_history(uri, run.info.run_id, "train_loss")
        assert [s for s, _ in U] == steps and all(0 <= v <= 2 for _, v in U)
        assert [s for s, _ in metric_history(uri, run.info.run_id, "entropy_kl_sphere")] == steps[-3:]
        if protocol == "fixed_sphere":
            r0 = float(p["radius"])
            assert all(abs(v - r0) < 1e-9 * r0 for _, v in metric_history(uri, run.info.run_id, "radius"))
            # the pre-projection radius exceeds r0 (a tangent step lengthens θ)
            assert all(v > r0 for _, v in metric_history(uri, run.info.run_id, "radius_preproj"))

    out, summary = _report(tmp_path, grid, uri)
    row = summary[summary["section"] == "vmf_exact"]
    assert len(row) == 1 and row["protocol"].iloc[0] == protocol
    for f in (f"vmf_{protocol}.csv", f"vmf_{protocol}_exact.png", f"vmf_{protocol}_errors.png"):
        assert (out / f).stat().st_size > 0, f
    t = pd.read_csv(out / f"vmf_{protocol}.csv")
    assert len(t) == 6 and t["U_sim"].notna().all() and (t["S_evals"] == 3).all()
    # a short run is already near its vMF stationary state: U within ~30%, S within 0.5 nats (median)
    assert np.median(t["U_rel_err"]) < 0.3
    assert np.median(t["S_abs_err"]) < 0.5
    if protocol == "fixed_lr":
        assert (out / "vmf_adiabatic_all.csv").exists()
        assert "vmf_adiabatic" in set(summary["section"])


def test_sphere_toy_grid_through_engine_and_report(ray_session, tmp_path, tracking_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri
    # log:30 instead of the grid's sphere_toy schedule (~500 log steps, each one an MLflow write per member)
    sets = ["iterations=3000", "lr=[0.01, 0.1, 1.0]", "log_schedule=log:30"]
    assert _sweep(tmp_path, uri, "sphere_toy", sets) == 0
    parent, children = mlflow_member_runs(uri, "sphere_toy")
    assert len(children) == 6
    settings = sorted(r.data.params["setting"] for r in children.values())
    assert settings == ["op"] * 3 + ["up"] * 3
    for run in children.values():
        assert run.data.tags[layout.TAG_STATUS] in ("done", "converged")
        snr = metric_history(uri, run.info.run_id, "snr")
        assert snr[0][0] == 0 and all(v > 0 for _, v in snr)
        if run.data.tags[layout.TAG_STATUS] == "done":
            assert snr[-1][0] == 3000
    out, summary = _report(tmp_path, "sphere_toy", uri)
    rows = summary[summary["section"] == "sphere_toy"].set_index("group")
    assert set(rows.index) == {"up", "op"}
    for f in ("sphere_toy.csv", "sphere_toy_training.png", "sphere_toy_snr.png"):
        assert (out / f).stat().st_size > 0, f
    t = pd.read_csv(out / "sphere_toy.csv")
    # UP has no common zero: its loss stays well above the OP threshold at every LR
    assert (t.loc[t["setting"] == "up", "final_loss"] > 1e-3).all()


def test_vmf_members_stop_through_engine(ray_session, tmp_path, tracking_uri, monkeypatch):
    """stop_when through Ray Tune and MLflow: the fast walker (η_eff = 0.1) stops early with status tag
    `stopped`, its run is FINISHED with `stopped_at` as its last step, the slow one runs to the end."""
    monkeypatch.chdir(tmp_path)
    sets = ["iterations=60000", "log_schedule=every:1000", "lr=[0.1, 0.0001]", "wd=[0.01]", "checkpoint_every=0",
            "entropy=[{name: kl, window: 20, stride: 50, standardize: true, evaluate_every: 2000}]",
            "stop_when={u_rel_se: 0.1, s_se: 0.3, u_rows: 10, s_evals: 5}"]
    assert _sweep(tmp_path, tracking_uri, "vmf_fixed_elr", sets) == 0
    parent, children = mlflow_member_runs(tracking_uri, "vmf_fixed_elr")
    by_lr = {float(r.data.params["lr"]): r for r in children.values()}
    fast, slow = by_lr[0.1], by_lr[0.0001]
    assert fast.data.tags[layout.TAG_STATUS] == "stopped" and fast.info.status == "FINISHED"
    (step, stopped_at), = metric_history(tracking_uri, fast.info.run_id, "stopped_at")
    assert step == stopped_at < 60000
    assert metric_history(tracking_uri, fast.info.run_id, "train_loss")[-1][0] == step
    assert slow.data.tags[layout.TAG_STATUS] == "done"
    assert metric_history(tracking_uri, slow.info.run_id, "train_loss")[-1][0] == 60000
    assert parent.data.tags[layout.TAG_SWEEP_STATUS] == "finished"
