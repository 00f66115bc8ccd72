"""Engine overhead: one demo member bare vs through the engine, and per-trial scheduling cost.

    python benchmarks/bench_engine.py [--iterations 2000] [--tiny 100]

1. One member of grids/demo.yaml (``--iterations`` steps, ``--width``, lr 0.1, 2 CPU threads) is trained twice in one
   process: bare (NetworkRunner + LocalSink, what ``python -m trainables.run`` does, no file output)
   and as a one-trial sweep (``run_sweep``: Ray Tune trial, reservoir entropy, MLflow SQLite logging).
   Ray start-up is timed separately and not counted. Target: engine / bare ≤ 1.10.
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


def trial_times(sweep_dir: str) -> list[float]:
    from ray.tune import ExperimentAnalysis

    return [t.last_result.get("time_total_s", 0.0) for t in ExperimentAnalysis(sweep_dir).trials]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--tiny", type=int, default=100)
    p.add_argument("--width", type=int, default=1, help="ConvNet width (demo: 1 or 16)")
    args = p.parse_args()

    import ray

    from engine.config import load_grid
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

    bare = run_bare(cfg, threads=2)
    t0 = time.perf_counter()
    summary = run_sweep(grid, tracking_uri=uri, storage_path=str(work / "rr"), verbose=0)
    engine = time.perf_counter() - t0
    assert summary["members"]["done"] == 1, summary
    (train,) = trial_times(summary["sweep_dir"])
    print(f"ray start-up (not counted)      {ray_start:8.2f} s")
    print(f"bare (NetworkRunner+LocalSink)  {bare:8.2f} s")
    print(f"engine (run_sweep, 1 trial)     {engine:8.2f} s   (trial's own time_total_s {train:.2f} s)")
    print(f"overhead ratio engine/bare      {engine / bare:8.3f}   (target ≤ 1.10)")

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
