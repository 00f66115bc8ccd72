"""Iterations per second of one trial on this machine's device, for the launch plan's throughput table.

    python benchmarks/bench_throughput.py --width 8                      # prints the figure
    python benchmarks/bench_throughput.py --width 64 --gpu A10G --write  # and replaces the table row

A member of ``--grid`` (default grids/fixed_lr.yaml, ``--set`` overrides allowed) is run on synthetic
data of the dataset's shape (``--train-size`` images; the log-step cost is scaled to the real training
set size). It times ``--steps`` update steps and one log step (full gradient, M stochastic gradients,
test pass; without the entropy window, which the reservoir computes beside the trial), then projects a
whole run: iterations × step + log steps of the schedule × log step. ``--write`` stores the figure in
engine/throughput.yaml as the row of that model and width, with the device, date and command as its
source; ``--gpu`` names the GPU model the row is for (the table's speeds are relative to it).
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.grid import load_grid                       # noqa: E402
from engine.plan import DATASET_SHAPES, TABLE            # noqa: E402
from trainables.data import load_dataset                  # noqa: E402
from trainables.defaults import resolve_device            # noqa: E402
from trainables.schedule import log_iterations            # noqa: E402
from trainables.network import NetworkRunner                # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: dict, device, steps: int, train_size: int) -> dict:
    cfg = dict(cfg, entropy=[], device=str(device), iterations=max(steps, 10), dataset="synthetic",
               samples_per_label=None)   # CIFAR's shape, no download; swapped for train_size images below
    runner = NetworkRunner([cfg], device)
    runner.data = load_dataset("synthetic", synthetic_size=(train_size, 1000), device=device)
    for t in range(5):                                       # warm-up
        runner._step(t)
    sync(device)
    start = time.perf_counter()
    for t in range(steps):
        runner._step(t)
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    runner.measure(steps, None)
    sync(device)
    log_s = time.perf_counter() - start
    return {"step_s": step_s, "log_s": log_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=str(ROOT / "grids" / "fixed_lr.yaml"))
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--gpu", default=None, help="GPU model of this machine for --write (e.g. A10G, V100)")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)

    grid = load_grid(args.grid, args.overrides + [f"width={args.width}"])
    cfg = grid.trials()[0]["members"][0][1]
    device = resolve_device("auto")
    t = measure(cfg, device, args.steps, args.train_size)
    n_train = DATASET_SHAPES[cfg["dataset"]][0] if cfg["samples_per_label"] is None else \
        cfg["samples_per_label"] * DATASET_SHAPES[cfg["dataset"]][4]
    log_s = t["log_s"] * max(1.0, n_train / args.train_size)  # the full-gradient pass grows with N
    logs = len(log_iterations(cfg["log_schedule"], cfg["iterations"]))
    total = cfg["iterations"] * t["step_s"] + logs * log_s
    its = cfg["iterations"] / total
    print(f"{cfg['model']}-{cfg['width']} on {device}: step {t['step_s'] * 1e3:.2f} ms, log step "
          f"{log_s:.2f} s (scaled to {n_train} images) x {logs}; {its:.2f} it/s over "
          f"{cfg['iterations']:,} iterations = {total / 3600:.1f} h per run")
    if args.write:
        if device.type != "cuda" and not args.gpu:
            print("refusing --write without a GPU (or name the device with --gpu)", file=sys.stderr)
            return 2
        gpu = args.gpu or torch.cuda.get_device_name(device)
        table = yaml.safe_load(TABLE.read_text())
        row = {"model": cfg["model"], "width": cfg["width"], "dataset": cfg["dataset"], "gpu": gpu,
               "it_per_s": round(its, 2),
               "source": f"measured {dt.date.today()} on {gpu} by benchmarks/bench_throughput.py "
                         f"--width {cfg['width']} --steps {args.steps} --train-size {args.train_size}"}
        table["models"] = [r for r in table["models"]
                           if (r["model"], r["width"]) != (row["model"], row["width"])] + [row]
        text = TABLE.read_text()
        head = text[:text.index("models:")]
        TABLE.write_text(head + yaml.safe_dump({k: table[k] for k in ("models",)}, sort_keys=False,
                                               width=110) + "\n" + text[text.index("# Speed of each GPU"):])
        print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
