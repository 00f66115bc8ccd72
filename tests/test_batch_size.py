"""analysis.batch_size: the fit T ≈ b η^a B^c, its intervals, the η/B verdict and the report section
(synthetic data, an in-memory Sweep; no Ray, no MLflow)."""

import numpy as np
import pandas as pd
import pytest

from analysis.batch_size import fit_batch_power_law
from analysis.sections.batch_size import batch_size_section
from analysis.load import Sweep
from analysis.sections.common import Options, Skip

LRS = np.logspace(-3, -1, 6)
BS = np.array([32, 64, 128, 256])


def _grid(a, c, b=4e-3, noise=0.05, rng=None):
    lr, B = (v.ravel() for v in np.meshgrid(LRS, BS, indexing="ij"))
    T = b * lr ** a * B.astype(float) ** c
    if rng is not None:
        T = T * np.exp(noise * rng.standard_normal(T.size))
    return lr, B, T


def test_exact_power_law_is_recovered():
    lr, B, T = _grid(0.85, -0.4, b=2e-3)
    f = fit_batch_power_law(lr, B, T)
    assert (f.a, f.c, f.b) == pytest.approx((0.85, -0.4, 2e-3), rel=1e-9)
    assert f.n == lr.size and f.dof == lr.size - 3
    assert f.verdict() == "not_eta_over_B"      # a + c = 0.45, exactly


def test_interval_of_c_covers_the_true_c_at_the_stated_rate():
    """200 noisy grids with a known c: the 90 % interval of c holds it in 80–97 % of them, and the
    stated standard error matches the scatter of ĉ across draws."""
    rng = np.random.default_rng(5)
    c_true, hits, cs, ses = -0.7, 0, [], []
    for _ in range(200):
        f = fit_batch_power_law(*_grid(0.85, c_true, noise=0.1, rng=rng), level=0.9)
        hits += abs(f.c - c_true) <= f.half_c
        cs.append(f.c)
        ses.append(f.se_c)
    assert 0.80 <= hits / 200 <= 0.97, hits
    assert np.std(cs) == pytest.approx(np.mean(ses), rel=0.2)


def test_verdict_eta_over_B_when_c_equals_minus_a():
    rng = np.random.default_rng(1)
    f = fit_batch_power_law(*_grid(0.85, -0.85, noise=0.05, rng=rng))
    assert abs(f.c + 0.85) <= f.half_c
    assert f.verdict() == "eta_over_B"
    line = f.verdict_line()
    assert line.startswith("T depends on η/B only: c = -0.8") and "± " in line and "90 % t-intervals" in line
    assert "excludes −1" in line      # c ≈ −0.85 ± 0.03: not T ∝ η/B with a = 1


def test_verdict_negative_when_T_ignores_B_or_scales_otherwise():
    rng = np.random.default_rng(2)
    for c in (0.0, -0.5, -1.3):
        f = fit_batch_power_law(*_grid(0.85, c, noise=0.05, rng=rng))
        assert f.verdict() == "not_eta_over_B", (c, f.verdict_line())
        assert f.verdict_line().startswith("T does not depend on η/B only")


def test_verdict_inconclusive_with_few_noisy_points():
    rng = np.random.default_rng(4)
    lr, B = np.array([1e-3, 1e-2, 1e-3, 1e-2, 3e-3]), np.array([32, 32, 64, 64, 48])
    T = 4e-3 * lr ** 0.85 * B ** -0.85 * np.exp(0.5 * rng.standard_normal(5))
    f = fit_batch_power_law(lr, B, T)
    assert abs(f.a + f.c) <= f.half_sum and f.verdict() == "inconclusive"


def test_bad_grids_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="≥ 2 batch sizes"):
        fit_batch_power_law(LRS, np.full(LRS.size, 128), LRS)
    B = np.array([32, 64, 128, 256])
    with pytest.raises(ValueError, match="cannot separate"):       # η ∝ B: ln η and ln B collinear
        fit_batch_power_law(B * 1e-4, B, (B * 1e-4 / B) ** 0.9)


def _sweep(sigma2_of_B):
    """fixed-sphere members over lr × B with the exact §5 family per B (T_fe = 3.9e-3 η^0.85 B^-0.6)
    and tr Σ = (D − 1) σ²(B) with 2 % noise."""
    rng = np.random.default_rng(9)
    D, C, a = 101, 50.0, 0.85
    lr, B = (v.ravel() for v in np.meshgrid(np.logspace(-4, -2, 9), [32, 128, 512], indexing="ij"))
    b_B = 3.9e-3 * B.astype(float) ** -0.6
    ids = pd.Index([f"r{i}" for i in range(lr.size)], name="run_id")
    members = pd.DataFrame({"model": "convnet", "width": 8, "protocol": "fixed_sphere", "lr": lr,
                            "batch_size": B, "seed": 0, "D": D, "status": "done", "regime": "stationary",
                            "running": False, "excluded": ""}, index=ids)
    stationary = pd.DataFrame({"train_loss": b_B * C / a * lr ** a, "entropy_knn_k50": C * np.log(lr),
                               "trace_sigma": (D - 1) * sigma2_of_B(B) * np.exp(0.02 * rng.standard_normal(lr.size))},
                              index=ids)
    series = stationary.reset_index().assign(iteration=1000)
    return Sweep("mem", "0", None, None, members, series, pd.DataFrame(), stationary)


def test_section_fits_both_temperatures(tmp_path):
    sw = _sweep(lambda B: 0.5 / B)           # σ² ∝ 1/B: ideal-gas T = η σ²/2 ∝ η/B exactly
    opts = Options(eps=0.0, h=1e-6, lr_range=(1e-4, 1e-2))
    res = batch_size_section(sw, str(tmp_path), opts)
    rows = {r["source"].split(" (")[0]: r for r in res.summary_rows}
    fe, ig = rows["free energy"], rows["ideal gas"]
    # §5: T scales exactly with U's factor B^-0.6 at every η, so c is recovered exactly
    assert fe["c"] == pytest.approx(-0.6, abs=1e-6) and fe["n_batch_sizes"] == 3
    assert fe["verdict"] == "not_eta_over_B"
    assert ig["a"] == pytest.approx(1.0, abs=0.02) and ig["c"] == pytest.approx(-1.0, abs=0.02)
    assert ig["verdict"] == "eta_over_B" and abs(ig["c"] + 1) <= ig["c_half"]
    assert any(n.startswith("group all, ideal gas (σ²): T depends on η/B only: c = ") for n in res.notes)
    assert len(res.figures) == 2 and all((tmp_path / f).stat().st_size > 5000 for f in res.figures)
    pts = pd.read_csv(tmp_path / "batch_size_temperatures.csv")
    assert set(pts["batch_size"]) == {32, 128, 512}


def test_section_skips_with_one_batch_size(tmp_path):
    sw = _sweep(lambda B: 0.5 / B)
    keep = sw.members.index[sw.members["batch_size"] == 128]
    sw.members, sw.stationary = sw.members.loc[keep], sw.stationary.loc[keep]
    with pytest.raises(Skip, match="1 batch size"):
        batch_size_section(sw, str(tmp_path), Options())


def test_the_report_runs_the_open_question_sections_once():
    """The sections package lists both sections of issue #12, once each, after the toy sections."""
    from analysis.sections import all_sections

    names = [f.__name__ for f in all_sections()]
    assert names.count("batch_size_section") == 1 and names.count("replicates_section") == 1
    assert names.index("sphere_toy_section") < names.index("batch_size_section") < names.index("replicates_section")

