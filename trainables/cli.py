"""Run one trial in this process: ``python -m trainables.cli --model convnet --dataset digits ...``
(``python -m trainables.run`` is the same command under its old name).

Writes ``OUT/metrics.jsonl`` (one JSON object per log step), ``OUT/running.jsonl`` (running metrics),
``OUT/config.json``, ``OUT/checkpoint.pt`` (complete state, window included) and ``OUT/status.json``.
``--resume`` continues from the checkpoint and reproduces the uninterrupted run exactly (CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from trainables import member
from trainables.cost import run_cost
from trainables.runner import make_runner
from trainables.schedule import log_iterations
from trainables.sinks import LocalSink

CLI_NAMES = {"iterations": "--iters"}        # flags whose name is not the key's
REQUIRED = ("lr",)                            # no default on the command line
NOT_FLAGS = ("entropy",)                      # given as --entropy/--ks/--no-entropy below


def _flag_keys() -> list:
    """The schema keys the CLI takes as flags: every key of a network member."""
    return [k for k in member.COMMON if k.name not in NOT_FLAGS]


def _parse_with(key):
    """An argparse type that checks the text with the key's schema check."""
    def parse(text):
        try:
            return key.check(text)
        except member.BadValue as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = key.name
    return parse


def _add_key(p, key) -> None:
    flags = [CLI_NAMES.get(key.name, "--" + key.name.replace("_", "-"))]
    shown = "unset" if key.default is member.ABSENT else key.default
    help_text = f"{key.meaning} (default: {shown})"
    if key.kind is bool:
        p.add_argument(*flags, dest=key.name, action="store_true", default=None, help=help_text)
        return
    extra = {"choices": member.NETWORKS} if key.name == "model" else {}
    p.add_argument(*flags, dest=key.name, type=_parse_with(key), default=None, required=key.name in REQUIRED,
                   help=key.meaning if key.name in REQUIRED else help_text, **extra)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainables.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for key in _flag_keys():
        _add_key(p, key)
    p.add_argument("--entropy", action="append", default=None,
                   help="estimator spec, repeatable: knn:1000:1 (default), kl:4000:25, kl:4000:25:std")
    p.add_argument("--ks", default=",".join(map(str, member.DEFAULT_KS)), help="k list for knn")
    p.add_argument("--no-entropy", action="store_true")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=_positive_seconds, default=300.0,
                   help="seconds between checkpoints (also written at the end)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) at the first log step ≥ this iteration")
    p.add_argument("--no-progress", action="store_true")
    return p


def _positive_seconds(text):
    try:
        return member.real("--checkpoint-every", gt=0)(text)
    except member.BadValue as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _entropy(args, p) -> list[dict]:
    """The member's estimator specs from --entropy / --ks / --no-entropy (trainables.member.EntropySpec)."""
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        p.error(f"--ks: expected comma-separated integers, got '{args.ks}'")
    if not ks or min(ks) < 1:
        p.error("--ks: every k must be ≥ 1")
    if args.no_entropy:
        return []
    try:
        if not args.entropy:
            return [member.EntropySpec.parse({"name": "knn", "ks": ks}).as_dict()]
        return member.entropy_specs([member.EntropySpec.from_text(t, ks).as_dict() for t in args.entropy])
    except member.BadValue as e:
        p.error(f"--entropy: {'; '.join(e.args[0]) if isinstance(e.args[0], list) else e}")


def config_from_args(args, p) -> dict:
    chosen = {k.name: getattr(args, k.name) for k in _flag_keys() if getattr(args, k.name) is not None}
    cfg = member.member_config({**chosen, "entropy": _entropy(args, p)})
    try:
        log_iterations(cfg["log_schedule"], cfg["iterations"])
    except ValueError as e:
        p.error(f"--log-schedule: {e}")
    device = cfg["device"]
    if device not in ("auto", "cpu") and device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return cfg


def _saved_config(out: Path) -> dict:
    """The config of the run in ``out``, completed by today's schema (older runs stored fewer keys)."""
    saved = member.member_config(json.loads((out / "config.json").read_text()))
    saved["entropy"] = member.entropy_specs(saved["entropy"])
    return json.loads(json.dumps(saved))


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


def _check_out(p, args, cfg, out: Path) -> None:
    """Refuse (exit 2) a --resume without a matching run, or a new run over an existing one."""
    if args.resume:
        if not (out / "checkpoint.pt").exists():
            p.error(f"--resume: no checkpoint at {out / 'checkpoint.pt'}; run without --resume to start")
        saved, now = _saved_config(out), json.loads(json.dumps(cfg))
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            p.error(f"--resume: the arguments differ from the run in {out} in: {', '.join(diff)}")
    elif (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0:
        p.error(f"{out} already holds a run; use --resume to continue it or choose another --out")


def _prepare(out: Path, resume: bool, runner, sink, cfg) -> None:
    """Restore the checkpoint and drop rows written after it, or start fresh files."""
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        runner.load_state_dict(state["runner"])
        if sink is not None and state["sink"] is not None:
            sink.load_state_dict(state["sink"])
        _truncate_jsonl(out / "metrics.jsonl", runner.iteration)
        _truncate_jsonl(out / "running.jsonl", runner.iteration)
    else:
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        (out / "metrics.jsonl").write_text("")
        (out / "running.jsonl").write_text("")


def _train(args, out: Path, runner, sink, cfg) -> bool:
    """Run to the end (or --stop-after), writing rows and checkpoints; True when stopped early."""
    bar = tqdm(total=cfg["iterations"], initial=runner.iteration, disable=args.no_progress,
               unit="it", desc=f"{cfg['model']}{cfg['width']} {cfg['protocol']} lr={cfg['lr']:g}")
    last_ckpt = time.monotonic()
    stopped_early = False
    with open(out / "metrics.jsonl", "a") as fm, open(out / "running.jsonl", "a") as fr:
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
                _save_checkpoint(out / "checkpoint.pt", runner, sink, cfg)
                last_ckpt = time.monotonic()
            if stop:
                stopped_early = True
                break
    bar.close()
    return stopped_early


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    cfg = config_from_args(args, p)
    out = Path(args.out)
    _check_out(p, args, cfg, out)
    try:
        runner = make_runner([cfg], cfg["device"])
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(run_cost(cfg).describe(), flush=True)
    sink = LocalSink(cfg["entropy"], 1, runner.D, device=runner.device) if cfg["entropy"] else None
    _prepare(out, args.resume, runner, sink, cfg)
    stopped_early = _train(args, out, runner, sink, cfg)
    status = "stopped" if stopped_early else runner.status[0]
    (out / "status.json").write_text(json.dumps({"status": status, "iteration": runner.iteration, "D": runner.D}))
    if status == "diverged":
        print(f"diverged at iteration ≤ {runner.iteration} (non-finite loss); rows up to then are in "
              f"{out / 'metrics.jsonl'}. Try a smaller --lr.", file=sys.stderr)
        return 1
    if stopped_early:
        print(f"stopped at iteration {runner.iteration}; continue with the same arguments and --resume")
    else:
        print(f"done: {runner.iteration} iterations, D = {runner.D}, metrics in {out / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
