"""MLflow from the driver only: a Tune callback that turns trial results into runs.

Layout (engine.layout, docs/DESIGN.md "MLflow layout"): one parent run per sweep, one child run per
member, params under the member keys, every metric a series with ``step = iteration``, running metrics
as ``running/<name>``. Trials never talk to MLflow, so a SQLite store is safe and no credentials reach
the workers. After a retry or a resumed sweep a trial reports some log steps again; rows at or before
the last step already logged for a member are skipped, so every series has one value per step.

Tracking outages only delay a sweep: every write goes through one ordered queue (engine.outbox) that
buffers while the store is away and, if it stays away, saves the writes to a file that
``python -m engine.tracking replay FILE`` writes later.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from ray.tune import Callback

from engine import layout
from engine.outbox import Outbox, mlflow_client, replay, short_error
from engine.source import SOURCE_FILE, record_source
from trainables.runner import ENDED, FINAL

MAX_BATCH = 900     # MLflow accepts up to 1000 metrics per log_batch call
PARAMS_PER_BATCH = 90    # and up to 100 params
END_WAIT_S = float(os.environ.get("THERMOSWEEP_TRACKING_END_WAIT_S", "120"))
OPEN_STATUSES = ("pending", "running")      # a member whose run is not closed yet


def regime_of(status: str, last_row: dict | None, runner_regime: str | None = None) -> str:
    """converged / stationary / diverged. A network runner reports the papers' own "converged" (100 %
    train accuracy with a falling train loss, docs/theory.md §5) as ``runner_regime``; runners that do not
    (the toys) are judged by our heuristic: a member that fits its training set, or that stopped at
    its loss threshold, converged; one that blew up diverged; the rest are stationary."""
    if status == "diverged":
        return "diverged"
    if status == "converged" or runner_regime == "converged":
        return "converged"
    if runner_regime is not None:
        return "stationary"
    if last_row and last_row.get("train_acc", 0.0) >= 0.999:
        return "converged"
    return "stationary"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _per_member(result: dict, key: str, count: int, empty=None) -> list:
    """``result[key]``, one entry per member, or ``count`` times ``empty`` when the result has none."""
    return result.get(key) or [empty] * count


class MLflowTracker(Callback):
    """Picklable (it is stored with Tune's experiment state); the MLflow client and the write queue
    (``outbox``) are made when first used, also after a restore."""

    def __init__(self, tracking_uri: str, experiment: str, grid_text: str, grid_name: str,
                 members: list[tuple[str, dict]], sweep_id: str, tags: dict | None = None,
                 params: dict | None = None, spill_dir: str | None = None, artifacts: dict | None = None):
        self.tracking_uri, self.experiment, self.grid_text = tracking_uri, experiment, grid_text
        self.grid_name, self.members, self.sweep_id = grid_name, members, sweep_id
        self.tags, self.params = dict(tags or {}), dict(params or {})
        self.source_tags = {k: v for k, v in self.tags.items() if k.startswith(layout.SOURCE_TAG_PREFIX)}
        self.parent_id: str | None = None
        self.child: dict[str, str] = {}
        self.last_step: dict[str, int] = {}
        self.last_row: dict[str, dict] = {}
        self.status: dict[str, str] = {}
        self.regime: dict[str, str] = {}       # what the runner says (network runners), per member
        self.d_logged: set[str] = set()
        self.spill_dir = spill_dir
        self.artifacts = {"grid.yaml": grid_text, **(artifacts or {})}     # text files of the parent run
        self._outbox: Outbox | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_outbox"] = None
        return state

    # ---- set-up -------------------------------------------------------------------------------
    @property
    def outbox(self) -> Outbox:
        if self.__dict__.get("_outbox") is None:       # also a tracker pickled before the outbox existed
            self._outbox = Outbox(self.tracking_uri, self.spill_path())
        return self._outbox

    @property
    def client(self):
        return self.outbox.client

    def spill_path(self) -> Path:
        return Path(self.spill_dir or ".").resolve() / f"mlflow-buffer-{self.sweep_id}.jsonl"

    def _write(self, op: str, run_id: str, **arguments) -> None:
        self.outbox.write(op, run_id, **arguments)

    def drain(self, wait_s: float) -> None:
        """At the end of a sweep: keep trying for up to ``wait_s`` seconds, then save what is left."""
        self.outbox.drain(wait_s)

    def setup(self, **info) -> None:
        self.open()

    def open(self) -> None:
        """Create (or, on resume, find again) the parent run and one child run per member."""
        experiment_id = self._experiment_id()
        self._open_parent(experiment_id)
        existing = {run.data.tags.get(layout.TAG_MEMBER_ID): run for run in self.client.search_runs(
            [experiment_id], filter_string=layout.tags_equal({layout.TAG_PARENT_RUN: self.parent_id}),
            max_results=50000)}
        for member_id, config in self.members:
            if member_id in existing:
                self._reopen_member(member_id, existing[member_id])
            else:
                self._create_member(experiment_id, member_id, config)

    def _experiment_id(self) -> str:
        """The experiment's id, created (or restored from deletion) and tagged as MLflow's UI wants."""
        client = self.client
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return client.create_experiment(self.experiment, tags=layout.EXPERIMENT_TAGS)
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if not layout.EXPERIMENT_TAGS.items() <= experiment.tags.items():
            for name, value in layout.EXPERIMENT_TAGS.items():
                client.set_experiment_tag(experiment.experiment_id, name, value)
        return experiment.experiment_id

    def _open_parent(self, experiment_id: str) -> None:
        client = self.client
        found = client.search_runs([experiment_id], filter_string=layout.tags_equal(
            {layout.TAG_SWEEP_ID: self.sweep_id, layout.TAG_ROLE: layout.ROLE_SWEEP}))
        if found:
            self.parent_id = found[0].info.run_id
            client.update_run(self.parent_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=layout.sweep_run_name(self.grid_name, self.sweep_id),
                                    tags={layout.TAG_ROLE: layout.ROLE_SWEEP, layout.TAG_SWEEP_ID: self.sweep_id,
                                          layout.TAG_GRID: self.grid_name, **self.tags, **self.source_tags})
            self.parent_id = run.info.run_id
            for name, text in self.artifacts.items():
                client.log_text(self.parent_id, text, name)
            self._log_params(self.parent_id, self.params)
        client.set_tag(self.parent_id, layout.TAG_SWEEP_STATUS, "running")

    def _reopen_member(self, member_id: str, run) -> None:
        """A resumed sweep's member run: its status, and the last step it has logged."""
        self.child[member_id] = run.info.run_id
        self.status[member_id] = run.data.tags.get(layout.TAG_STATUS, "pending")
        if self.status[member_id] in OPEN_STATUSES and run.info.status in ("RUNNING", "KILLED"):
            self.client.update_run(run.info.run_id, status="SCHEDULED")     # until its trial starts again
        history = self.client.get_metric_history(run.info.run_id, "radius")
        if history:
            self.last_step[member_id] = max(m.step for m in history)

    def _create_member(self, experiment_id: str, member_id: str, config: dict) -> None:
        run = self.client.create_run(experiment_id, run_name=layout.member_run_name(member_id, config), tags={
            layout.TAG_PARENT_RUN: self.parent_id, layout.TAG_ROLE: layout.ROLE_MEMBER,
            layout.TAG_MEMBER_ID: member_id, layout.TAG_SWEEP_ID: self.sweep_id,
            layout.TAG_STATUS: "pending", **self.source_tags})
        self.client.update_run(run.info.run_id, status="SCHEDULED")           # RUNNING when its trial starts
        self.child[member_id] = run.info.run_id
        self.status[member_id] = "pending"
        self._log_params(run.info.run_id, config)

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(k, layout.encode_param(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + PARAMS_PER_BATCH])

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
        ids = result.get("member_ids") or []
        for index, member_id in enumerate(ids):
            run_id = self.child.get(member_id)
            if run_id is None:
                continue
            if member_id not in self.d_logged and result.get("D"):
                self._write("log_param", run_id, key="D", value=str(int(result["D"])))   # same on a resume
                self.d_logged.add(member_id)
            metrics = self._new_metrics(member_id, index, len(ids), result.get("events") or [])
            for j in range(0, len(metrics), MAX_BATCH):
                self._write("log_batch", run_id, metrics=metrics[j:j + MAX_BATCH])
            self._note_regime(member_id, _per_member(result, "regime", len(ids))[index])
            status = _per_member(result, "status", len(ids))[index]
            if status and status != self.status.get(member_id):
                self._set_status(member_id, status)

    def _new_metrics(self, member_id: str, index: int, count: int, events: list) -> list[list]:
        """[key, value, timestamp, step] of member ``index``'s rows and running rows in ``events`` that
        come after the last step logged for it; remembers the last row."""
        now = int(time.time() * 1000)
        metrics = []
        for event in events:
            last = self.last_step.get(member_id, -1)
            for row in _per_member(event, "running", count, empty=[])[index]:
                if row["iteration"] > last:
                    metrics += [[layout.running_metric(k), float(v), now, int(row["iteration"])]
                                for k, v in row.items() if k != "iteration" and _finite(v)]
            row = _per_member(event, "rows", count)[index]
            step = int(event["iteration"])
            if row is not None and step > last:
                metrics += [[k, float(v), now, step] for k, v in row.items() if k != "iteration" and _finite(v)]
                self.last_step[member_id] = step
                self.last_row[member_id] = row
        return metrics

    def _note_regime(self, member_id: str, regime: str | None) -> None:
        if regime == "converged" and self.regime.get(member_id) != regime:
            # shown while the member trains on (the papers' OP runs keep going after converging)
            self._write("set_tag", self.child[member_id], key=layout.TAG_REGIME, value=regime)
        if regime is not None:
            self.regime[member_id] = regime

    def _set_status(self, member_id: str, status: str) -> None:
        run_id = self.child.get(member_id)
        if run_id is None:
            return
        self.status[member_id] = status
        self._write("set_tag", run_id, key=layout.TAG_STATUS, value=status)
        if status == "running":
            self._write("update_run", run_id, status="RUNNING")
        if status in FINAL:
            self._write("set_tag", run_id, key=layout.TAG_REGIME,
                        value="failed" if status == "failed" else regime_of(status, self.last_row.get(member_id),
                                                                              self.regime.get(member_id)))
            self._write("set_terminated", run_id, status="FAILED" if status == "failed" else "FINISHED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        for member_id, _ in trial.config["trial"]["members"]:
            if self.status.get(member_id) in OPEN_STATUSES:
                self._set_status(member_id, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        for member_id, _ in trial.config["trial"]["members"]:
            if self.status.get(member_id) not in ENDED:
                self._set_status(member_id, "failed")
                if trial.error_file:
                    try:
                        text = Path(trial.error_file).read_text()[-4000:]
                        self._write("set_tag", self.child[member_id], key=layout.TAG_ERROR, value=text)
                    except OSError:
                        pass

    def on_experiment_end(self, trials, **info):
        self.reconcile(trials)
        self.close()
        self.drain(END_WAIT_S)

    def reconcile(self, trials) -> None:
        """Bring MLflow in line with Tune's own record of each trial.

        Tune saves its experiment state independently of this callback, so an interrupted driver
        (a second Ctrl-C, a killed process) can leave a trial TERMINATED in Tune's state while its
        members still read ``running`` here; ``--resume`` then has nothing to rerun for it. Called at
        the end of every run, including a resume: a finished trial's last result is logged again
        (already-logged steps are skipped) and its members still open are closed."""
        for trial in trials:
            ids = [m for m, _ in trial.config["trial"]["members"]]
            if not any(self.status.get(m) in OPEN_STATUSES for m in ids):
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
        unfinished = [m for m, s in self.status.items() if s in OPEN_STATUSES]
        for member_id in unfinished:
            if self.status[member_id] == "running":     # stopped mid-run: KILLED until a resume restarts it
                self._write("set_terminated", self.child[member_id], status="KILLED")
        self._write("set_tag", self.parent_id, key=layout.TAG_SWEEP_STATUS,
                    value="interrupted" if unfinished else "finished")
        self._write("set_terminated", self.parent_id, status="KILLED" if unfinished else "FINISHED")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for status in self.status.values():
            out[status] = out.get(status, 0) + 1
        return out


def member_statuses(tracking_uri: str, experiment: str, sweep_id: str) -> dict[str, str]:
    """{member id: its status tag} of one sweep's member runs, as the store has them."""
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], max_results=50000, filter_string=layout.tags_equal(
        {layout.TAG_SWEEP_ID: sweep_id, layout.TAG_ROLE: layout.ROLE_MEMBER}))
    return {run.data.tags[layout.TAG_MEMBER_ID]: run.data.tags.get(layout.TAG_STATUS, "pending") for run in runs}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.tracking",
                                description="Write a sweep's saved MLflow buffer to the store.")
    commands = p.add_subparsers(dest="command", required=True)
    replay_parser = commands.add_parser("replay", help="send the writes saved in FILE (mlflow-buffer-*.jsonl), "
                                                       "in order")
    replay_parser.add_argument("file")
    replay_parser.add_argument("--tracking-uri", required=True)
    source_parser = commands.add_parser(
        "record-source", help=f"write this checkout's commit and diff to ./{SOURCE_FILE}, for "
                              "`ray job submit --working-dir .` (whose upload has no .git)")
    source_parser.add_argument("--repo", default=".", help="the checkout (default: the current directory)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "record-source":
        info = record_source(Path(args.repo), Path.cwd() / SOURCE_FILE)
        print(f"{SOURCE_FILE}: commit {info['commit']}" + (" (uncommitted changes recorded)" if info["diff"] else ""))
        return 0
    if not Path(args.file).is_file():
        print(f"error: {args.file} not found (nothing to replay)", file=sys.stderr)
        return 2
    try:
        count = replay(args.file, args.tracking_uri)
    except Exception as error:      # noqa: BLE001
        print(f"error: the store at {args.tracking_uri} did not take every write ({short_error(error)}); the "
              f"rest stays in {args.file}: run the same command again when the store answers", file=sys.stderr)
        return 1
    print(f"wrote {count} buffered MLflow writes to {args.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
