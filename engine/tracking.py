"""MLflow from the driver only: a Tune callback that turns trial results into runs.

Layout (docs/DESIGN.md, "MLflow layout"): one parent run per sweep, one child run per member, params
under the member keys, every metric a series with ``step = iteration``, running metrics as
``running/<name>``. Trials never talk to MLflow, so a SQLite store is safe and no credentials reach the
workers. After a retry or a resumed sweep a trial reports some log steps again; rows at or before the
last step already logged for a member are skipped, so every series has one value per step.

Tracking outages only delay a sweep. Every write goes through one ordered queue: while the store does
not answer, writes wait in memory (at most ``THERMOSWEEP_TRACKING_BUFFER`` operations), the driver says
so once and keeps running, and when the store answers again everything is written in order. MLflow's
own HTTP retries (minutes) are bounded for the driver, so a retry never freezes Tune. If the buffer
fills, or the store is still down when the sweep ends (after ``THERMOSWEEP_TRACKING_END_WAIT_S``), the
writes go to a JSON-lines file next to the sweep's state, and ``python -m engine.tracking replay FILE``
writes them once the store is back.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from ray.tune import Callback

from trainables.runner import ENDED, FINAL

MAX_BATCH = 900     # MLflow accepts up to 1000 metrics per log_batch call
RUNNING = "running/"
# the driver's MLflow HTTP client: no retry loop of its own (the queue below retries), bounded requests
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
RETRY_EVERY_S = 2.0             # while the store is down, try again at most this often
BUFFER_OPS = int(os.environ.get("THERMOSWEEP_TRACKING_BUFFER", "200000"))
END_WAIT_S = float(os.environ.get("THERMOSWEEP_TRACKING_END_WAIT_S", "120"))
# MLflow error codes that mean "this write is wrong", not "the store is away": such a write is dropped
# with a warning instead of holding up the queue
REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
            "INVALID_STATE"}
MODEL_TRAINING_KIND = {"mlflow.experimentKind": "custom_model_development"}   # MLflow 3 UI: the runs table


def _param_value(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v)


def _git(path: Path, *args) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)
        return out.stdout if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit(path: Path) -> str:
    return _git(path, "rev-parse", "HEAD").strip() or "unknown"


SOURCE_FILE = "thermosweep_source.json"     # the submitting machine's git state, shipped in the working dir


def source_info(path: Path) -> dict:
    """{"commit", "branch", "diff"} of the code that runs: the checkout at ``path`` when it is a git
    work tree; else the file ``record_source`` wrote on the submitting machine (``ray job submit
    --working-dir .`` uploads no .git), found in the working directory; else $THERMOSWEEP_GIT_COMMIT."""
    commit = _git(path, "rev-parse", "HEAD").strip()
    if commit:
        branch = _git(path, "rev-parse", "--abbrev-ref", "HEAD").strip()
        return {"commit": commit, "branch": "" if branch == "HEAD" else branch, "diff": _git(path, "diff", "HEAD")}
    shipped = Path.cwd() / SOURCE_FILE
    if shipped.is_file():
        return json.loads(shipped.read_text())
    return {"commit": os.environ.get("THERMOSWEEP_GIT_COMMIT", "unknown"), "branch": "", "diff": ""}


def record_source(path: Path, out: Path) -> dict:
    """On the submitting machine: write the checkout's commit, branch and uncommitted diff to ``out``."""
    info = source_info(path)
    out.write_text(json.dumps(info))
    return info


def source_tags(info: dict, entry_point: str = "engine.sweep") -> dict:
    """MLflow's standard ``mlflow.source.*`` tags for a sweep of the code described by ``info``."""
    from mlflow.utils import mlflow_tags as t
    tags = {t.MLFLOW_SOURCE_NAME: entry_point, t.MLFLOW_SOURCE_TYPE: "LOCAL", t.MLFLOW_GIT_COMMIT: info["commit"]}
    if info.get("branch"):
        tags[t.MLFLOW_GIT_BRANCH] = info["branch"]
    return tags


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


class MLflowTracker(Callback):
    """Picklable (it is stored with Tune's experiment state); the MLflow client is made in ``setup``."""

    def __init__(self, tracking_uri: str, experiment: str, grid_text: str, grid_name: str,
                 members: list[tuple[str, dict]], sweep_id: str, tags: dict | None = None,
                 params: dict | None = None, spill_dir: str | None = None, artifacts: dict | None = None):
        self.tracking_uri, self.experiment, self.grid_text = tracking_uri, experiment, grid_text
        self.grid_name, self.members, self.sweep_id = grid_name, members, sweep_id
        self.tags, self.params = dict(tags or {}), dict(params or {})
        self.source_tags = {k: v for k, v in self.tags.items() if k.startswith("mlflow.source.")}
        self.parent_id: str | None = None
        self.child: dict[str, str] = {}
        self.last_step: dict[str, int] = {}
        self.last_row: dict[str, dict] = {}
        self.status: dict[str, str] = {}
        self.regime: dict[str, str] = {}       # what the runner says (network runners), per member
        self.d_logged: set[str] = set()
        self.spill_dir = spill_dir
        self.artifacts = {"grid.yaml": grid_text, **(artifacts or {})}     # text files of the parent run
        self._client = None
        self._queue: collections.deque = collections.deque()
        self._down_since: float | None = None
        self._next_try = 0.0
        self._spill: Path | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        state["_queue"] = collections.deque()
        state["_down_since"], state["_spill"] = None, None
        return state

    # ---- set-up -------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            for k, v in HTTP_ENV.items():
                os.environ.setdefault(k, v)
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # ---- the ordered write queue --------------------------------------------------------------
    def _write(self, op: str, run_id: str, **kw) -> None:
        """Queue one write (``op`` names an MlflowClient method) and send what the store takes now."""
        self._queue.append({"op": op, "run_id": run_id, **kw})
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send queued writes in order; True when the queue is empty. While the store is down this
        tries at most every RETRY_EVERY_S (or now, with ``force``)."""
        if self._spill is not None:
            self._spill_queue()
            return False
        if self._down_since is not None and not force and time.monotonic() < self._next_try:
            return self._check_bound()
        while self._queue:
            try:
                apply_op(self.client, self._queue[0])
            except Exception as e:      # noqa: BLE001 - an outage is whatever the client raises
                if _rejected(e):
                    print(f"tracking: MLflow refused {self._queue[0]['op']} for run {self._queue[0]['run_id']} "
                          f"({_short(e)}); skipped", file=sys.stderr)
                    self._queue.popleft()
                    continue
                self._outage(e)
                return self._check_bound()
            self._queue.popleft()
        if self._down_since is not None:
            print(f"tracking: the MLflow store at {self.tracking_uri} answers again after "
                  f"{time.monotonic() - self._down_since:.0f} s; every buffered result is written", file=sys.stderr)
            self._down_since = None
        return True

    def _outage(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            print(f"tracking: the MLflow store at {self.tracking_uri} does not answer ({_short(error)}). "
                  f"The sweep keeps running; results wait in memory (up to {BUFFER_OPS} writes) and are "
                  f"written in order when the store answers again (tried every {RETRY_EVERY_S:.0f} s).",
                  file=sys.stderr)
        self._next_try = time.monotonic() + RETRY_EVERY_S

    def _check_bound(self) -> bool:
        if len(self._queue) > BUFFER_OPS:
            self.give_up(f"more than {BUFFER_OPS} writes waited")
        return False

    def spill_path(self) -> Path:
        return Path(self.spill_dir or ".").resolve() / f"mlflow-buffer-{self.sweep_id}.jsonl"

    def give_up(self, why: str) -> None:
        """Move the queue (and every later write) to a file that ``replay`` sends to the store."""
        self._spill = self.spill_path()
        self._spill.parent.mkdir(parents=True, exist_ok=True)
        self._spill_queue()
        print(f"tracking: the MLflow store at {self.tracking_uri} is still unreachable ({why}); its writes "
              f"are saved in {self._spill}. The sweep goes on. When the store is back, write them with:\n"
              f"  {replay_command(self._spill, self.tracking_uri)}", file=sys.stderr)

    def _spill_queue(self) -> None:
        with open(self._spill, "a") as f:
            while self._queue:
                f.write(json.dumps(self._queue.popleft()) + "\n")

    def drain(self, wait_s: float) -> None:
        """At the end of a sweep: keep trying for up to ``wait_s`` seconds, then save what is left."""
        deadline = time.monotonic() + wait_s
        while not self.flush(force=True) and self._spill is None and time.monotonic() < deadline:
            time.sleep(min(RETRY_EVERY_S, max(0.0, deadline - time.monotonic())))   # retry pacing
        if self._queue and self._spill is None:
            self.give_up(f"still down {wait_s:.0f} s after the sweep ended")
        elif self._spill is not None:
            print(f"tracking: writes of this sweep wait in {self._spill}; when the store is back run\n"
                  f"  {replay_command(self._spill, self.tracking_uri)}", file=sys.stderr)

    def setup(self, **info) -> None:
        self.open()

    def open(self) -> None:
        """Create (or, on resume, find again) the parent run and one child run per member."""
        c = self.client
        exp = c.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else c.create_experiment(self.experiment, tags=MODEL_TRAINING_KIND)
        if exp is not None and exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp_id)
        if exp is not None and not MODEL_TRAINING_KIND.items() <= exp.tags.items():
            for k, v in MODEL_TRAINING_KIND.items():
                c.set_experiment_tag(exp_id, k, v)
        found = c.search_runs([exp_id], filter_string=f"tags.`thermosweep.sweep_id` = '{self.sweep_id}' "
                                                      "and tags.`thermosweep.role` = 'sweep'")
        if found:
            self.parent_id = found[0].info.run_id
            c.update_run(self.parent_id, status="RUNNING")
        else:
            run = c.create_run(exp_id, run_name=f"sweep {self.grid_name} {self.sweep_id}", tags={
                "thermosweep.role": "sweep", "thermosweep.sweep_id": self.sweep_id,
                "thermosweep.grid": self.grid_name, **self.tags, **self.source_tags})
            self.parent_id = run.info.run_id
            for name, text in self.artifacts.items():
                c.log_text(self.parent_id, text, name)
            self._log_params(self.parent_id, self.params)
        c.set_tag(self.parent_id, "thermosweep.sweep_status", "running")
        existing = {r.data.tags.get("thermosweep.member_id"): r for r in c.search_runs(
            [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'", max_results=50000)}
        for member_id, cfg in self.members:
            run = existing.get(member_id)
            if run is not None:
                self.child[member_id] = run.info.run_id
                self.status[member_id] = run.data.tags.get("thermosweep.status", "pending")
                if self.status[member_id] in ("pending", "running") and run.info.status in ("RUNNING", "KILLED"):
                    c.update_run(run.info.run_id, status="SCHEDULED")     # until its trial starts again
                hist = c.get_metric_history(run.info.run_id, "radius")
                if hist:
                    self.last_step[member_id] = max(m.step for m in hist)
                continue
            name = f"{member_id} " + " ".join(f"{k}={cfg[k]}" for k in ("model", "width", "protocol", "lr", "wd")
                                             if k in cfg)
            run = c.create_run(exp_id, run_name=name, tags={
                "mlflow.parentRunId": self.parent_id, "thermosweep.role": "member",
                "thermosweep.member_id": member_id, "thermosweep.sweep_id": self.sweep_id,
                "thermosweep.status": "pending", **self.source_tags})
            c.update_run(run.info.run_id, status="SCHEDULED")           # RUNNING when its trial starts
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
        now = int(time.time() * 1000)
        ids = result.get("member_ids") or []
        events = result.get("events") or []
        for i, member_id in enumerate(ids):
            run_id = self.child.get(member_id)
            if run_id is None:
                continue
            if member_id not in self.d_logged and result.get("D"):
                self._write("log_param", run_id, key="D", value=str(int(result["D"])))   # same on a resume
                self.d_logged.add(member_id)
            metrics = []
            for ev in events:
                last = self.last_step.get(member_id, -1)
                for r in (ev.get("running") or [[]] * len(ids))[i]:
                    if r["iteration"] > last:
                        metrics += [[RUNNING + k, float(v), now, int(r["iteration"])]
                                    for k, v in r.items() if k != "iteration" and _finite(v)]
                row = (ev.get("rows") or [None] * len(ids))[i]
                step = int(ev["iteration"])
                if row is not None and step > last:
                    metrics += [[k, float(v), now, step] for k, v in row.items()
                                if k != "iteration" and _finite(v)]
                    self.last_step[member_id] = step
                    self.last_row[member_id] = row
            for j in range(0, len(metrics), MAX_BATCH):
                self._write("log_batch", run_id, metrics=metrics[j:j + MAX_BATCH])
            regime = (result.get("regime") or [None] * len(ids))[i]
            if regime == "converged" and self.regime.get(member_id) != regime:
                # shown while the member trains on (the papers' OP runs keep going after converging)
                self._write("set_tag", run_id, key="thermosweep.regime", value=regime)
            if regime is not None:
                self.regime[member_id] = regime
            status = (result.get("status") or [None] * len(ids))[i]
            if status and status != self.status.get(member_id):
                self._set_status(member_id, status)

    def _set_status(self, member_id: str, status: str) -> None:
        run_id = self.child.get(member_id)
        if run_id is None:
            return
        self.status[member_id] = status
        self._write("set_tag", run_id, key="thermosweep.status", value=status)
        if status == "running":
            self._write("update_run", run_id, status="RUNNING")
        if status in FINAL:
            self._write("set_tag", run_id, key="thermosweep.regime",
                        value="failed" if status == "failed" else regime_of(status, self.last_row.get(member_id),
                                                                              self.regime.get(member_id)))
            self._write("set_terminated", run_id, status="FAILED" if status == "failed" else "FINISHED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        for member_id, _ in trial.config["trial"]["members"]:
            if self.status.get(member_id) in ("running", "pending"):
                self._set_status(member_id, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        for member_id, _ in trial.config["trial"]["members"]:
            if self.status.get(member_id) not in ENDED:
                self._set_status(member_id, "failed")
                if trial.error_file:
                    try:
                        text = Path(trial.error_file).read_text()[-4000:]
                        self._write("set_tag", self.child[member_id], key="thermosweep.error", value=text)
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
        for m in unfinished:
            if self.status[m] == "running":          # stopped mid-run: KILLED until a resume restarts it
                self._write("set_terminated", self.child[m], status="KILLED")
        self._write("set_tag", self.parent_id, key="thermosweep.sweep_status",
                    value="interrupted" if unfinished else "finished")
        self._write("set_terminated", self.parent_id, status="KILLED" if unfinished else "FINISHED")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.status.values():
            out[s] = out.get(s, 0) + 1
        return out


def member_statuses(tracking_uri: str, experiment: str, sweep_id: str) -> dict[str, str]:
    """{member id: thermosweep.status} of one sweep's member runs, as the store has them."""
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)
    from mlflow.tracking import MlflowClient
    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = c.search_runs([exp.experiment_id], max_results=50000, filter_string=(
        f"tags.`thermosweep.sweep_id` = '{sweep_id}' and tags.`thermosweep.role` = 'member'"))
    return {r.data.tags["thermosweep.member_id"]: r.data.tags.get("thermosweep.status", "pending") for r in runs}


def apply_op(client, op: dict) -> None:
    """Send one queued write (a JSON-able dict, see ``MLflowTracker._write``) with ``client``."""
    kw = {k: v for k, v in op.items() if k not in ("op", "run_id")}
    if op["op"] == "log_batch":
        from mlflow.entities import Metric
        client.log_batch(op["run_id"], metrics=[Metric(*m) for m in kw["metrics"]])
    elif op["op"] in ("set_tag", "log_param", "set_terminated", "update_run"):
        getattr(client, op["op"])(op["run_id"], **kw)
    else:
        raise ValueError(f"unknown tracking operation {op['op']!r}")


def _rejected(e: Exception) -> bool:
    return getattr(e, "error_code", None) in REJECTED


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def replay_command(path, tracking_uri) -> str:
    return f"python -m engine.tracking replay {path} --tracking-uri {tracking_uri}"


def replay(path, tracking_uri: str) -> int:
    """Write a saved buffer to the store, in order. What could not be written stays in the file (so the
    command can simply be run again); returns the number of writes sent."""
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking_uri)
    path = Path(path)
    ops = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    sent = 0
    try:
        for op in ops:
            try:
                apply_op(client, op)
            except Exception as e:      # noqa: BLE001
                if not _rejected(e):
                    raise
                print(f"MLflow refused {op['op']} for run {op['run_id']} ({_short(e)}); skipped", file=sys.stderr)
            sent += 1
    finally:
        rest = ops[sent:]
        if rest:
            path.write_text("".join(json.dumps(op) + "\n" for op in rest))
        else:
            path.unlink()
    return sent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.tracking",
                                description="Write a sweep's saved MLflow buffer to the store.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("replay", help="send the writes saved in FILE (mlflow-buffer-*.jsonl), in order")
    r.add_argument("file")
    r.add_argument("--tracking-uri", required=True)
    rs = sub.add_parser("record-source", help=f"write this checkout's commit and diff to ./{SOURCE_FILE}, for "
                                             "`ray job submit --working-dir .` (whose upload has no .git)")
    rs.add_argument("--repo", default=".", help="the checkout (default: the current directory)")
    args = p.parse_args(argv)
    if args.command == "record-source":
        info = record_source(Path(args.repo), Path.cwd() / SOURCE_FILE)
        print(f"{SOURCE_FILE}: commit {info['commit']}" + (" (uncommitted changes recorded)" if info["diff"] else ""))
        return 0
    if not Path(args.file).is_file():
        print(f"error: {args.file} not found (nothing to replay)", file=sys.stderr)
        return 2
    try:
        n = replay(args.file, args.tracking_uri)
    except Exception as e:      # noqa: BLE001
        print(f"error: the store at {args.tracking_uri} did not take every write ({_short(e)}); the rest stays "
              f"in {args.file}: run the same command again when the store answers", file=sys.stderr)
        return 1
    print(f"wrote {n} buffered MLflow writes to {args.tracking_uri}")
    return 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


if __name__ == "__main__":
    sys.exit(main())
