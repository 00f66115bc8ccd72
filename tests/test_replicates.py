"""analysis.replicates on synthetic member tables (pure numpy/pandas, no Ray, no MLflow)."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as student_t

from analysis.replicates import (config_bands, explode_curve, fit_bands, ideal_gas_predictions, log_band,
                                 per_seed_fits, replicate_axes, require_replicates, t_band,
                                 temperature_fit)
from analysis.sections.common import Options, Skip

LRS = np.logspace(-3, -1, 5)


def _members(n_seeds, rng, mu=lambda lr: 1.0 + lr, sd=0.1, widths=(8,)):
    """One row per (width, lr, seed): U = mu(lr) + N(0, sd²), like a member_table."""
    rows = [{"model": "convnet", "width": w, "protocol": "fixed_sphere", "lr": lr, "seed": s,
             "init_seed": 1, "train_loss": mu(lr) + sd * rng.standard_normal()}
            for w in widths for lr in LRS for s in range(n_seeds)]
    t = pd.DataFrame(rows)
    t.index = [f"run{i}" for i in range(len(t))]
    return t


def test_t_band_matches_the_textbook_interval():
    x = np.array([1.0, 2.0, 4.0])
    b = t_band(x, 0.9)
    h = student_t.ppf(0.95, 2) * np.std(x, ddof=1) / np.sqrt(3)   # 2.92 · 1.528 / 1.732
    assert b.mean == pytest.approx(7 / 3)
    assert b.lo == pytest.approx(7 / 3 - h) and b.hi == pytest.approx(7 / 3 + h)
    assert h == pytest.approx(2.5758, rel=1e-3)
    one = t_band([np.nan, 3.0])
    assert one.n == 1 and one.mean == 3.0 and np.isnan(one.lo)
    g = log_band([1.0, 100.0])
    assert g.mean == pytest.approx(10.0) and g.lo < 10 < g.hi


def test_replicate_axes_and_skip_reasons():
    rng = np.random.default_rng(0)
    t = _members(3, rng)
    assert replicate_axes(t) == ("seed",)
    assert require_replicates(t) == ("seed",)
    with pytest.raises(Skip, match="no replicate axis"):
        require_replicates(t[t["seed"] == 0])
    # seeds that never repeat a configuration: one seed per lr
    single = t[t["seed"] == (np.searchsorted(LRS, t["lr"]) % 3)]
    with pytest.raises(Skip, match="fewer than 2 seeds"):
        require_replicates(single)


def test_config_bands_cover_the_true_mean_at_the_stated_rate():
    """200 synthetic sweeps, 4 seeds per configuration, known mean and spread: the 90 % band holds
    the true mean in 80–97 % of the (sweep, lr) cases."""
    rng = np.random.default_rng(12)
    hits = total = 0
    for _ in range(200):
        t = _members(4, rng, sd=0.2)
        b = config_bands(t, ["train_loss"], ("seed",), level=0.9)
        assert (b["n_seeds"] == 4).all() and len(b) == len(LRS)
        truth = 1.0 + b["lr"].to_numpy(float)
        hits += int(((b["train_loss_lo"] <= truth) & (truth <= b["train_loss_hi"])).sum())
        total += len(b)
    assert 0.80 <= hits / total <= 0.97, hits / total


def _power_law_fit(members):
    from analysis.free_energy import power_law_fit
    a, b = power_law_fit(members["lr"], members["T"])
    return {"a": a, "b": b}


def test_per_seed_fit_bands_cover_the_true_exponent_and_prefactor():
    """Per-seed power-law fits, then a t-interval over 4 seeds (log scale for b): over 200 draws
    the 90 % bands hold the true exponent and prefactor in 80–97 % of the draws."""
    rng = np.random.default_rng(7)
    a_true, b_true, hit_a, hit_b = 0.85, 4e-3, 0, 0
    for _ in range(200):
        rows = []
        for s in range(4):     # each seed: its own exponent and prefactor around the truth
            a_s = a_true + 0.05 * rng.standard_normal()
            b_s = b_true * np.exp(0.2 * rng.standard_normal())
            rows += [{"width": 8, "lr": lr, "seed": s, "T": b_s * lr ** a_s} for lr in LRS]
        t = pd.DataFrame(rows)
        fits = per_seed_fits(t, ("seed",), ("lr",), _power_law_fit)
        assert len(fits) == 4 and "error" not in fits
        band = fit_bands(fits, ["a", "b"], 0.9, log_columns=("b",)).iloc[0]
        hit_a += band["a_lo"] <= a_true <= band["a_hi"]
        hit_b += band["b_lo"] <= b_true <= band["b_hi"]
    assert 0.80 <= hit_a / 200 <= 0.97, hit_a
    assert 0.80 <= hit_b / 200 <= 0.97, hit_b


def test_bands_shrink_from_two_to_four_seeds():
    rng = np.random.default_rng(3)
    t = _members(4, rng, sd=0.2, widths=(1, 2, 4, 8, 16, 32))
    two = config_bands(t, ["train_loss"], ("seed",), first=2)
    four = config_bands(t, ["train_loss"], ("seed",))
    assert (two["n_seeds"] == 2).all() and (four["n_seeds"] == 4).all()
    w2 = (two["train_loss_hi"] - two["train_loss_lo"]).median()
    w4 = (four["train_loss_hi"] - four["train_loss_lo"]).median()
    # t_{.95,1}/√2 ≈ 4.5 vs t_{.95,3}/2 ≈ 1.2 (times the sd): about 3.8× narrower
    assert w4 < w2 / 2, (w2, w4)


def test_temperature_fit_per_seed_recovers_each_seeds_exponent():
    """Exact free-energy family per seed (S = C ln η, U = (b C/a) η^a ⇒ T = b η^a, docs/theory.md §5)
    with a seed-specific exponent: each seed's fit returns its own a, and the band is centred on
    their mean."""
    lrs = np.logspace(-4, -2, 9)
    a_seed, b, C = [0.80, 0.85, 0.90], 3.9e-3, 50.0
    rows = [{"width": 8, "lr": lr, "seed": s, "train_loss": b * C / a * lr ** a,
             "entropy_knn_k50": C * np.log(lr)} for s, a in enumerate(a_seed) for lr in lrs]
    t = pd.DataFrame(rows)
    opts = Options(eps=0.0, lr_range=(lrs[0], lrs[-1]), h=1e-6)   # no smoothing: exact family
    fits = per_seed_fits(t, ("seed",), ("lr",), lambda m: temperature_fit(m, "entropy_knn_k50", opts))
    np.testing.assert_allclose(fits["a"], a_seed, atol=0.02)
    band = fit_bands(fits, ["a", "b"], log_columns=("b",)).iloc[0]
    assert band["a_mean"] == pytest.approx(np.mean(fits["a"]))
    assert band["a_lo"] < 0.85 < band["a_hi"]
    curve = explode_curve(fits, "T_by_lr", "lr", "T")
    assert len(curve) == 3 * len(lrs) and set(curve["replicate"]) == {"seed=0", "seed=1", "seed=2"}


def test_ideal_gas_predictions_per_member():
    t = pd.DataFrame({"protocol": ["fixed_elr", "fixed_lr", "fixed_lr"], "lr": [0.01, 0.1, 0.1],
                      "wd": [0.1, 0.01, 0.0], "D": [11, 11, 11], "trace_sigma": [2.0, 2.0, 2.0],
                      "grad_sq": [0.5, 0.5, 0.5], "radius": [1.0, 1.0, 1.0]})
    p = ideal_gas_predictions(t)
    # fixed ELR: σ² = 0.2, T = η σ²/2 = 1e-3, r*² = T (D−1)/λ = 0.1; discrete r*² = η (trΣ+G²)/(2λ) = 0.125
    assert p["T_ig"][0] == pytest.approx(1e-3)
    assert p["r_sde"][0] == pytest.approx(np.sqrt(0.1))
    assert p["r_discrete"][0] == pytest.approx(np.sqrt(0.125))
    # fixed LR: T = sqrt(η λ σ² / (2(D−1))) = sqrt(0.1·0.01·0.2/20) = sqrt(1e-5); λ = 0: no prediction
    assert p["T_ig"][1] == pytest.approx(np.sqrt(1e-5))
    assert np.isnan(p["T_ig"][2]) and np.isnan(p["r_sde"][2])


def _seed_sweep(n_seeds, rng):
    """A hand-built fixed-sphere Sweep: 9 LRs × n seeds, the exact §5 family with a per-seed
    exponent a_s ~ 0.85 + 0.03 N(0, 1), and tr Σ with 5 % per-seed noise."""
    from analysis.load import Sweep

    lrs, C, D = np.logspace(-4, -2, 9), 50.0, 101
    a_s = 0.85 + 0.03 * rng.standard_normal(n_seeds)
    rows = [{"model": "convnet", "width": 8, "protocol": "fixed_sphere", "lr": lr, "seed": s, "D": D,
             "status": "done", "regime": "stationary", "running": False, "excluded": "",
             "train_loss": 3.9e-3 * C / a_s[s] * lr ** a_s[s], "entropy_knn_k50": C * np.log(lr),
             "trace_sigma": (D - 1) * 0.01 * np.exp(0.05 * rng.standard_normal())}
            for s in range(n_seeds) for lr in lrs]
    t = pd.DataFrame(rows, index=pd.Index([f"r{i}" for i in range(len(rows))], name="run_id"))
    stat = t[["train_loss", "entropy_knn_k50", "trace_sigma"]]
    members = t.drop(columns=stat.columns)
    return Sweep("mem", "0", None, None, members, stat.reset_index().assign(iteration=1000),
                 pd.DataFrame(), stat), a_s


def test_replicates_section_bands_and_two_vs_four_seeds(tmp_path):
    from analysis.sections.replicates import replicates_section

    sw, a_s = _seed_sweep(4, np.random.default_rng(11))
    res = replicates_section(sw, str(tmp_path), Options(eps=0.0, h=1e-6, lr_range=(1e-4, 1e-2)))
    rows = {(r["group"], r["quantity"]): r for r in res.summary_rows}
    a = rows[("all", "a")]
    assert a["n_seeds"] == 4
    assert a["mean"] == pytest.approx(a_s.mean(), abs=0.01)
    half = student_t.ppf(0.95, 3) * np.std(a_s, ddof=1) / 2        # the band of the true per-seed a
    assert (a["hi"] - a["lo"]) / 2 == pytest.approx(half, rel=0.15)
    assert a["width_2_seeds"] > a["width_all_seeds"]
    assert rows[("all", "§5 hypothesis holds")]["mean"] == "4/4 seeds"     # the exact family: it holds
    T_ig = rows[("median over configurations", "T_ig")]
    assert T_ig["width_2_seeds"] > T_ig["width_all_seeds"] > 0
    tb = pd.read_csv(tmp_path / "replicates_temperature.csv")
    assert (tb["T_lo"] < tb["T_mean"]).all() and (tb["T_mean"] < tb["T_hi"]).all()
    assert {"rep_all_stationary.png", "rep_all_temperature.png"} <= set(res.figures)


def test_replicates_section_skips_without_seeds(tmp_path):
    from analysis.sections.replicates import replicates_section

    sw, _ = _seed_sweep(1, np.random.default_rng(0))
    with pytest.raises(Skip, match="no replicate axis"):
        replicates_section(sw, str(tmp_path), Options())


def test_maxwell_errors_are_banded_over_seeds(tmp_path):
    """fixed ELR, S_full = ln η − R(1 + δ_s) ln λ per seed (R = (D − 1)/2): the §7 relation
    ∂S/∂ln λ = −R is off by exactly |δ_s| everywhere, so each seed's max relative error is |δ_s|."""
    from analysis.load import Sweep
    from analysis.sections.replicates import replicates_section

    D, deltas = 21, [0.01, 0.03, 0.05]
    R = (D - 1) / 2
    lr, wd = (v.ravel() for v in np.meshgrid(np.logspace(-3, -1, 3), np.logspace(-3, -1, 3), indexing="ij"))
    rows = [{"model": "vmf", "protocol": "fixed_elr", "lr": a, "wd": w, "seed": s, "D": D,
             "status": "done", "regime": "stationary", "running": False, "excluded": "",
             "entropy_kl_full": np.log(a) - R * (1 + d) * np.log(w)}
            for s, d in enumerate(deltas) for a, w in zip(lr, wd)]
    t = pd.DataFrame(rows, index=pd.Index([f"r{i}" for i in range(len(rows))], name="run_id"))
    stat = t[["entropy_kl_full"]]
    sw = Sweep("mem", "0", None, None, t.drop(columns=stat.columns), stat.reset_index().assign(iteration=1),
               pd.DataFrame(), stat)
    res = replicates_section(sw, str(tmp_path), Options())
    rows = {r["quantity"]: r for r in res.summary_rows if r["group"] == "all"}
    err = rows["maxwell_rel_err_max"]
    assert err["n_seeds"] == 3 and err["mean"] == pytest.approx(np.mean(deltas), rel=1e-6)
    h = student_t.ppf(0.95, 2) * np.std(deltas, ddof=1) / np.sqrt(3)
    assert (err["lo"], err["hi"]) == pytest.approx((0.03 - h, 0.03 + h), rel=1e-6)
    assert rows["maxwell_ratio_1"]["mean"] == pytest.approx(-(1 + np.mean(deltas)), rel=1e-6)
