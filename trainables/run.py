"""Run one trial in this process: ``python -m trainables.run --model convnet --dataset digits ...``.

Writes ``OUT/metrics.jsonl`` (one JSON object per log step), ``OUT/running.jsonl`` (running metrics),
``OUT/config.json``, ``OUT/checkpoint.pt`` (complete state, window included) and ``OUT/status.json``.
``--resume`` continues from the checkpoint and reproduces the uninterrupted run exactly (CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from trainables.defaults import DEFAULT_KS, fill_defaults
from trainables.protocols import PROTOCOLS
from trainables.runner import NETWORK_MODELS, make_runner
from trainables.schedule import SCHEDULES, log_iterations
from trainables.sinks import LocalSink

DATASETS = ("digits", "cifar10", "cifar100", "synthetic")


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got '{text}'") from None
        if not v > 0 or (isinstance(v, float) and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return v
    return parse


def _non_negative(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return v


def _entropy_spec(text):
    """``knn:WINDOW[:STRIDE]`` or ``kl:WINDOW[:STRIDE][:std]``."""
    parts = text.split(":")
    if parts[0] not in ("knn", "kl") or len(parts) < 2:
        raise argparse.ArgumentTypeError(
            f"entropy spec '{text}': use knn:WINDOW[:STRIDE] or kl:WINDOW[:STRIDE][:std]")
    try:
        window = int(parts[1])
        stride = int(parts[2]) if len(parts) > 2 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"entropy spec '{text}': WINDOW and STRIDE are integers") from None
    if window < 2 or stride < 1:
        raise argparse.ArgumentTypeError(f"entropy spec '{text}': need WINDOW ≥ 2 and STRIDE ≥ 1")
    spec = {"name": parts[0], "window": window, "stride": stride}
    if parts[0] == "kl":
        spec["standardize"] = len(parts) > 3 and parts[3] == "std"
    return spec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainables.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=NETWORK_MODELS, default="convnet")
    p.add_argument("--width", type=_positive(int), default=8, help="ConvNet c / ResNet-18 k")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--samples-per-label", type=_positive(int), default=None)
    p.add_argument("--loss", choices=("ce", "mse"), default="ce")
    p.add_argument("--protocol", choices=PROTOCOLS, default="fixed_sphere")
    p.add_argument("--lr", type=_positive(float), required=True,
                   help="η_eff on fixed_sphere / fixed_elr, η on fixed_lr")
    p.add_argument("--wd", type=_non_negative, default=0.0)
    p.add_argument("--radius", type=_positive(float), default=1.0)
    p.add_argument("--batch-size", type=_positive(int), default=128)
    p.add_argument("--iters", type=_positive(int), default=20000)
    p.add_argument("--seed", type=int, default=0, help="batch-sequence seed")
    p.add_argument("--log-schedule", default="free_energy",
                   help=f"one of {', '.join(SCHEDULES)}")
    p.add_argument("--num-stoch-grads", type=_positive(int), default=1000, help="M")
    p.add_argument("--entropy", type=_entropy_spec, action="append", default=None,
                   help="estimator spec, repeatable: knn:1000:1 (default), kl:4000:25")
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="k list for knn")
    p.add_argument("--no-entropy", action="store_true")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=_positive(float), default=300.0,
                   help="seconds between checkpoints (also written at the end)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) at the first log step ≥ this iteration")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args, p) -> dict:
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        p.error(f"--ks: expected comma-separated integers, got '{args.ks}'")
    if not ks or min(ks) < 1:
        p.error("--ks: every k must be ≥ 1")
    specs = [] if args.no_entropy else (args.entropy or [{"name": "knn", "window": 1000, "stride": 1}])
    for s in specs:
        if s["name"] == "knn":
            s["ks"] = ks
    try:
        log_iterations(args.log_schedule, args.iters)
    except ValueError as e:
        p.error(f"--log-schedule: {e}")
    if args.device not in ("auto", "cpu") and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu or auto")
    return fill_defaults({
        "model": args.model, "width": args.width, "dataset": args.dataset,
        "samples_per_label": args.samples_per_label, "loss": args.loss, "protocol": args.protocol,
        "lr": args.lr, "wd": args.wd, "radius": args.radius, "batch_size": args.batch_size,
        "iterations": args.iters, "seed": args.seed, "log_schedule": args.log_schedule,
        "num_stoch_grads": args.num_stoch_grads, "entropy": specs, "data_dir": args.data_dir,
        "device": args.device,
    })


def _truncate_jsonl(path: Path, last_iteration: int) -> None:
    """Keep the rows written up to the checkpoint; later ones will be produced again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["iteration"] <= last_iteration]
    path.write_text("".join(line + "\n" for line in keep))


def _save_checkpoint(path: Path, runner, sink, cfg) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"config": cfg, "runner": runner.state_dict(),
                "sink": sink.state_dict() if sink is not None else None}, tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    cfg = config_from_args(args, p)
    out = Path(args.out)
    ckpt_path, metrics_path, running_path = out / "checkpoint.pt", out / "metrics.jsonl", out / "running.jsonl"
    if args.resume:
        if not ckpt_path.exists():
            p.error(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        saved = json.loads((out / "config.json").read_text())
        if saved != json.loads(json.dumps(cfg)):
            diff = sorted(k for k in set(saved) | set(cfg) if saved.get(k) != json.loads(json.dumps(cfg)).get(k))
            p.error(f"--resume: the arguments differ from the run in {out} in: {', '.join(diff)}")
    elif metrics_path.exists() and metrics_path.stat().st_size > 0:
        p.error(f"{out} already holds a run; use --resume to continue it or choose another --out")
    try:
        runner = make_runner([cfg], cfg["device"])
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sink = LocalSink(cfg["entropy"], 1, runner.D, device=runner.device) if cfg["entropy"] else None
    out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        runner.load_state_dict(state["runner"])
        if sink is not None and state["sink"] is not None:
            sink.load_state_dict(state["sink"])
        _truncate_jsonl(metrics_path, runner.iteration)
        _truncate_jsonl(running_path, runner.iteration)
    else:
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        metrics_path.write_text("")
        running_path.write_text("")

    bar = tqdm(total=cfg["iterations"], initial=runner.iteration, disable=args.no_progress,
               unit="it", desc=f"{cfg['model']}{cfg['width']} {cfg['protocol']} lr={cfg['lr']:g}")
    last_ckpt = time.monotonic()
    stopped_early = False
    with open(metrics_path, "a") as fm, open(running_path, "a") as fr:
        for event in runner.run(sink):
            for r in event["running"][0]:
                fr.write(json.dumps(r) + "\n")
            row = event["rows"][0]
            if row is not None:
                fm.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", snr=f"{row['snr']:.3g}")
            fm.flush()
            fr.flush()
            bar.update(event["iteration"] - bar.n)
            finished = runner.status[0] != "running"
            stop = args.stop_after is not None and event["iteration"] >= args.stop_after and not finished
            if finished or stop or time.monotonic() - last_ckpt > args.checkpoint_every:
                _save_checkpoint(ckpt_path, runner, sink, cfg)
                last_ckpt = time.monotonic()
            if stop:
                stopped_early = True
                break
    bar.close()
    status = "stopped" if stopped_early else runner.status[0]
    (out / "status.json").write_text(json.dumps({"status": status, "iteration": runner.iteration, "D": runner.D}))
    if status == "diverged":
        print(f"diverged at iteration ≤ {runner.iteration} (non-finite loss); rows up to then are in "
              f"{metrics_path}. Try a smaller --lr.", file=sys.stderr)
        return 1
    if stopped_early:
        print(f"stopped at iteration {runner.iteration}; continue with the same arguments and --resume")
    else:
        print(f"done: {runner.iteration} iterations, D = {runner.D}, metrics in {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
