"""The toy-system report sections (analysis/sections/vmf.py, sphere_toy.py) on synthetic MLflow stores.

The stores (SQLite under tmp_path, docs/DESIGN.md layout, written with test_report's helpers)
hold vMF-toy sweeps whose logged U, S_sphere, S_full, radius and pre-projection radius are the
exact von Mises–Fisher values plus perturbations chosen here, and a sphere-toy sweep with
hand-made snr / loss curves. Expected values use closed forms for D = 3, independent of the
Bessel-function code in trainables/toys/vmf.py:
  A_3(κ) = coth κ − 1/κ,  U = 1 − A_3,  S_sphere = log(4π sinh κ / κ) − κ A_3,
  fixed ELR: T = η/2, r*² = η/λ;  fixed LR: T = sqrt(ηλ/4), r*⁴ = η/λ;
  fixed sphere: T = η/2, λ_eff = T (D − 1)/r0² = η/r0².
In D = 3, S_full = S_sphere + 2 log r* = log(2πeT) + 2 log r* up to e^{−2κ} (κ ≥ 20 here), so
∂S_full/∂ln λ = −1 = −(D − 1)/2 (ELR) and S_full depends on η only (LR), exactly.
"""

import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from analysis.load import load_experiment  # noqa: E402
from analysis.report import main  # noqa: E402
from analysis.sections.common import Options, Skip  # noqa: E402
from analysis.sections.sphere_toy import sphere_toy_section  # noqa: E402
from analysis.sections.vmf import (vmf_adiabatic_section,  # noqa: E402
                                  vmf_exact_section)
from conftest import vmf3_entropy, vmf3_mean_cos  # noqa: E402
from test_report import _log_member, _parent  # noqa: E402

LRS = np.logspace(-3, -1, 5)
WDS = np.logspace(-3, -1, 5)
R0S = np.logspace(-1, 1, 5)
ITERS, EVERY = 600_000, 40_000            # 15 log rows; U window 250k → 6 rows, r̃ 150k → 4 rows
ITS = np.arange(EVERY, ITERS + 1, EVERY, dtype=float)
EPS = 0.02                                 # ± wiggle on the last entropy values (mean 0)
UWIG = 1e-3                                # ± wiggle on the U rows of the window, relative to exact U


def U3(k):
    return 1 - vmf3_mean_cos(k)


def _tail(value, n, before):
    """15 rows: `before` everywhere, the last n rows `value` (a wrong window would see `before`)."""
    v = np.full(ITS.size, before, dtype=float)
    v[-n:] = value
    return v


def _entropy(value):
    """12 evaluations: 2 garbage ones, then 10 alternating value ± EPS (mean = value)."""
    its = ITS[-12:]
    v = np.r_[[value + 5.0] * 2, value + EPS * np.array([1, -1] * 5)]
    return its, v


def _vmf_params(protocol, lr, wd, r0):
    return {"model": "vmf", "protocol": protocol, "lr": lr, "wd": wd, "radius": r0, "dim": 3,
            "noise": 1.0, "mu_seed": 44, "seed": 42, "iterations": ITERS,
            "log_schedule": f"every:{EVERY}", "running_every": 50,
            "entropy": [{"name": "kl", "window": 1000, "stride": 50, "standardize": True,
                         "evaluate_last": 10}]}


# perturbations by grid index (i = lr index, j = wd / r0 index); everything else gets the default
DU = {"default": 0.01, (2, 2): 0.08, (0, 0): 0.5}                 # relative, on U
DS = {"default": 0.05, (1, 3): -0.2, (4, 4): 1.0}                  # nats, on S_sphere
DR = {"default": 0.02, (3, 1): -0.025, (0, 4): 0.2}               # relative, radius / λ_eff
AD = {(2, 1): 0.05}                                               # nats on S_full (fixed LR)


def _d(table, i, j):
    return table.get((i, j), table.get("default", 0.0))


def _vmf_metrics(protocol, i, j, lr, x):
    """Log metrics of member (i, j); x = wd (ELR / LR) or r0 (sphere). Returns (metrics, truth)."""
    if protocol == "fixed_elr":
        T, r = lr / 2, math.sqrt(lr / x)
    elif protocol == "fixed_lr":
        T, r = math.sqrt(lr * x / 4), (lr / x) ** 0.25
    else:
        T, r = lr / 2, x
    k = 1 / T
    du, ds, dr = (_d(DU, i, j), _d(DS, i, j), _d(DR, i, j)) if protocol != "fixed_lr" else (0, 0, _d(DR, i, j))
    U = U3(k) * (1 + du)
    S = vmf3_entropy(k) + ds
    S_full = vmf3_entropy(k) + 2 * math.log(r) + (AD.get((i, j), 0.0) if protocol == "fixed_lr" else 0.0)
    u_rows = _tail(U, 6, 3 * U)
    u_rows[-6:] += U3(k) * UWIG * np.array([1, -1] * 3)          # mean unchanged, batch s.e. U·UWIG/√5
    m = {"train_loss": (ITS, u_rows),
         "entropy_kl_sphere": _entropy(S), "entropy_kl_full": _entropy(S_full)}
    if protocol == "fixed_sphere":
        p = lr / x**2 * (1 + dr)                                   # λ_eff = η/r0² (1 + δ)
        m["radius"] = (ITS, np.full(ITS.size, x))
        m["radius_preproj"] = (ITS, _tail(x + p * lr * x**3, 4, x * 1.5))
    else:
        m["radius"] = (ITS, _tail(r * (1 + dr), 6, 1.0))
    return m, {"du": du, "ds": ds, "dr": dr}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("toys")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    info = {"uri": uri, "truth": {}}
    for protocol, second in (("fixed_elr", WDS), ("fixed_lr", WDS), ("fixed_sphere", R0S)):
        exp = client.create_experiment(f"toy_{protocol}", artifact_location=(root / protocol).as_uri())
        pid = _parent(client, exp)
        for i, lr in enumerate(LRS):
            for j, x in enumerate(second):
                m, truth = _vmf_metrics(protocol, i, j, lr, x)
                wd, r0 = (0.0, x) if protocol == "fixed_sphere" else (x, 1.0)
                rid = _log_member(client, exp, pid, _vmf_params(protocol, lr, wd, r0), m)
                info["truth"][rid] = (protocol, i, j, truth)

    # sphere toy: UP snr increasing with LR except one swapped adjacent pair; OP 2 of 3 small LRs converge
    exp = client.create_experiment("toy_sphere", artifact_location=(root / "sphere").as_uri())
    pid = _parent(client, exp)
    its = np.arange(50, 1501, 50, dtype=float)                    # 30 rows; W = 20 → rows 11..30
    up_lrs = np.logspace(-2, 0.5, 8)
    snr = 0.1 * up_lrs**0.5
    snr[[3, 4]] = snr[[4, 3]]
    info["up_snr"] = dict(zip(up_lrs, snr))
    for lr, s in zip(up_lrs, snr):
        v = np.r_[np.full(10, 5.0), np.full(20, s)]
        m = {"train_loss": (its, 0.1 + 0 * its), "snr": (its, v),
             "full_grad_norm": (its, 0.01 * lr + 0 * its), "stoch_grad_mean_norm": (its, 0.2 + 0 * its)}
        _log_member(client, exp, pid, {"model": "sphere_toy", "setting": "up", "lr": lr, "iterations": 1500,
                                       "log_schedule": "every:50", "radius": 1.0, "entropy": []}, m)
    op = [(0.01, 20, 0.3), (0.03, 25, 0.4), (0.1, None, 0.5), (0.3, None, 0.6), (1.0, None, 0.7),
          (3.0, None, 0.8)]                                     # (lr, row where loss < 1e-16, final snr)
    for lr, stop, s in op:
        n = stop + 1 if stop else its.size
        loss = np.geomspace(1e-2, 1e-17, stop + 1) if stop else np.full(its.size, 1e-8)
        m = {"train_loss": (its[:n], loss), "snr": (its[:n], np.r_[np.full(n - 1, 2.0), s]),
             "full_grad_norm": (its[:n], np.sqrt(loss)), "stoch_grad_mean_norm": (its[:n], 2 * np.sqrt(loss))}
        _log_member(client, exp, pid, {"model": "sphere_toy", "setting": "op", "lr": lr, "iterations": 1500,
                                       "log_schedule": "every:50", "radius": 1.0, "entropy": []}, m,
                    status="converged" if stop else "done", regime="converged" if stop else "stationary")
    return info


def _interior(i, j):
    return 1 <= i <= 3 and 1 <= j <= 3


def _expected(store, protocol, key):
    """{run_id: (interior?, injected value)} for one perturbation kind of one protocol."""
    return {rid: (_interior(i, j), abs(tr[key])) for rid, (p, i, j, tr) in store["truth"].items()
            if p == protocol}


# -----------------------------------------------------------------------------

def test_vmf_exact_fixed_elr_errors_equal_injected(store, tmp_path):
    sw = load_experiment("toy_fixed_elr", tracking_uri=store["uri"])
    res = vmf_exact_section(sw, str(tmp_path), Options())
    t = pd.read_csv(tmp_path / "vmf_fixed_elr.csv").set_index("run_id")
    assert len(t) == 25 and t["interior"].sum() == 9
    for key, col in (("du", "U_rel_err"), ("ds", "S_abs_err"), ("dr", "radius_rel_err")):
        exp = _expected(store, "fixed_elr", key)
        for rid, (_, v) in exp.items():
            assert t.loc[rid, col] == pytest.approx(v, rel=1e-9, abs=1e-11), (key, rid)
    # T = η/2 (§7), κ = 1/T; exact values against the D = 3 closed forms
    assert np.allclose(t["T"], t["lr"] / 2, rtol=1e-14)
    assert np.allclose(t["U_exact"], U3(2 / t["lr"]), rtol=1e-10)
    assert np.allclose(t["S_exact"], vmf3_entropy(2 / t["lr"]), rtol=0, atol=1e-10)
    assert np.allclose(t["S_sem"], EPS / 3, rtol=1e-9)            # std of ±ε (ddof 1) / √10
    assert (t["U_rows"] == 6).all()
    # six rows alternating ±δ: std (ddof 1) δ√(6/5), s.e. δ/√5; z = (U_sim − U_exact)/s.e.
    assert np.allclose(t["U_sem"], t["U_exact"] * UWIG / math.sqrt(5), rtol=1e-6)
    du = np.array([_expected(store, "fixed_elr", "du")[rid][1] for rid in t.index])
    assert np.allclose(t["U_z"], du * math.sqrt(5) / UWIG, rtol=1e-6)
    # discrete-step U of fixed ELR: the D = 3 law at κ(1 − η/2), κ = 2/η
    assert np.allclose(t["U_discrete"], U3((1 - t["lr"] / 2) * 2 / t["lr"]), rtol=1e-10)
    assert np.allclose(t["U_discrete_rel_err"],
                       np.abs(t["U_exact"] * (1 + du) / t["U_discrete"] - 1), rtol=1e-8)
    # discrete-step radius (§7) with tr Σ = 2 and the vMF G² = 2 A_3(κ)/κ: r² = η (1 + A_3/κ)/λ
    k = 2 / t["lr"]
    assert np.allclose(t["r_discrete"], np.sqrt(t["lr"] * (1 + vmf3_mean_cos(k) / k) / t["wd"]), rtol=1e-10)
    row = res.summary_rows[0]
    # interior: U errors 0.01 ×8 and 0.08; S 0.05 ×8 and 0.2; radius 0.02 ×8 and 0.025
    assert row["U_rel_err_median"] == pytest.approx(0.01, rel=1e-9)
    assert row["U_rel_err_max"] == pytest.approx(0.08, rel=1e-9)
    assert row["U_rel_err_max_all"] == pytest.approx(0.5, rel=1e-9)
    assert row["U_abs_z_median"] == pytest.approx(0.01 * math.sqrt(5) / UWIG, rel=1e-6)
    assert row["U_abs_z_max"] == pytest.approx(0.08 * math.sqrt(5) / UWIG, rel=1e-6)
    assert row["U_n_abs_z_gt3"] == 9 and row["U_n_abs_z_gt3_expected"] < 1
    assert row["S_abs_err_median"] == pytest.approx(0.05, rel=1e-8)
    assert row["S_abs_err_max"] == pytest.approx(0.2, rel=1e-8)
    assert row["S_abs_err_max_all"] == pytest.approx(1.0, rel=1e-8)
    assert row["radius_rel_err_median"] == pytest.approx(0.02, rel=1e-9)
    assert row["radius_rel_err_max"] == pytest.approx(0.025, rel=1e-9)
    assert row["pass_U"] is False and row["pass_S"] is True and row["pass_radius"] is True
    assert row["pass_all"] is False
    # S_full = log(πeη) + log(η/λ) exactly: ∂S/∂ln λ = −1, the quadratic terms vanish
    assert row["maxwell_ratio"] == pytest.approx(-1.0, abs=1e-8)
    assert row["maxwell_ratio_centre"] == pytest.approx(-1.0, abs=1e-8)
    assert abs(row["maxwell_ratio_2"]) < 1e-8 and abs(row["maxwell_ratio_3"]) < 1e-8
    assert row["pass_maxwell"] is True
    for f in res.figures:
        assert (tmp_path / f).stat().st_size > 5000


def test_vmf_exact_fixed_sphere_pressure_and_helmholtz(store, tmp_path):
    sw = load_experiment("toy_fixed_sphere", tracking_uri=store["uri"])
    res = vmf_exact_section(sw, str(tmp_path), Options())
    t = pd.read_csv(tmp_path / "vmf_fixed_sphere.csv").set_index("run_id")
    for rid, (_, v) in _expected(store, "fixed_sphere", "dr").items():
        assert t.loc[rid, "radius_rel_err"] == pytest.approx(v, rel=1e-6), rid
    assert np.allclose(t["p_predicted"], t["lr"] / t["r0"] ** 2, rtol=1e-12)
    k = 2 / t["lr"]
    assert np.allclose(t["p_discrete"], t["lr"] * (1 + vmf3_mean_cos(k) / k) / t["r0"] ** 2, rtol=1e-10)
    assert (t["r_tilde_rows"] == 4).all()
    row = res.summary_rows[0]
    assert row["pressure_rel_err_median"] == pytest.approx(0.02, rel=1e-6)
    assert row["pressure_rel_err_max"] == pytest.approx(0.025, rel=1e-6)
    assert row["pass_pressure"] is True and "maxwell_ratio" not in row
    # Helmholtz per r0 over the perturbed U/S: each member's own rank is reported for all 25
    assert t["potential_rank"].notna().all()


def test_helmholtz_exact_vmf_is_own_minimiser(store, tmp_path, monkeypatch):
    """With U and S exactly vMF (no perturbation) U(T') − T S(T') is minimal at T' = T (Gibbs)."""
    import analysis.sections.vmf_table as tr
    sw = load_experiment("toy_fixed_sphere", tracking_uri=store["uri"])
    t = tr.vmf_member_table(sw, sw.members.rename(columns={"radius": "r0"}))
    t["U_sim"] = U3(2 / t["lr"])
    t["S_full"] = vmf3_entropy(2 / t["lr"]) + 2 * np.log(t["r0"])
    rank, gap, kind = tr.potential(t, "fixed_sphere")
    assert kind.startswith("Helmholtz") and (rank == 0).all() and np.allclose(gap, 0)
    t["U_sim"] = U3(2 / t["lr"][::-1].to_numpy())                   # wrong pairing → not minimisers
    rank, _, _ = tr.potential(t, "fixed_sphere")
    assert (rank > 0).sum() >= 10


def test_vmf_fixed_lr_adiabatic_spread(store, tmp_path):
    sw = load_experiment("toy_fixed_lr", tracking_uri=store["uri"])
    res = vmf_adiabatic_section(sw, str(tmp_path), Options())
    row = res.summary_rows[0]
    # S_full depends on η only, except the one interior member bumped by 0.05 at lr index 2
    assert row["spread_max"] == pytest.approx(0.05, abs=1e-9)
    assert row["spread_max_at_lr"] == pytest.approx(LRS[2], rel=1e-12)
    assert row["spread_exact_max"] < 1e-9 and row["spread_median"] < 1e-9
    assert row["estimator_sem_median"] == pytest.approx(EPS / 3, rel=1e-9)
    assert row["spread_max_over_sem"] == pytest.approx(0.05 / (EPS / 3), rel=1e-6)
    sp = pd.read_csv(tmp_path / res.tables[0])
    assert len(sp) == 3                                             # interior η only
    ex = vmf_exact_section(sw, str(tmp_path), Options()).summary_rows[0]
    t = pd.read_csv(tmp_path / "vmf_fixed_lr.csv")
    assert np.allclose(t["T"], np.sqrt(t["lr"] * t["wd"] / 4), rtol=1e-12)
    assert ex["U_rel_err_max"] < 1e-9 and ex["S_abs_err_max"] < 1e-9 and ex["pass_U"] and ex["pass_S"]
    assert ex["radius_rel_err_median"] == pytest.approx(0.02, rel=1e-9)


def test_vmf_adiabatic_skips_a_group_without_weight_decay_and_keeps_the_others(store, tmp_path):
    """λ = 0 (the vmf default) in one group must not take the other groups' adiabatic check with it."""
    client = MlflowClient(tracking_uri=store["uri"])
    exp = client.create_experiment("toy_fixed_lr_wd0", artifact_location=(tmp_path / "a").as_uri())
    pid = _parent(client, exp)
    for i, lr in enumerate(LRS):
        for j, wd in enumerate(WDS):
            m, _ = _vmf_metrics("fixed_lr", i, j, lr, wd)
            _log_member(client, exp, pid, _vmf_params("fixed_lr", lr, wd, 1.0), m)
        m, _ = _vmf_metrics("fixed_lr", i, 0, lr, WDS[0])             # any finite series will do
        _log_member(client, exp, pid, dict(_vmf_params("fixed_lr", lr, 0.0, 1.0), noise=0.5), m)
    sw = load_experiment("toy_fixed_lr_wd0", tracking_uri=store["uri"])
    res = vmf_adiabatic_section(sw, str(tmp_path), Options())
    assert [r["group"] for r in res.summary_rows] == ["noise=1.0"]
    assert res.summary_rows[0]["spread_max"] == pytest.approx(0.05, abs=1e-9)
    assert any("noise=0.5" in n and "weight decay" in n for n in res.notes), res.notes


def test_sphere_toy_flags(store, tmp_path):
    sw = load_experiment("toy_sphere", tracking_uri=store["uri"], stationary_window=20)
    res = sphere_toy_section(sw, str(tmp_path), Options())
    rows = {r["group"]: r for r in res.summary_rows}
    up, op = rows["up"], rows["op"]
    # one swapped adjacent pair among 8: Spearman 1 − 6·2/(8·63); 6 of 7 consecutive pairs increase
    assert up["snr_spearman"] == pytest.approx(1 - 12 / 504, rel=1e-12)
    assert up["snr_monotone_fraction"] == pytest.approx(6 / 7)
    # over lr ≤ 1 (6 of the 8 LRs, the swapped pair included): 1 − 6·2/(6·35), 4 of 5 pairs increase
    assert up["snr_spearman_low_lr"] == pytest.approx(1 - 12 / 210, rel=1e-12)
    assert up["snr_monotone_fraction_low_lr"] == pytest.approx(4 / 5)
    assert up["snr_increasing"] is True
    assert up["lr_at_snr_max"] == pytest.approx(10**0.5)
    t = pd.read_csv(tmp_path / "sphere_toy.csv")
    ups = t[t["setting"] == "up"]
    assert np.allclose(ups["stationary_snr"], [store["up_snr"][lr] for lr in ups["lr"]], rtol=1e-12)
    assert op["n_small"] == 3 and op["frac_small_converged"] == pytest.approx(2 / 3)
    assert op["frac_converged_snr_positive"] == 1.0 and op["largest_converged_lr"] == pytest.approx(0.03)
    ops = t[t["setting"] == "op"].set_index("lr")
    first = int(np.argmax(np.geomspace(1e-2, 1e-17, 26) < 1e-16))      # row index of the 1e-16 crossing
    assert ops.loc[0.01, "final_snr"] == pytest.approx(0.3) and ops.loc[0.03, "converged_at"] == (first + 1) * 50
    assert set(res.figures) == {"sphere_toy_training.png", "sphere_toy_snr.png"}


def test_sections_skip_other_models(store, tmp_path):
    sphere = load_experiment("toy_sphere", tracking_uri=store["uri"])
    elr = load_experiment("toy_fixed_elr", tracking_uri=store["uri"])
    for fn, sw in ((vmf_exact_section, sphere), (vmf_adiabatic_section, sphere),
                   (vmf_adiabatic_section, elr), (sphere_toy_section, elr)):
        with pytest.raises(Skip):
            fn(sw, str(tmp_path), Options())


def test_report_main_runs_toy_sections(store, tmp_path):
    out = tmp_path / "rep"
    assert main(["--experiment", "toy_fixed_lr", "--tracking-uri", store["uri"], "--out", str(out),
                 "--no-upload"]) == 0
    md = (out / "summary.md").read_text()
    assert "## vmf_exact" in md and "## vmf_adiabatic" in md
    assert "pass_U" in md and (out / "vmf_fixed_lr_exact.png").exists()
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["section"]) >= {"vmf_exact", "vmf_adiabatic"}


def test_z_verdict_counts_outliers_against_chance():
    """docs/theory.md §8: with dof 24, P(|t| > 3) = 0.00619 (Student t tables), so 225 members expect 1.39
    outliers; with the margin (twice that) the 99 % Poisson quantile of mean 2.79 is 7: 7 pass, 8 fail.
    A median |z| above 1 fails whatever the count."""
    from analysis.sections.vmf_table import z_verdict
    rng = np.random.default_rng(0)
    base = np.abs(rng.standard_normal(225)) * 0.5          # median ≈ 0.34, no |z| > 3
    base[base > 2.9] = 2.9
    out, ok = z_verdict(base, 24)
    assert out["n_abs_z_gt3_expected"] == pytest.approx(225 * 0.00619, rel=0.01)
    assert out["n_abs_z_gt3_allowed"] == 7 and out["n_abs_z_gt3"] == 0 and ok
    for n_out, want in ((7, True), (8, False)):
        z = base.copy()
        z[:n_out] = 3.5
        assert z_verdict(z, 24)[1] is want
    assert z_verdict(base + 1.0, 24)[1] is False                # median |z| ≈ 1.34
    assert z_verdict([np.nan], 24)[1] is False                  # nothing to judge
