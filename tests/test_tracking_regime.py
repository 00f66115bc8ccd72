"""The papers' "converged" regime travels from the network runner to MLflow: a member that converges is
tagged at once while it trains on, and at its end its regime is the runner's word, not our train-accuracy
heuristic (which is kept for runners that report no regime, the toys)."""
from mlflow.tracking import MlflowClient

from conftest import mlflow_member_runs
from engine import layout
from engine.tracking import MLflowTracker


def _result(t, rows, status, regime=None):
    res = {"iteration": t, "member_ids": ["m0000", "m0001"], "D": 10, "status": status,
           "events": [{"iteration": t, "rows": rows, "running": [[], []]}]}
    if regime is not None:
        res["regime"] = regime
    return res


def test_runner_regime_is_tagged_while_training_and_decides_the_final_regime(tracking_uri):
    members = [("m0000", {"lr": 0.01}), ("m0001", {"lr": 0.1})]
    tr = MLflowTracker(tracking_uri, "regime", "grid: text", "g.yaml", members, "regime_1")
    tr.open()
    for m, _ in members:
        tr._set_status(m, "running")
    fits = {"train_loss": 0.01, "train_acc": 1.0}
    tr.log_result(_result(10, [fits, fits], ["running", "running"], ["converged", "training"]))

    c = MlflowClient(tracking_uri=tracking_uri)
    _, runs = mlflow_member_runs(tracking_uri, "regime")
    live = c.get_run(runs["m0000"].info.run_id)
    assert live.data.tags[layout.TAG_REGIME] == "converged" and live.info.status == "RUNNING"
    assert layout.TAG_REGIME not in c.get_run(runs["m0001"].info.run_id).data.tags

    tr.log_result(_result(20, [fits, fits], ["done", "done"], ["converged", "training"]))
    final = {m: c.get_run(r.info.run_id) for m, r in runs.items()}
    assert final["m0000"].data.tags[layout.TAG_REGIME] == "converged"
    # 100 % train accuracy, but the runner saw no falling loss there: stationary, not the heuristic's converged
    assert final["m0001"].data.tags[layout.TAG_REGIME] == "stationary"
    assert all(r.info.status == "FINISHED" for r in final.values())


def test_runners_without_a_regime_keep_the_heuristic(tracking_uri):
    members = [("m0000", {"lr": 0.01}), ("m0001", {"lr": 0.1})]
    tr = MLflowTracker(tracking_uri, "heur", "grid: text", "g.yaml", members, "heur_1")
    tr.open()
    rows = [{"train_loss": 0.01, "train_acc": 1.0}, {"train_loss": 0.5, "train_acc": 0.8}]
    tr.log_result(_result(20, rows, ["done", "done"]))
    _, runs = mlflow_member_runs(tracking_uri, "heur")
    c = MlflowClient(tracking_uri=tracking_uri)
    tags = {m: c.get_run(r.info.run_id).data.tags[layout.TAG_REGIME] for m, r in runs.items()}
    assert tags == {"m0000": "converged", "m0001": "stationary"}
