"""End to end: a small real digits sweep through the engine, then the report command on it.

The numbers in the report's summary must equal what the analysis functions give on the stationary
values read back from MLflow, and the expected figures and tables must exist.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import report
from analysis.free_energy import fit_temperature
from analysis.load import load_experiment
from engine import sweep

SETTINGS = [
    "iterations=300", "lr=[0.003, 0.03, 0.3, 1.0]", "width=[1, 2]", "log_schedule=log:15",
    "num_stoch_grads=3", "entropy=[{name: knn, window: 40, stride: 1, ks: [1, 5, 39]}]",
    "batch_size=32", "checkpoint_every=0",
]


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_sweep_then_report(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = Path(sweep.__file__).resolve().parents[1] / "grids" / "demo.yaml"
    argv = [str(grid), "--tracking-uri", uri]
    for s in SETTINGS:
        argv += ["--set", s]
    assert sweep.main(argv + ["--verbose", "0"]) == 0

    out = tmp_path / "report"
    assert report.main(["--experiment", "demo", "--tracking-uri", uri, "--out", str(out)]) == 0

    summary = pd.read_csv(out / "summary.csv")
    fe = summary[summary["section"].str.contains("free", case=False)]
    assert len(fe) == 2, "one free-energy row per width"
    figures = sorted(p.name for p in out.glob("*.png"))
    assert any("temperature" in f for f in figures) and any("free_energy" in f for f in figures)
    assert any("snr" in f.lower() for f in figures)
    assert all((out / f).stat().st_size > 5000 for f in figures)
    assert (out / "summary.md").read_text().strip()

    # the report's numbers equal the functions' output on the stationary values in MLflow
    sw = load_experiment("demo", tracking_uri=uri)
    members = sw.members[["width", "lr"]].join(sw.stationary[["train_loss", "entropy_knn_k39"]])
    for width in (1, 2):
        g = members[members["width"] == width].sort_values("lr")
        row = fe[fe["group"].astype(str).str.contains(f"width={width}")]
        assert len(row) == 1, f"no summary row for width {width}: {fe['group'].tolist()}"
        # ε per group: 0.04 where a member converged (OP), else 0.01 (docs/theory.md §5)
        eps = 0.04 if (sw.members.loc[g.index, "status"] == "converged").any() or \
            (sw.members.loc[g.index, "regime"] == "converged").any() else 0.01
        assert float(row["eps"].iloc[0]) == eps
        fit = fit_temperature(g["lr"].to_numpy(float), g["train_loss"].to_numpy(float),
                              g["entropy_knn_k39"].to_numpy(float), eps=eps)
        assert _same(float(row["exponent_a"].iloc[0]), float(fit.a))
        assert _same(float(row["prefactor_b"].iloc[0]), float(fit.b))
        assert bool(row["holds"].iloc[0]) == bool(fit.holds)
        assert int(row["n_empty"].iloc[0]) == int(np.sum(fit.empty))
