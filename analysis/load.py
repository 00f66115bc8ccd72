"""Read one sweep back from MLflow (its layout: engine.layout, docs/DESIGN.md "MLflow layout").

    sweep = load_experiment("demo")                      # newest parent run of the experiment
    sweep.members      # one row per member run (index run_id): params, D, status, regime, flags
    sweep.series       # one row per (run_id, iteration): one column per log metric
    sweep.running      # same for the running metrics (``running/<name>`` → ``<name>``)
    sweep.stationary   # one row per usable member: mean of the last W logs of each metric
    sweep.excluded     # run_id → why the member is not in ``stationary``

Fetching (our choice): runs come from ``MlflowClient.search_runs`` (paged). Metric histories
come from the tracking store's ``get_metric_history_bulk(run_ids, key, ...)`` when the store
has it (the SQL store of MLflow 3.x does: one query per metric key for all members at once),
otherwise from ``MlflowClient.get_metric_history`` per (run, key) on a small thread pool
(REST servers). The public ``get_metric_history_bulk_interval`` APIs down-sample, so they
are not used. A value logged twice at one step (a resumed trial) keeps the later one.

Stationary value (docs/theory.md §3): mean over the last W logs of each metric, counted per metric
(entropy is only logged once its window is complete). W defaults per log schedule
(``default_window``): 30 for ``ideal_gas``, 50 for ``free_energy`` and the others, and for
``log:N`` the same share of its N log-spaced points as 50 is of free_energy's 193 (at least 3).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from engine import layout
from trainables.schedule import FREE_ENERGY_POINTS, point_count

BAD_STATUS = {"diverged", "failed"}
WINDOW_IDEAL_GAS, WINDOW_DEFAULT = 30, 50
_CHUNK = 500      # run ids per bulk query (keeps SQLite's bound-parameter count small)


class SweepNotFound(ValueError):
    """The experiment, parent run or member runs asked for do not exist."""


@dataclass
class Sweep:
    experiment: str
    experiment_id: str
    tracking_uri: str | None
    parent: dict | None            # run_id, status, start_time, tags, params (None: no parent run)
    members: pd.DataFrame          # index run_id
    series: pd.DataFrame           # columns run_id, iteration, <metrics>
    running: pd.DataFrame          # columns run_id, iteration, <running metrics without prefix>
    stationary: pd.DataFrame       # index run_id; <metrics>, window, n_logs, last_iteration
    excluded: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def metric_names(self):
        return [c for c in self.series.columns if c not in ("run_id", "iteration")]


# -----------------------------------------------------------------------------
# windows

def default_window(log_schedule):
    """W of docs/theory.md §3: 30 for the ideal-gas schedule, 50 for the free-energy one (50 of its 193
    log-spaced points). A shorter ``log:N`` schedule keeps the same fraction of its N log-spaced
    points (at least 3), so its window covers the same share of the run in log-iterations."""
    text = str(log_schedule)
    if text.startswith("ideal_gas"):
        return WINDOW_IDEAL_GAS
    if text.startswith("log:"):
        try:
            return max(3, round(point_count(text) * WINDOW_DEFAULT / FREE_ENERGY_POINTS))
        except ValueError:       # not a valid log:N (the grid check refuses those before a run)
            pass
    return WINDOW_DEFAULT


# -----------------------------------------------------------------------------
# MLflow access

def _client(tracking_uri):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri)


def _search_all(client, experiment_id, filter_string, order_by=None):
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _find_experiment(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise SweepNotFound(f"no MLflow experiment named {experiment!r} at this tracking URI; "
                            f"existing experiments: {', '.join(names) or '(none)'}. "
                            "Pass --experiment with one of them (or the right --tracking-uri)")
    return exp


def _fetch_histories(client, keys_by_run):
    """Long DataFrame (run_id, key, step, value, timestamp) of every (run, key) history.

    keys_by_run: run_id → metric keys to fetch for that run.
    """
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    run_ids = list(keys_by_run)
    parts = []
    if hasattr(store, "get_metric_history_bulk"):
        for key in sorted({k for ks in keys_by_run.values() for k in ks}):
            for a in range(0, len(run_ids), _CHUNK):
                rows = store.get_metric_history_bulk(run_ids[a:a + _CHUNK], key, None)
                if rows:
                    parts.append(pd.DataFrame({
                        "run_id": [r.run_id for r in rows],
                        "key": key,
                        "step": [r.step for r in rows],
                        "value": [r.value for r in rows],
                        "timestamp": [r.timestamp for r in rows]}))
    else:
        def one(job):
            rid, key = job
            ms = client.get_metric_history(rid, key)
            return pd.DataFrame({"run_id": rid, "key": key, "step": [m.step for m in ms],
                                 "value": [m.value for m in ms],
                                 "timestamp": [m.timestamp for m in ms]})
        jobs = [(r, k) for r, ks in keys_by_run.items() for k in ks]
        with ThreadPoolExecutor(max_workers=8) as pool:
            parts = list(pool.map(one, jobs))
    if not parts:
        return pd.DataFrame({"run_id": pd.Series(dtype=object), "key": pd.Series(dtype=object),
                             "step": pd.Series(dtype="int64"), "value": pd.Series(dtype=float),
                             "timestamp": pd.Series(dtype="int64")})
    return pd.concat(parts, ignore_index=True)


def _pivot(long):
    """Long histories → one row per (run_id, iteration), one column per key."""
    if long.empty:
        return pd.DataFrame(columns=["run_id", "iteration"])
    long = (long.sort_values(["run_id", "key", "step", "timestamp"])
                .drop_duplicates(["run_id", "key", "step"], keep="last"))
    wide = long.pivot(index=["run_id", "step"], columns="key", values="value")
    wide.columns.name = None
    wide = wide.reset_index().rename(columns={"step": "iteration"})
    return wide.sort_values(["run_id", "iteration"], ignore_index=True)


# -----------------------------------------------------------------------------
# stationary values

def stationary_means(series, windows):
    """Mean of the last W non-NaN logs of every metric, per member (docs/theory.md §3).

    ``windows`` maps run_id → W. Returns a frame indexed by run_id with one column per metric
    plus ``window``, ``n_logs`` (rows logged) and ``last_iteration``.
    """
    metrics = [c for c in series.columns if c not in ("run_id", "iteration")]
    rids = list(windows)
    out = pd.DataFrame(index=pd.Index(rids, name="run_id"))
    out["window"] = [windows[r] for r in rids]
    g = series.groupby("run_id")
    out["n_logs"] = g.size().reindex(rids).fillna(0).astype(int)
    out["last_iteration"] = g["iteration"].max().reindex(rids)
    w = series["run_id"].map(windows)
    for m in metrics:
        col = series[["run_id", m]][series[m].notna()]
        # position from the end within each member, 0 = last logged value of this metric
        back = col.groupby("run_id").cumcount(ascending=False)
        keep = col[back < w.loc[col.index]]
        out[m] = keep.groupby("run_id")[m].mean().reindex(rids)
    return out


# -----------------------------------------------------------------------------
# the loader

def load_experiment(experiment, tracking_uri=None, stationary_window=None, parent_run=None,
                    load_running=True):
    """Load one sweep of ``experiment`` (DESIGN.md "MLflow layout") into a :class:`Sweep`.

    parent_run: a parent run id; default the newest run tagged ``thermosweep.role=sweep``. With no
    parent run at all, every run tagged ``thermosweep.role=member`` of the experiment is used (a
    note says so). stationary_window: W for every member (default per log schedule, see
    ``default_window``). Raises SweepNotFound (a ValueError) naming what exists instead.
    """
    if stationary_window is not None and (int(stationary_window) != stationary_window
                                          or stationary_window < 1):
        raise ValueError(f"stationary_window must be a positive integer, got {stationary_window}")
    client = _client(tracking_uri)
    exp = _find_experiment(client, experiment)
    notes = []
    parent = _parent_run(client, exp, experiment, parent_run)
    runs = _member_runs(client, exp, experiment, parent, notes)
    members = _members_frame(runs)

    # metric histories: the keys each run has (its latest-value metrics)
    def wanted(key):
        return key != "iteration" and (load_running or not layout.is_running_metric(key))
    long = _fetch_histories(client, {r.info.run_id: [k for k in sorted(r.data.metrics) if wanted(k)]
                                     for r in runs})
    is_running = long["key"].str.startswith(layout.RUNNING_PREFIX)
    series = _pivot(long[~is_running])
    running = _pivot(long[is_running].assign(key=lambda d: d["key"].str[len(layout.RUNNING_PREFIX):]))

    excluded = _exclusions(members, series, long)
    windows = _windows(members, stationary_window)
    keep = {r: w for r, w in windows.items() if r not in excluded}
    stationary = stationary_means(series, keep) if keep else pd.DataFrame(
        index=pd.Index([], name="run_id"))
    n_run = int(members["running"].sum())
    if n_run:
        notes.append(f"{n_run} member(s) still running: their stationary values are provisional")
    members["excluded"] = [excluded.get(r, "") for r in members.index]
    return Sweep(experiment=experiment, experiment_id=exp.experiment_id, tracking_uri=tracking_uri,
                 parent=_parent_dict(parent), members=members, series=series, running=running,
                 stationary=stationary, excluded=excluded, notes=notes)


def _parent_run(client, exp, experiment, parent_run):
    """The parent run asked for (checked to belong to ``experiment``), else the newest one, else None."""
    if parent_run is None:
        found = client.search_runs([exp.experiment_id],
                                   filter_string=layout.tags_equal({layout.TAG_ROLE: layout.ROLE_SWEEP}),
                                   order_by=["attributes.start_time DESC"], max_results=1)
        return found[0] if found else None
    try:
        run = client.get_run(parent_run)
    except Exception as e:                     # mlflow raises MlflowException
        raise SweepNotFound(f"parent run {parent_run!r} not found: {e}") from None
    if run.info.experiment_id != exp.experiment_id:
        raise SweepNotFound(f"run {parent_run} belongs to experiment {run.info.experiment_id}, "
                            f"not {experiment!r}")
    return run


def _parent_dict(run):
    if run is None:
        return None
    return {"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time,
            "tags": dict(run.data.tags), "params": dict(run.data.params)}


def _member_runs(client, exp, experiment, parent, notes):
    """The member runs of ``parent``, or with no parent every member run of the experiment (noted)."""
    if parent is not None:
        runs = _search_all(client, exp.experiment_id,
                           layout.tags_equal({layout.TAG_PARENT_RUN: parent.info.run_id}))
        runs = [r for r in runs if r.data.tags.get(layout.TAG_ROLE, layout.ROLE_MEMBER) == layout.ROLE_MEMBER]
    else:
        notes.append(f"no parent run tagged {layout.TAG_ROLE}={layout.ROLE_SWEEP} in {experiment!r}; "
                     "using every member run of the experiment")
        runs = _search_all(client, exp.experiment_id, layout.tags_equal({layout.TAG_ROLE: layout.ROLE_MEMBER}))
    if not runs:
        where = f"parent run {parent.info.run_id}" if parent else f"experiment {experiment!r}"
        raise SweepNotFound(f"{where} has no member runs (tag {layout.TAG_ROLE}={layout.ROLE_MEMBER}); "
                            "has the sweep started logging?")
    return runs


def _members_frame(runs):
    """One row per member run (index run_id): its decoded params, status, regime and ``running``."""
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "run_name": r.info.run_name,
               "mlflow_status": r.info.status}
        row.update({k: layout.decode_param(k, v) for k, v in r.data.params.items()})
        tag_status = r.data.tags.get(layout.TAG_STATUS)
        if tag_status is None:
            tag_status = {"RUNNING": "running", "FINISHED": "done", "SCHEDULED": "running"}.get(
                r.info.status, "failed")
        row["status"] = tag_status
        row["regime"] = r.data.tags.get(layout.TAG_REGIME)
        row["running"] = tag_status in ("running", "pending") or r.info.status == "RUNNING"
        rows.append(row)
    members = pd.DataFrame(rows).set_index("run_id")
    if "lr" in members:
        members = members.sort_values("lr", kind="stable")
    return members


def _exclusions(members, series, long):
    """run_id → why the member has no stationary values (bad status or regime, no logs, diverged)."""
    loss = long[long["key"] == "train_loss"]
    nonfinite = set(loss.loc[~np.isfinite(loss["value"].astype(float)), "run_id"])
    excluded = {}
    has_rows = set(series["run_id"]) if not series.empty else set()
    for rid, m in members.iterrows():
        if m["status"] in BAD_STATUS:
            excluded[rid] = f"status {m['status']}"
        elif m["regime"] in ("diverged", "failed"):
            excluded[rid] = f"regime {m['regime']}"
        elif rid not in has_rows:
            excluded[rid] = "no log metrics"
        elif rid in nonfinite:
            excluded[rid] = "non-finite train_loss logged (diverged)"
    return excluded


def _windows(members, stationary_window):
    """run_id → W: ``stationary_window`` for all, else each member's ``default_window``."""
    if stationary_window is not None:
        return {r: int(stationary_window) for r in members.index}
    sched = members["log_schedule"] if "log_schedule" in members else pd.Series(dtype=object)
    return {r: default_window(sched.get(r, "free_energy")) for r in members.index}
