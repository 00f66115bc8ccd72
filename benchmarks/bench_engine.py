"""Engine overhead: one demo member bare vs through the engine, and per-trial scheduling cost.

    python benchmarks/bench_engine.py [--iterations 2000] [--tiny 100]

1. One member of grids/demo.yaml (``--iterations`` steps, ``--width``, lr 0.1, 2 CPU threads) is trained
   three times, side by side: by the core CLI ``python -m trainables.run`` in a new process (the bare
   run a user would do), by the same runner in this process (no start-up costs at all), and as a
   one-trial sweep (``run_sweep``: Ray Tune trial, reservoir entropy, MLflow SQLite logging). Ray
   start-up is timed separately and not counted. Target: engine / CLI ≤ 1.10.
2. A sweep of ``--tiny`` members with 1 iteration, no entropy and M = 1: scheduling overhead per trial
   = (sweep wall time − Σ trial train times) / number of trials (the trials run 2 at a time here).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
DEMO = REPO / "grids" / "demo.yaml"


def member_overrides(iterations: int, width: int) -> list[str]:
    return [f"iterations={iterations}", f"width={width}", "lr=0.1", "resources.cpu=2", "max_concurrent=1",
            "checkpoint_every=1000"]


def run_bare(cfg: dict, threads: int) -> float:
    import torch

    from trainables.runner import make_runner
    from trainables.sinks import LocalSink

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = dict(cfg, device="cpu")
    runner = make_runner([cfg], torch.device("cpu"))
    specs = runner.members[0]["entropy"] or []
    sink = LocalSink(specs, 1, runner.D, "cpu") if specs else None
    for _ in runner.run(sink):
        pass
    assert runner.status == ["done"], runner.status
    return time.perf_counter() - t0


def run_cli(cfg: dict, out: Path) -> float:
    """The same member through the core CLI in a fresh process (what a user runs without the engine)."""
    import subprocess

    (spec,) = cfg["entropy"]
    args = [sys.executable, "-m", "trainables.run", "--model", cfg["model"], "--width", str(cfg["width"]),
            "--dataset", cfg["dataset"], "--protocol", cfg["protocol"], "--lr", str(cfg["lr"]),
            "--iters", str(cfg["iterations"]), "--batch-size", str(cfg["batch_size"]),
            "--log-schedule", cfg["log_schedule"], "--num-stoch-grads", str(cfg["num_stoch_grads"]),
            "--entropy", f"{spec['name']}:{spec['window']}:{spec['stride']}",
            "--ks", ",".join(map(str, spec["ks"])), "--no-progress", "--device", "cpu", "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - t0


def trial_times(sweep_dir: str) -> list[float]:
    from ray.tune import ExperimentAnalysis

    return [t.last_result.get("time_total_s", 0.0) for t in ExperimentAnalysis(sweep_dir).trials]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--tiny", type=int, default=100, help="members of the scheduling sweep (0: skip it)")
    p.add_argument("--width", type=int, default=1, help="ConvNet width (demo: 1 or 16)")
    args = p.parse_args()

    import ray

    from engine.grid import load_grid
    from engine.sweep import run_sweep

    work = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    grid = load_grid(DEMO, overrides=member_overrides(args.iterations, args.width) + ["experiment=bench_member"])
    (trial,) = grid.trials()
    (_, cfg), = trial["members"]
    print(f"member: width {cfg['width']}, lr {cfg['lr']}, {cfg['iterations']} iterations, "
          f"M={cfg['num_stoch_grads']}, entropy {cfg['entropy']}")

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0

    cli = run_cli(cfg, work / "cli")
    bare = run_bare(cfg, threads=2)
    t0 = time.perf_counter()
    from mlflow.tracking import MlflowClient
    MlflowClient(tracking_uri=uri).search_experiments()       # creates the SQLite store's tables
    store_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = run_sweep(grid, tracking_uri=uri, storage_path=str(work / "rr"), verbose=0)
    engine = time.perf_counter() - t0
    assert summary["members"]["done"] == 1, summary
    (train,) = trial_times(summary["sweep_dir"])
    print(f"ray start-up (not counted)      {ray_start:8.2f} s")
    print(f"new MLflow store (not counted)  {store_start:8.2f} s   (once per store)")
    print(f"bare, core CLI (new process)    {cli:8.2f} s")
    print(f"bare, in-process runner         {bare:8.2f} s   (no interpreter/torch start-up)")
    print(f"engine (run_sweep, 1 trial)     {engine:8.2f} s   (trial's own time_total_s {train:.2f} s)")
    print(f"overhead ratio engine/CLI       {engine / cli:8.3f}   (target ≤ 1.10)")
    print(f"overhead ratio engine/in-process{engine / bare:8.3f}")
    print(f"inside the trial: time_total_s / in-process {train / bare:8.3f}")

    if args.tiny > 0:
        tiny = load_grid(DEMO, overrides=[
            "experiment=bench_tiny", "iterations=1", "width=1", "entropy=[]", "num_stoch_grads=1",
            f"lr={{logspace: [-3, 0, {args.tiny}]}}", "resources.cpu=1", "max_concurrent=null", "checkpoint_every=0"])
        n = len(tiny.trials())
        t0 = time.perf_counter()
        summary = run_sweep(tiny, tracking_uri=uri, storage_path=str(work / "rr"), verbose=0)
        total = time.perf_counter() - t0
        assert summary["members"]["done"] == n, summary
        times = trial_times(summary["sweep_dir"])
        print(f"tiny sweep: {n} trials, 2 at a time, wall {total:.1f} s, Σ trial train times {sum(times):.1f} s")
        print(f"scheduling overhead per trial   {(total - sum(times)) / n:8.3f} s   "
              f"(wall per trial {total / n:.3f} s)")
    ray.shutdown()
    print(f"(scratch: {work})")


if __name__ == "__main__":
    main()
