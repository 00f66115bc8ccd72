"""Sweep report: figures and summary tables for one MLflow experiment (docs/theory.md §§5–7).

    python -m analysis.report --experiment NAME [--tracking-uri URI] [--out DIR]
        [--parent-run ID] [--window W] [--eps [MATCH:]E] [--lr-range [MATCH] LO HI] [--no-upload]

ε, the LR segment, W, the phase-diagram window and the OP smoothing are chosen per group of members
(analysis.settings): report options first, then the grid's ``analysis:`` block (read from the parent
run's grid.yaml), then the papers' defaults by regime. Each group's ε is printed.

Writes PNG figures, ``summary.md``, ``summary.csv`` and per-section CSV tables into OUT
(default ``reports/NAME``), then logs the folder to the parent run under ``report/``.

The sections are the package ``analysis.sections``: one module per section, found by listing the
package (``analysis.sections.all_sections``; docs/DESIGN.md "Adding a report section"). A section
raises ``Skip(reason)`` when the sweep lacks what it needs; any other exception is caught too, so
one broken section never stops the report. This module keeps the driver (``build_report``, the
summary, ``upload``) and the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import numpy as np
import pandas as pd
import yaml

from analysis.figures import plt
from engine import layout
from analysis.load import WINDOW_DEFAULT, WINDOW_IDEAL_GAS, SweepNotFound, Sweep, load_experiment
from analysis.sections import all_sections
from analysis.sections.common import Options, SectionResult, Skip
from analysis.settings import apply_windows, member_windows, read_grid_block


# -----------------------------------------------------------------------------
# summary

def _fmt(v):
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def md_table(rows) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# driver

def run_section(fn, sweep, out_dir, opts) -> SectionResult:
    name = getattr(fn, "__name__", "section").removesuffix("_section")
    try:
        res = fn(sweep, out_dir, opts)
    except Skip as e:
        res = SectionResult(name, skipped_reason=str(e))
    except Exception as e:  # noqa: BLE001 - one broken section must not stop the report
        traceback.print_exc(file=sys.stderr)
        res = SectionResult(name, skipped_reason=f"error: {type(e).__name__}: {e}")
    finally:
        plt.close("all")
    if res.skipped_reason:
        print(f"[{res.name}] skipped: {res.skipped_reason}")
    else:
        print(f"[{res.name}] {len(res.figures)} figure(s), {len(res.tables)} table(s)")
    return res


def build_report(sweep: Sweep, out_dir, opts: Options, sections=None) -> list:
    """Run every section into ``out_dir`` and write summary.md / summary.csv; return the results."""
    os.makedirs(out_dir, exist_ok=True)
    results = [run_section(fn, sweep, out_dir, opts) for fn in (all_sections() if sections is None else sections)]
    sweep.members.to_csv(os.path.join(out_dir, "members.csv"))
    sweep.stationary.to_csv(os.path.join(out_dir, "stationary.csv"))
    rows = [{"section": r.name, **row} for r in results for row in r.summary_rows]
    pd.DataFrame(rows).to_csv(os.path.join(out_dir, "summary.csv"), index=False)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(_summary_md(sweep, opts, results))
    return results


def _summary_md(sweep, opts, results) -> str:
    p = sweep.parent
    lines = [f"# Sweep report: {sweep.experiment}", "",
             f"- parent run: {p['run_id'] if p else '(none)'}"
             + (f" (sweep status {p['tags'].get(layout.TAG_SWEEP_STATUS, '?')})" if p else ""),
             f"- members: {len(sweep.members)}, in the stationary analysis: {len(sweep.stationary)}",
             "- stationary window W (logs): "
             + ", ".join(str(w) for w in sorted(set(sweep.stationary.get("window", pd.Series()).tolist()))),
             f"- options: ε = {'per group' if opts.eps is None else opts.eps}, lr range = "
             f"{opts.lr_range or 'per group'}, k ≤ {opts.k_max}"
             + (f", per-group options {list(opts.group_overrides)}" if opts.group_overrides else "")]
    lines += [f"- note: {n}" for n in sweep.notes]
    if sweep.excluded:
        lines += ["", "## Excluded members", ""]
        lines += [f"- {rid} (lr = {sweep.members.loc[rid].get('lr', '?')}): {why}"
                  for rid, why in sweep.excluded.items()]
    running = sweep.members.index[sweep.members["running"]]
    if len(running):
        lines += ["", "## Members still running (provisional values)", ""]
        lines += [f"- {rid}" for rid in running]
    for r in results:
        lines += ["", f"## {r.name}", ""]
        if r.skipped_reason:
            lines.append(f"**Skipped:** {r.skipped_reason}")
            continue
        if r.summary_rows:
            lines += [md_table(r.summary_rows), ""]
        lines += [f"- {n}" for n in r.notes]
        if r.tables:
            lines += ["", "Tables: " + ", ".join(f"[{t}]({t})" for t in r.tables)]
        lines += [""] + [f"![{fig}]({fig})" for fig in r.figures]
    return "\n".join(lines) + "\n"


def upload(sweep: Sweep, out_dir) -> str | None:
    """Log ``out_dir`` to the parent run under ``report/``; returns the parent run id."""
    if sweep.parent is None:
        return None
    from mlflow.tracking import MlflowClient
    MlflowClient(tracking_uri=sweep.tracking_uri).log_artifacts(
        sweep.parent["run_id"], out_dir, artifact_path="report")
    return sweep.parent["run_id"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name (the grid's experiment)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own)")
    ap.add_argument("--out", default=None, help="output folder (default reports/NAME)")
    ap.add_argument("--parent-run", default=None, help="parent run id (default: newest sweep run)")
    ap.add_argument("--window", type=int, default=None,
                    help=f"stationary window W in logs (default per log schedule: {WINDOW_IDEAL_GAS} for "
                         f"ideal_gas, {WINDOW_DEFAULT} for free_energy and others, a log:N schedule the "
                         "same share of its N points)")
    ap.add_argument("--eps", action="append", default=[], metavar="[MATCH:]E",
                    help="§5 tolerance ε for every group, or for the groups whose members match MATCH "
                         "(key=value[,key=value], e.g. width=64:0.04); repeatable. Default per group: the "
                         "grid's analysis block, else 0.01 UP / 0.04 OP (docs/theory.md §5)")
    ap.add_argument("--lr-range", action="append", nargs="+", default=[], metavar="[MATCH] LO HI",
                    help="§5 stationary segment by LR (both ends included) for every group, or for the "
                         "groups matching MATCH (e.g. --lr-range width=8 1e-4 1e-2); repeatable. "
                         "Default per group: the grid's analysis block, else the automatic rule")
    ap.add_argument("--k", type=int, default=Options.k_max, help="k-NN entropy k (largest logged k ≤ this)")
    ap.add_argument("--uniform-n", type=int, default=None,
                    help="samples for the uniform-sphere entropy reference (default: the knn window N)")
    ap.add_argument("--no-uniform-loss", action="store_true",
                    help="skip the uniform-reference loss asymptote (it runs the model over the training set "
                         "for each of --uniform-loss-n directions)")
    ap.add_argument("--uniform-loss-n", type=int, default=Options.uniform_loss_n,
                    help=f"uniform directions for the loss asymptote (default {Options.uniform_loss_n})")
    ap.add_argument("--no-upload", action="store_true", help="do not attach the report to the parent run")
    ap.add_argument("--toy-u-window", type=int, default=Options.toy_u_window, metavar="ITERS",
                    help=f"toys: average U and r over the last ITERS iterations (default {Options.toy_u_window}, §8)")
    ap.add_argument("--toy-pressure-window", type=int, default=Options.toy_pressure_window, metavar="ITERS",
                    help=f"toys: average r̃ over the last ITERS iterations (default {Options.toy_pressure_window}, §7)")
    return ap.parse_args(argv)


def _parse_match(text):
    """``key=value[,key=value]`` → {key: value} (values read as YAML scalars: 64 → 64, 1e-3 → 0.001)."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{text!r}: a group is named by key=value[,key=value], e.g. width=64")
        v = yaml.safe_load(value)
        try:
            v = float(v) if isinstance(v, str) else v
        except ValueError:
            pass
        out[key.strip()] = v
    return out


def _group_options(args):
    """(ε for all, lr range for all, per-group overrides) from the repeatable --eps / --lr-range."""
    eps_all, range_all, groups = None, None, []
    for text in args.eps:
        match, _, value = text.rpartition(":")
        eps = float(value)
        if not eps >= 0:
            raise ValueError(f"--eps {text}: ε must be ≥ 0")
        if match:
            groups.append({"match": _parse_match(match), "eps": eps})
        else:
            eps_all = eps
    for words in args.lr_range:
        if len(words) not in (2, 3):
            raise ValueError(f"--lr-range {' '.join(words)}: give LO HI, or MATCH LO HI")
        lo, hi = float(words[-2]), float(words[-1])
        if not 0 < lo <= hi:
            raise ValueError(f"--lr-range {' '.join(words)}: give LO HI with 0 < LO ≤ HI")
        if len(words) == 3:
            groups.append({"match": _parse_match(words[0]), "lr_range": (lo, hi)})
        else:
            range_all = (lo, hi)
    return eps_all, range_all, tuple(groups)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        eps_all, range_all, group_overrides = _group_options(args)
        group_error = None
    except ValueError as e:
        eps_all = range_all = None
        group_overrides, group_error = (), str(e)
    bad = [msg for wrong, msg in (
        (group_error is not None, group_error),
        (args.window is not None and args.window < 1, f"--window {args.window}: must be ≥ 1"),
        (args.uniform_loss_n < 2, f"--uniform-loss-n {args.uniform_loss_n}: must be ≥ 2"),
        (args.toy_u_window < 1, f"--toy-u-window {args.toy_u_window}: must be ≥ 1 (iterations)"),
        (args.toy_pressure_window < 1, f"--toy-pressure-window {args.toy_pressure_window}: must be ≥ 1 (iterations)"),
    ) if wrong]
    if bad:
        print("error: " + "; ".join(bad) + ". Nothing was read; fix the option and run again.", file=sys.stderr)
        return 2
    opts = Options(eps=eps_all, lr_range=range_all, group_overrides=group_overrides,
                   k_max=args.k, uniform_n=args.uniform_n, uniform_loss=not args.no_uniform_loss,
                   uniform_loss_n=args.uniform_loss_n, toy_u_window=args.toy_u_window,
                   toy_pressure_window=args.toy_pressure_window)
    try:
        sweep = load_experiment(args.experiment, tracking_uri=args.tracking_uri,
                                stationary_window=args.window, parent_run=args.parent_run)
    except SweepNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts.grid_block, notes = read_grid_block(sweep)
    sweep.notes += notes
    if args.window is None:          # --window overrides every member's W; else the grid block's per group
        apply_windows(sweep, member_windows(sweep.members, opts.grid_block))
    out_dir = args.out or os.path.join("reports", args.experiment)
    build_report(sweep, out_dir, opts)
    print(f"report written to {out_dir}/summary.md")
    if args.no_upload:
        return 0
    if sweep.parent is None:
        print("no parent run: report not uploaded", file=sys.stderr)
        return 0
    try:
        rid = upload(sweep, out_dir)
        print(f"attached to parent run {rid} under artifacts/report")
    except Exception as e:  # noqa: BLE001
        print(f"warning: upload to the parent run failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
