"""Run a grid: ``python -m engine.sweep grids/demo.yaml [--dry-run] [--set key=value ...]``.

The grid is checked completely before anything starts (exit status 2 on any problem, no Ray started,
nothing written to MLflow). Then every trial of the grid becomes one Ray Tune trial asking for the
grid's ``resources`` (fractional GPUs pack several trials on one GPU), snapshots go to the per-node
entropy reservoirs, and the driver logs everything to MLflow. With no ``--address`` a local Ray is
started; with no ``--tracking-uri`` MLflow writes ``sqlite:///mlflow.db`` in the working directory.
``--resume`` continues an interrupted sweep through Tune's own restore: finished trials are not run
again, running ones continue from their last checkpoint.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from pathlib import Path

from engine.config import GridError, check_resources, load_grid

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_STORAGE = "ray_results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid YAML file, e.g. grids/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a grid setting, e.g. --set iterations=1500 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the member/trial table and resource plan")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: grid's, $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--storage-path", default=None, help="where Tune keeps sweep state (default ./ray_results)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP_DIR",
                   help="continue an interrupted sweep (the newest one of this experiment by default)")
    p.add_argument("--max-concurrent", type=int, default=None, help="at most this many trials at once")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (no --address)")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs of the local Ray (no --address); may be logical, for testing packing")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune's progress output")
    return p


def tracking_uri_for(args, grid) -> str:
    return args.tracking_uri or grid.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _absolute_sqlite(uri: str) -> str:
    """Tune runs callbacks in the driver, but pin relative SQLite paths to the directory we started in."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def find_sweep_dir(storage: Path, experiment: str, wanted: str) -> Path:
    if wanted != "latest":
        path = Path(wanted).resolve()
        if not (path / "tuner.pkl").exists():
            raise FileNotFoundError(f"--resume {wanted}: no Tune sweep state (tuner.pkl) in {path}")
        return path
    candidates = sorted((p for p in storage.glob(f"{experiment}_*") if (p / "tuner.pkl").exists()),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--resume: no earlier sweep of experiment '{experiment}' under {storage}; "
                                "run without --resume to start one")
    return candidates[-1]


def run_sweep(grid, *, address=None, tracking_uri=DEFAULT_TRACKING_URI, storage_path=None, resume=None,
              max_concurrent=None, num_cpus=None, num_gpus=None, verbose=1, _fault_kill_at=None):
    """Run (or resume) a sweep; returns a summary dict. Starts Ray if it is not running yet."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")   # MLflow is our only logger
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")                  # the table reporter below
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    import ray
    from ray import tune

    from engine.reservoir import get_reservoir, shutdown_reservoirs
    from engine.tracking import MLflowTracker, git_commit
    from engine.trainable import train_bundle

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            # a local Ray would have these resources: check before starting it
            import torch
            local = {"CPU": num_cpus or os.cpu_count() or 1,
                     "GPU": num_gpus if num_gpus is not None else torch.cuda.device_count()}
            problems = check_resources(grid, local)
            if problems:
                raise GridError(problems, grid.path)
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
    problems = check_resources(grid, ray.cluster_resources())
    if problems and not address:
        raise GridError(problems, grid.path)
    for p in problems:
        print(f"warning: {p} (the autoscaler may add such nodes)", file=sys.stderr)

    where = storage_path or grid.storage_path or DEFAULT_STORAGE
    if "://" in str(where):             # e.g. s3://bucket/sweeps: Tune handles it, resume needs a path
        if resume:
            raise FileNotFoundError("--resume needs a local or shared-filesystem --storage-path; "
                                    "with a URI, restore with ray.tune.Tuner.restore(URI, ...) directly")
        storage = where
    else:
        storage = Path(where).resolve()
        storage.mkdir(parents=True, exist_ok=True)
    res = {"cpu": float(grid.resources.get("cpu", 1)), "gpu": float(grid.resources.get("gpu", 0))}
    trainable = tune.with_resources(train_bundle, res)
    trials = grid.trials()
    members = [m for t in trials for m in t["members"]]

    if resume:
        sweep_dir = find_sweep_dir(storage, grid.experiment, resume)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        sweep_id = sweep_dir.name
    else:
        sweep_id = f"{grid.experiment}_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        tracker = MLflowTracker(
            tracking_uri=tracking_uri, experiment=grid.experiment, grid_text=grid.source_text,
            grid_name=Path(grid.path).name if grid.path else grid.experiment, members=members,
            sweep_id=sweep_id,
            tags={"thermosweep.git_commit": git_commit(Path(__file__).parent),
                  "thermosweep.description": grid.description or ""},
            params={"bundle": grid.bundle, "n_members": len(members), "n_trials": len(trials),
                    "axes": {k: v for k, v in grid.axes.items()}, "overrides": grid.overrides,
                    "resources": res})
        param_space = {
            "trial": tune.grid_search(trials),
            "sweep_id": sweep_id,
            "checkpoint_every": grid.checkpoint_every,
            "cpus_per_trial": res["cpu"],
            "_fault_kill_at": _fault_kill_at,
        }
        limit = max_concurrent or grid.max_concurrent
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=limit,
                trial_name_creator=lambda t: t.config["trial"]["trial_id"],
                trial_dirname_creator=lambda t: t.config["trial"]["trial_id"]),
            run_config=tune.RunConfig(
                name=sweep_id, storage_path=str(storage), callbacks=[tracker], verbose=verbose,
                progress_reporter=tune.CLIReporter(
                    metric_columns={"iteration": "iteration", "train_loss": "train loss",
                                    "members_running": "members running"},
                    parameter_columns={"sweep_id": "sweep"}, max_report_frequency=30),
                failure_config=tune.FailureConfig(max_failures=grid.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    if any(cfg.get("entropy") for _, cfg in members):
        # start each node's reservoir now, so that its process comes up while the first trials do
        for node in ray.nodes():
            if node.get("Alive"):
                get_reservoir(node["NodeID"]).pid.remote()
    try:
        results = tuner.fit()
    finally:
        shutdown_reservoirs()
    summary = summarise(results, tracking_uri, sweep_id, f"{storage}/{sweep_id}", grid.experiment,
                        [mid for mid, _ in members])
    return summary


def summarise(results, tracking_uri, sweep_id, sweep_dir, experiment, member_ids) -> dict:
    """Member counts by final status. Every member of the grid is counted: Tune creates grid trials
    lazily, so after an interruption ``results`` may lack trials that never started; those members,
    like any without a final status, are unfinished."""
    counts = {"done": 0, "diverged": 0, "converged": 0, "stopped": 0, "failed": 0, "unfinished": 0}
    seen: set = set()
    for r in results:
        metrics = r.metrics or {}
        trial = (r.config or {}).get("trial") or {}
        ids = metrics.get("member_ids") or [mid for mid, _ in trial.get("members", [])]
        status = metrics.get("status")
        if r.error is not None:
            counts["failed"] += len(ids)
            seen.update(ids)
            continue
        for mid, s in zip(ids, status or []):
            if s in ("done", "diverged", "converged", "stopped", "failed"):
                counts[s] += 1
                seen.add(mid)
    counts["unfinished"] += len(set(member_ids) - seen)
    return {"sweep_id": sweep_id, "sweep_dir": str(sweep_dir), "tracking_uri": tracking_uri,
            "experiment": experiment, "members": counts}


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        grid = load_grid(args.grid, overrides=args.overrides)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        print("Nothing was started. Fix the grid (or the --set values) and run again.", file=sys.stderr)
        return 2
    except FileNotFoundError:
        print(f"error: grid file {args.grid} not found", file=sys.stderr)
        return 2
    if args.max_concurrent is not None and args.max_concurrent < 1:
        p.error("--max-concurrent must be ≥ 1")
    for w in grid.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.dry_run:
        print(grid.table())
        print()
        print(grid.resource_plan())
        return 0
    uri = _absolute_sqlite(tracking_uri_for(args, grid))
    try:
        summary = run_sweep(grid, address=args.address, tracking_uri=uri, storage_path=args.storage_path,
                            resume=args.resume, max_concurrent=args.max_concurrent,
                            num_cpus=args.num_cpus, num_gpus=args.num_gpus, verbose=args.verbose)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = summary["members"]
    print(f"\nsweep {summary['sweep_id']}: {c['done']} done, {c['converged']} converged, {c['stopped']} stopped, "
          f"{c['diverged']} diverged, {c['failed']} failed, {c['unfinished']} unfinished")
    print(f"MLflow: experiment '{summary['experiment']}' at {summary['tracking_uri']} "
          f"(browse: mlflow ui --backend-store-uri {summary['tracking_uri']})")
    print(f"Tune state: {summary['sweep_dir']} (continue an interrupted sweep with --resume)")
    print(f"Report: python -m analysis.report --experiment {summary['experiment']} "
          f"--tracking-uri {summary['tracking_uri']}")
    return 1 if c["failed"] or c["unfinished"] else 0


if __name__ == "__main__":
    sys.exit(main())
