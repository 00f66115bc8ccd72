"""Member-iterations a sweep spent with stop_when, against running every member to the end.

    python benchmarks/stop_savings.py --experiment vmf_fixed_elr --tracking-uri sqlite:///mlflow.db

A stopped member (status ``stopped``) spent the iterations up to its last log row; every other member
its ``iterations``. Prints the totals, the saving and when the members stopped.
"""
from __future__ import annotations

import argparse

import numpy as np

from analysis.load import load_experiment


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)
    sw = load_experiment(args.experiment, tracking_uri=args.tracking_uri, load_running=False)
    m = sw.members
    last = sw.series.groupby("run_id")["iteration"].max().reindex(m.index)
    full = m["iterations"].astype(float)
    stopped = (m["status"] == "stopped").to_numpy()
    spent = np.where(stopped, last.to_numpy(float), full.to_numpy())
    print(f"{args.experiment}: {len(m)} members, {int(stopped.sum())} stopped early")
    print(f"member-iterations: {spent.sum():.4g} of {full.sum():.4g} "
          f"(saving {100 * (1 - spent.sum() / full.sum()):.1f} %)")
    if stopped.any():
        q = np.percentile(spent[stopped], [0, 25, 50, 75, 100])
        print("stop iterations (min, 25%, median, 75%, max): " + ", ".join(f"{v:.3g}" for v in q))


if __name__ == "__main__":
    main()
