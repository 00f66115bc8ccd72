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
import logging
import os
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path

from engine import layout, plan
from engine.grid import GridError, load_grid
from engine.resources import check_resources
from engine.local_ray import LocalRayError, start_local_ray
from engine.preflight import (STORAGE_ENV, check_address, check_datasets, check_experiment, check_storage,
                              check_storage_on_nodes, check_tracking_uri)
from engine.resume import find_sweep_dir
from trainables.runner import ENDED, FINAL

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_STORAGE = "ray_results"


def _sigterm_as_interrupt(signum, frame):
    """SIGTERM stops the sweep the way Ctrl-C does (Tune saves its state, the tracker closes the runs)."""
    os.kill(os.getpid(), signal.SIGINT)


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
    p.add_argument("--cluster-yaml", default=None, metavar="PATH",
                   help="node types the trials may run on: --dry-run plans onto them (default: the "
                        "repository's cluster.yaml); with --address they join the cluster's own nodes "
                        "and its autoscaler's types in the start-up check")
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


def storage_for(storage_path, grid, address=None) -> str:
    """--storage-path, else the grid's, else on a cluster the shared path its head announces in
    $THERMOSWEEP_STORAGE (cluster.yaml sets it), else ./ray_results."""
    shared = os.environ.get(STORAGE_ENV) if address else None
    return str(storage_path or grid.storage_path or shared or DEFAULT_STORAGE)


def check_inputs(grid, *, tracking_uri, storage, address=None, resume=None,
                 dry_run=False) -> tuple[list[str], list[str]]:
    """(problems, notes) about every path-, URI- and data-like input (engine.preflight); nothing starts.
    A dry run plans for wherever the grid will run, so data missing here is a note there, not a problem."""
    problems = (check_experiment(grid.experiment) + check_storage(storage) + check_tracking_uri(tracking_uri)
                + check_address(address))
    if resume and not problems and "://" not in storage:
        try:
            find_sweep_dir(Path(storage).resolve(), grid.experiment, resume)
        except FileNotFoundError as e:
            problems.append(str(e))
    data_problems, notes = check_datasets(grid, on_cluster=bool(address))
    if dry_run:
        return problems, notes + [f"a run on this machine would stop here: {p}" for p in data_problems]
    return problems + data_problems, notes


def check_start(grid, address=None, num_cpus=None, num_gpus=None, cluster_yaml=None) -> None:
    """The start-up resource check (raises GridError): before a local Ray starts, against this machine;
    once connected to a cluster, against its nodes and the node types its autoscaler can add."""
    import ray

    if not ray.is_initialized() and not address:
        import torch
        local = {"CPU": num_cpus or os.cpu_count() or 1,
                 "GPU": num_gpus if num_gpus is not None else torch.cuda.device_count()}
        problems = check_resources(grid, local) or plan.check_fit(
            grid, [plan.local_node(num_cpus, num_gpus)], "this machine")
    elif ray.is_initialized():
        problems = plan.check_fit(grid, plan.cluster_nodes(cluster_yaml), "the cluster (its nodes and the "
                                  "node types its autoscaler can add)")
    else:
        return
    if problems:
        raise GridError(problems, grid.path)


def run_sweep(grid, *, address=None, tracking_uri=DEFAULT_TRACKING_URI, storage_path=None, resume=None,
              max_concurrent=None, num_cpus=None, num_gpus=None, verbose=1, _fault_kill_at=None,
              cluster_yaml=None, _checked=False, _callbacks=()):
    """Run (or resume) a sweep; returns a summary dict. Starts Ray if it is not running yet.
    Raises GridError (nothing started) when an input is unusable; ``main`` has checked them already.
    ``_callbacks``: extra Tune callbacks after the tracker (tests inject driver faults with them)."""
    where = storage_for(storage_path, grid, address)
    if not _checked:
        problems, _ = check_inputs(grid, tracking_uri=tracking_uri, storage=where, address=address, resume=resume)
        if problems:
            raise GridError(problems, grid.path)
    _quiet_tune()
    _connect(grid, address, num_cpus, num_gpus, cluster_yaml)
    storage = _storage(where, grid, address, resume)
    trainable = _trainable(grid)
    trials = grid.trials()
    members = [m for trial in trials for m in trial["members"]]
    if resume:
        from engine.resume import restore_tuner
        tuner, sweep_id = restore_tuner(storage, grid, resume, tracking_uri, trainable)
    else:
        sweep_id = f"{grid.experiment}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        tracker = _tracker(grid, tracking_uri, sweep_id, storage, trials, members)
        tuner = _new_tuner(grid, trainable, trials, sweep_id, storage, [tracker, *_callbacks],
                           max_concurrent or grid.max_concurrent, verbose, _fault_kill_at)
    try:
        results = _fit(tuner, entropy=any(config.get("entropy") for _, config in members))
    finally:
        from engine.trainable import clear_sweep_held
        clear_sweep_held(sweep_id)      # checkpoints killed trials held here and nobody will restore
    try:
        from engine.tracking import member_statuses
        final = member_statuses(tracking_uri, grid.experiment, sweep_id)
    except Exception:       # noqa: BLE001 - store still away: Tune's own record alone then
        final = {}
    return summarise(results, tracking_uri, sweep_id, f"{storage}/{sweep_id}", grid.experiment,
                     [member_id for member_id, _ in members], final)


def _quiet_tune() -> None:
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")   # MLflow is our only logger
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")                  # the table reporter of _new_tuner
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


def _connect(grid, address, num_cpus, num_gpus, cluster_yaml) -> None:
    """Join the cluster at ``address`` or start a local Ray (unless Ray runs already), checking before
    and after that the grid's trials fit."""
    import ray
    if not ray.is_initialized():
        check_start(grid, address, num_cpus, num_gpus)         # a local Ray: this machine, before starting
        if address:
            ray.init(address=address)      # check_address saw it answer; Ray's own errors are clear from here
        else:
            start_local_ray(num_cpus, num_gpus)
    check_start(grid, cluster_yaml=cluster_yaml)                # what the running cluster offers


def _storage(where: str, grid, address, resume):
    """Where Tune keeps the sweep's state: a URI as given, else a directory made absolute and created
    (on a cluster of several nodes it must be one they all see)."""
    import ray
    if "://" in str(where):             # e.g. s3://bucket/sweeps: Tune handles it, resume needs a path
        if resume:
            raise FileNotFoundError("--resume needs a local or shared-filesystem --storage-path; "
                                    "with a URI, restore with ray.tune.Tuner.restore(URI, ...) directly")
        return where
    storage = Path(where).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    if address and len([node for node in ray.nodes() if node.get("Alive")]) > 1:
        problems = check_storage_on_nodes(storage)
        if problems:
            raise GridError(problems, grid.path)
    return storage


def _trainable(grid):
    """engine.trainable's function trainable, each trial asking for its own cpu, gpu and memory."""
    from ray import tune

    from engine.trainable import train_bundle
    per_trial = plan.ray_resources(grid)
    return tune.with_resources(train_bundle, lambda config: per_trial[config["trial"]["trial_id"]])


def _tracker(grid, tracking_uri, sweep_id, storage, trials, members):
    """The MLflow callback of a new sweep, with the code's source and the grid's settings."""
    from engine.source import source_info, source_tags
    from engine.tracking import MLflowTracker
    source = source_info(Path(__file__).resolve().parents[1])
    resources = {"cpu": float(grid.resources.get("cpu", 1)), "gpu": float(grid.resources.get("gpu", 0))}
    return MLflowTracker(
        tracking_uri=tracking_uri, experiment=grid.experiment, grid_text=grid.source_text,
        grid_name=Path(grid.path).name if grid.path else grid.experiment, members=members,
        sweep_id=sweep_id,
        tags={**source_tags(source), layout.TAG_NOTE: grid.description or ""},
        artifacts={"git.diff": source["diff"]} if source.get("diff") else None,
        spill_dir=str(storage) if "://" not in str(storage) else None,
        params={"bundle": grid.bundle, "n_members": len(members), "n_trials": len(trials),
                "axes": dict(grid.axes), "overrides": grid.overrides, "resources": resources})


def _new_tuner(grid, trainable, trials, sweep_id, storage, callbacks, limit, verbose, fault_kill_at):
    """A Tuner with one grid-search trial per trial of the grid, each named by its trial id."""
    from ray import tune
    param_space = {"trial": tune.grid_search(trials), "sweep_id": sweep_id,
                   "checkpoint_every": grid.checkpoint_every, "_fault_kill_at": fault_kill_at}
    reporter = tune.CLIReporter(
        metric_columns={"iteration": "iteration", "train_loss": "train loss", "members_running": "members running"},
        parameter_columns={"sweep_id": "sweep"}, max_report_frequency=30)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=limit,
            trial_name_creator=lambda t: t.config["trial"]["trial_id"],
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"]),
        run_config=tune.RunConfig(
            name=sweep_id, storage_path=str(storage), callbacks=callbacks, verbose=verbose,
            progress_reporter=reporter, failure_config=tune.FailureConfig(max_failures=grid.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))


def _fit(tuner, entropy: bool):
    """Run the Tuner with SIGTERM taken as Ctrl-C and, for entropy, each node's reservoir started early."""
    import ray

    from engine.reservoir import get_reservoir, shutdown_reservoirs
    if entropy:
        # start each node's reservoir now, so that its process comes up while the first trials do
        for node in ray.nodes():
            if node.get("Alive"):
                get_reservoir(node["NodeID"]).pid.remote()
    previous = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)    # Ray's own handler would just exit
    try:
        return tuner.fit()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        shutdown_reservoirs()


def summarise(results, tracking_uri, sweep_id, sweep_dir, experiment, member_ids, final=None) -> dict:
    """Member counts by final status. Every member of the grid is counted: Tune creates grid trials
    lazily, so after an interruption ``results`` may lack trials that never started; those members,
    like any without a final status, are unfinished. ``final`` (member id -> status in MLflow) counts
    members whose trial Tune did not run again because MLflow had closed them (engine.resume)."""
    counts = dict.fromkeys(FINAL + ("unfinished",), 0)
    seen: set = set()
    for result in results:
        metrics = result.metrics or {}
        trial = (result.config or {}).get("trial") or {}
        ids = metrics.get("member_ids") or [member_id for member_id, _ in trial.get("members", [])]
        if result.error is not None:
            counts["failed"] += len(ids)
            seen.update(ids)
            continue
        for member_id, status in zip(ids, metrics.get("status") or []):
            if status in FINAL:
                counts[status] += 1
                seen.add(member_id)
    for member_id in set(member_ids) - seen:
        status = (final or {}).get(member_id)
        if status in ENDED:
            counts[status] += 1
            seen.add(member_id)
    counts["unfinished"] += len(set(member_ids) - seen)
    return {"sweep_id": sweep_id, "sweep_dir": str(sweep_dir), "tracking_uri": tracking_uri,
            "experiment": experiment, "members": counts}


def dry_run_plan(args, grid) -> int:
    """Print the launch plan onto cluster.yaml's node types; 2 if a trial fits none of them."""
    path = Path(args.cluster_yaml) if args.cluster_yaml else plan.CLUSTER_YAML
    nodes = plan.nodes_from_cluster_yaml(path)
    storage = storage_for(args.storage_path, grid, args.address)
    print()
    print(plan.launch_plan(grid, nodes, path.name, tracking_uri_for(args, grid), storage,
                           args.max_concurrent))
    problems = plan.check_fit(grid, nodes, path.name)
    if not args.address:
        here = plan.check_fit(grid, [plan.local_node(args.num_cpus, args.num_gpus)], "this machine")
        print(f"this machine (a local Ray): {'cannot run it: ' + here[0] if here else 'can run it'}")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    return 0


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
    uri = _absolute_sqlite(tracking_uri_for(args, grid))
    problems, notes = check_inputs(grid, tracking_uri=uri, storage=storage_for(args.storage_path, grid, args.address),
                                   address=args.address, resume=args.resume, dry_run=args.dry_run)
    if problems:
        print(f"error: the sweep of {args.grid} cannot start, {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print("Nothing was started. Fix these and run again.", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if args.dry_run:
        print(grid.table())
        print()
        print(grid.resource_plan())
        return dry_run_plan(args, grid)
    try:
        summary = run_sweep(grid, address=args.address, tracking_uri=uri, storage_path=args.storage_path,
                            resume=args.resume, max_concurrent=args.max_concurrent,
                            num_cpus=args.num_cpus, num_gpus=args.num_gpus, verbose=args.verbose,
                            cluster_yaml=args.cluster_yaml, _checked=True)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LocalRayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_summary(summary)
    counts = summary["members"]
    return 1 if counts["failed"] or counts["unfinished"] else 0


def _print_summary(summary: dict) -> None:
    counts = summary["members"]
    print(f"\nsweep {summary['sweep_id']}: {counts['done']} done, {counts['converged']} converged, "
          f"{counts['stopped']} stopped, {counts['diverged']} diverged, {counts['failed']} failed, "
          f"{counts['unfinished']} unfinished")
    print(f"MLflow: experiment '{summary['experiment']}' at {summary['tracking_uri']} "
          f"(browse: mlflow ui --backend-store-uri {summary['tracking_uri']})")
    print(f"Tune state: {summary['sweep_dir']} (continue an interrupted sweep with --resume)")
    print(f"Report: python -m analysis.report --experiment {summary['experiment']} "
          f"--tracking-uri {summary['tracking_uri']}")

if __name__ == "__main__":
    sys.exit(main())
