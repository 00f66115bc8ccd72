"""MLflow from the driver only: a Tune callback that turns trial results into runs.

Layout (docs/DESIGN.md, "MLflow layout"): one parent run per sweep, one child run per member, params
under the member keys, every metric a series with ``step = iteration``, running metrics as
``running/<name>``. Trials never talk to MLflow, so a SQLite store is safe and no credentials reach the
workers. After a retry or a resumed sweep a trial reports some log steps again; rows at or before the
last step already logged for a member are skipped, so every series has one value per step.
"""
from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

from ray.tune import Callback

MAX_BATCH = 900     # MLflow accepts up to 1000 metrics per log_batch call
RUNNING = "running/"


def _param_value(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v)


def git_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def regime_of(status: str, last_row: dict | None) -> str:
    """converged / stationary / diverged (our heuristic: a member that fits its training set, or that
    stopped at its loss threshold, converged; one that blew up diverged; the rest are stationary)."""
    if status == "diverged":
        return "diverged"
    if status == "converged":
        return "converged"
    if last_row and last_row.get("train_acc", 0.0) >= 0.999:
        return "converged"
    return "stationary"


class MLflowTracker(Callback):
    """Picklable (it is stored with Tune's experiment state); the MLflow client is made in ``setup``."""

    def __init__(self, tracking_uri: str, experiment: str, grid_text: str, grid_name: str,
                 members: list[tuple[str, dict]], sweep_id: str, tags: dict | None = None,
                 params: dict | None = None):
        self.tracking_uri, self.experiment, self.grid_text = tracking_uri, experiment, grid_text
        self.grid_name, self.members, self.sweep_id = grid_name, members, sweep_id
        self.tags, self.params = dict(tags or {}), dict(params or {})
        self.parent_id: str | None = None
        self.child: dict[str, str] = {}
        self.last_step: dict[str, int] = {}
        self.last_row: dict[str, dict] = {}
        self.status: dict[str, str] = {}
        self.d_logged: set[str] = set()
        self._client = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    # ---- set-up -------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def setup(self, **info) -> None:
        self.open()

    def open(self) -> None:
        """Create (or, on resume, find again) the parent run and one child run per member."""
        c = self.client
        exp = c.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else c.create_experiment(self.experiment)
        if exp is not None and exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp_id)
        found = c.search_runs([exp_id], filter_string=f"tags.`thermosweep.sweep_id` = '{self.sweep_id}' "
                                                      "and tags.`thermosweep.role` = 'sweep'")
        if found:
            self.parent_id = found[0].info.run_id
            c.update_run(self.parent_id, status="RUNNING")
        else:
            run = c.create_run(exp_id, run_name=f"sweep {self.grid_name} {self.sweep_id}", tags={
                "thermosweep.role": "sweep", "thermosweep.sweep_id": self.sweep_id,
                "thermosweep.grid": self.grid_name, **self.tags})
            self.parent_id = run.info.run_id
            c.log_text(self.parent_id, self.grid_text, "grid.yaml")
            self._log_params(self.parent_id, self.params)
        c.set_tag(self.parent_id, "thermosweep.sweep_status", "running")
        existing = {r.data.tags.get("thermosweep.member_id"): r for r in c.search_runs(
            [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'", max_results=50000)}
        for member_id, cfg in self.members:
            run = existing.get(member_id)
            if run is not None:
                self.child[member_id] = run.info.run_id
                self.status[member_id] = run.data.tags.get("thermosweep.status", "pending")
                hist = c.get_metric_history(run.info.run_id, "radius")
                if hist:
                    self.last_step[member_id] = max(m.step for m in hist)
                continue
            name = f"{member_id} " + " ".join(f"{k}={cfg[k]}" for k in ("model", "width", "protocol", "lr", "wd")
                                             if k in cfg)
            run = c.create_run(exp_id, run_name=name, tags={
                "mlflow.parentRunId": self.parent_id, "thermosweep.role": "member",
                "thermosweep.member_id": member_id, "thermosweep.sweep_id": self.sweep_id,
                "thermosweep.status": "pending"})
            self.child[member_id] = run.info.run_id
            self.status[member_id] = "pending"
            self._log_params(run.info.run_id, cfg)

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(k, _param_value(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i:i + 90])

    # ---- results ------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        for member_id, _ in trial.config["trial"]["members"]:
            self._set_status(member_id, "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.log_result(result)

    def log_result(self, result: dict) -> None:
        """Log a trial result: ``events`` (one per log step since the previous result, each with
        ``iteration``, ``rows`` and ``running`` per member), ``member_ids``, ``status`` and ``D``.
        One ``log_batch`` per member covers all of the result's steps."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        ids = result.get("member_ids") or []
        events = result.get("events") or []
        for i, member_id in enumerate(ids):
            run_id = self.child.get(member_id)
            if run_id is None:
                continue
            if member_id not in self.d_logged and result.get("D"):
                self.client.log_param(run_id, "D", str(int(result["D"])))   # same value on a resume
                self.d_logged.add(member_id)
            metrics = []
            for ev in events:
                last = self.last_step.get(member_id, -1)
                for r in (ev.get("running") or [[]] * len(ids))[i]:
                    if r["iteration"] > last:
                        metrics += [Metric(RUNNING + k, float(v), now, int(r["iteration"]))
                                    for k, v in r.items() if k != "iteration" and _finite(v)]
                row = (ev.get("rows") or [None] * len(ids))[i]
                step = int(ev["iteration"])
                if row is not None and step > last:
                    metrics += [Metric(k, float(v), now, step) for k, v in row.items()
                                if k != "iteration" and _finite(v)]
                    self.last_step[member_id] = step
                    self.last_row[member_id] = row
            for j in range(0, len(metrics), MAX_BATCH):
                self.client.log_batch(run_id, metrics=metrics[j:j + MAX_BATCH])
            status = (result.get("status") or [None] * len(ids))[i]
            if status and status != self.status.get(member_id):
                self._set_status(member_id, status)

    def _set_status(self, member_id: str, status: str) -> None:
        run_id = self.child.get(member_id)
        if run_id is None:
            return
        self.status[member_id] = status
        self.client.set_tag(run_id, "thermosweep.status", status)
        if status in ("done", "diverged", "converged", "stopped", "failed"):
            self.client.set_tag(run_id, "thermosweep.regime",
                                "failed" if status == "failed" else regime_of(status, self.last_row.get(member_id)))
            self.client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        for member_id, _ in trial.config["trial"]["members"]:
            if self.status.get(member_id) in ("running", "pending"):
                self._set_status(member_id, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        for member_id, _ in trial.config["trial"]["members"]:
            if self.status.get(member_id) not in ("done", "diverged", "converged", "stopped"):
                self._set_status(member_id, "failed")
                if trial.error_file:
                    try:
                        text = Path(trial.error_file).read_text()[-4000:]
                        self.client.set_tag(self.child[member_id], "thermosweep.error", text)
                    except OSError:
                        pass

    def on_experiment_end(self, trials, **info):
        self.reconcile(trials)
        self.close()

    def reconcile(self, trials) -> None:
        """Bring MLflow in line with Tune's own record of each trial.

        Tune saves its experiment state independently of this callback, so an interrupted driver
        (a second Ctrl-C, a killed process) can leave a trial TERMINATED in Tune's state while its
        members still read ``running`` here; ``--resume`` then has nothing to rerun for it. Called at
        the end of every run, including a resume: a finished trial's last result is logged again
        (already-logged steps are skipped) and its members still open are closed."""
        for trial in trials:
            ids = [m for m, _ in trial.config["trial"]["members"]]
            if not any(self.status.get(m) in ("running", "pending") for m in ids):
                continue
            last = trial.last_result or {}
            # TERMINATED alone is not enough: Tune also stops the trials it interrupts that way (they
            # are saved as unfinished and rerun on a resume). A finished trial's last report has no
            # member left running. (Tune's own `done` flag is not enough either: it is set on the
            # last result after the function returns and is often missing from the saved state.)
            statuses = last.get("status") or []
            finished = last.get("done") or (statuses and all(s != "running" for s in statuses))
            if trial.status != "TERMINATED" or not finished:
                continue
            if last.get("member_ids"):
                self.log_result(last)
            self.on_trial_complete(0, trials, trial)

    def close(self) -> None:
        if self.parent_id is None:
            return
        unfinished = [m for m, s in self.status.items() if s in ("pending", "running")]
        self.client.set_tag(self.parent_id, "thermosweep.sweep_status", "interrupted" if unfinished else "finished")
        self.client.set_terminated(self.parent_id, "KILLED" if unfinished else "FINISHED")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.status.values():
            out[s] = out.get(s, 0) + 1
        return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
