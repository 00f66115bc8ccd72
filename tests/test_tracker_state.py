"""The tracker is saved with Tune's experiment state: its MLflow client and write queue (engine.outbox)
stay out of the pickle and are rebuilt on first use, also for a tracker saved before the queue had its
own object (a sweep interrupted under older code and resumed under this one)."""
import ray.cloudpickle as cloudpickle
from mlflow.tracking import MlflowClient

from conftest import mlflow_member_runs
from engine import layout
from engine.tracking import MLflowTracker


def test_a_restored_tracker_writes_through_a_new_queue(tracking_uri, tmp_path):
    members = [("m0000", {"lr": 0.1}), ("m0001", {"lr": 0.2})]
    tracker = MLflowTracker(tracking_uri, "pickled", "grid: text", "g.yaml", members, "pickled_1",
                            spill_dir=str(tmp_path))
    tracker.open()
    tracker._write("set_tag", tracker.child["m0000"], key="written_before", value="yes")
    restored = cloudpickle.loads(cloudpickle.dumps(tracker))
    assert restored.__dict__["_outbox"] is None and restored.child == tracker.child

    restored._set_status("m0000", "running")
    del restored.__dict__["_outbox"]                    # as in a pickle of the code before engine.outbox
    restored._set_status("m0001", "running")

    client = MlflowClient(tracking_uri=tracking_uri)
    _, runs = mlflow_member_runs(tracking_uri, "pickled")
    for member_id in ("m0000", "m0001"):
        run = client.get_run(runs[member_id].info.run_id)
        assert run.data.tags[layout.TAG_STATUS] == "running" and run.info.status == "RUNNING", member_id
    assert restored.outbox.spill_path == tmp_path.resolve() / "mlflow-buffer-pickled_1.jsonl"
