"""End-to-end tests of analysis.load and analysis.report on a synthetic MLflow store.

The store (SQLite under tmp_path) is written with MlflowClient in the docs/DESIGN.md layout:
  * fe_sweep     – fixed_sphere ConvNet(8), 8 LRs whose stationary (U, S) follow the exact
                   free-energy family S = C ln η, U = (b C / a) η^a (so T = b η^a), plus one
                   converging small LR; gradient norms with stoch = e^B · full^A_PH exactly.
  * ig_sweep     – fixed_elr vMF toy over lr × wd with S_full an exact Maxwell quadratic
                   (∂S/∂ln λ = −(D − 1)/2) plus small per-member noise.
  * broken_sweep – a diverged member, a member without entropy, a running member, no gradients.
Expected numbers are computed here from the generated arrays with the formula modules.
"""

import json
import os

import numpy as np
import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from analysis.free_energy import fit_temperature  # noqa: E402
from analysis.ideal_gas import maxwell_fit  # noqa: E402
from analysis.load import Sweep, _fetch_histories, load_experiment  # noqa: E402
from analysis.report import build_report, main  # noqa: E402
from analysis.sections.common import Options, SectionResult  # noqa: E402
from analysis.sections.ideal_gas import ideal_gas_section  # noqa: E402
from trainables.schedule import log_iterations  # noqa: E402

A_TRUE, B_TRUE, C_S = 0.85, 3.9e-3, 50.0
A_PH, B_PH = 0.78, 0.5
FE_LRS = np.logspace(-4, -2, 8)
LR_CONV = 1e-5                           # converging member, outside the segment
FE_ITERS, FE_SCHED, D_FE = 3000, "log:100", 24408
W_FE = 26   # log:100 keeps the free-energy schedule's share of stationary logs: 100 · 50/193 ≈ 25.9
IG_LRS, IG_WDS, D_IG = np.logspace(-3, -1, 4), np.logspace(-3, -1, 4), 3
IG_ITERS = 10000
MAXWELL = (2.0, 1.0, -(D_IG - 1) / 2, 0.05, 0.0, 0.0)   # c0..c5, c4 = c5 = 0: relation exact
PNG = b"\x89PNG\r\n\x1a\n"


def _params(**kw):
    base = {"model": "convnet", "width": 8, "dataset": "digits", "samples_per_label": None,
            "loss": "ce", "protocol": "fixed_sphere", "lr": 0.01, "wd": 0.0, "radius": 1.0,
            "batch_size": 128, "iterations": FE_ITERS, "seed": 0, "log_schedule": FE_SCHED,
            "running_every": 50, "num_stoch_grads": 1000,
            "entropy": [{"name": "knn", "window": 1000, "stride": 1, "ks": [20, 50]}]}
    base.update(kw)
    return base


def _log_member(client, exp_id, parent_id, params, metrics, status="done", regime="stationary",
                run_status="FINISHED"):
    """metrics: name -> (iterations, values); names may start with running/."""
    run = client.create_run(exp_id, tags={"mlflow.parentRunId": parent_id,
                                          "thermosweep.role": "member",
                                          "thermosweep.status": status,
                                          "thermosweep.regime": regime})
    rid = run.info.run_id
    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v))
             for k, v in params.items()]
    ms = [Metric(k, float(v), 1000 + int(t), int(t)) for k, (its, vals) in metrics.items()
          for t, v in zip(its, vals)]
    n0 = 1000 - len(items)                       # log_batch takes ≤ 1000 entries in all
    client.log_batch(rid, params=items, metrics=ms[:n0])
    for a in range(n0, len(ms), 1000):
        client.log_batch(rid, metrics=ms[a:a + 1000])
    if run_status != "RUNNING":
        client.set_terminated(rid, run_status)
    return rid


def _parent(client, exp_id):
    run = client.create_run(exp_id, tags={"thermosweep.role": "sweep",
                                          "thermosweep.sweep_status": "finished"})
    return run.info.run_id


def _fe_member_metrics(lr, rng, entropy=True, grads=True):
    its = np.array(log_iterations(FE_SCHED, FE_ITERS), dtype=float)
    ent_its = its[its >= 100]                      # entropy only once its window is complete
    if lr == LR_CONV:                              # converging: U and S keep falling
        U = 0.3 * (its + 10) ** -0.5
        S = -700.0 - 30.0 * np.log(ent_its)
    else:
        U = B_TRUE * C_S / A_TRUE * lr**A_TRUE + 0.7 + 0.5 * np.exp(-its / 30)
        U = U + rng.normal(0, 1e-7, its.size)
        S = C_S * np.log(lr) - 3.0 * np.exp(-ent_its / 30) + rng.normal(0, 1e-4, ent_its.size)
    full = 0.1 * lr**0.3 * (its + 1) ** -0.3
    m = {"train_loss": (its, U), "radius": (its, np.ones_like(its)),
         "running/radius_preproj": (np.arange(50, FE_ITERS + 1, 50), 1 + lr * np.ones(60))}
    if entropy:
        m["entropy_knn_k50"] = (ent_its, S)
        m["entropy_knn_k20"] = (ent_its, S - 5)
    if grads:
        m["full_grad_norm"] = (its, full)
        m["stoch_grad_mean_norm"] = (its, np.exp(B_PH) * full**A_PH)
        m["snr"] = (its, 0.2 * lr**0.5 + 0.1 * np.exp(-its / 100))
    return m


def _ig_member_metrics(lr, wd, rng):
    its = np.array(log_iterations("ideal_gas", IG_ITERS), dtype=float)
    x, y = np.log(lr), np.log(wd)
    c0, c1, c2, c3, c4, c5 = MAXWELL
    S = c0 + c1 * x + c2 * y + c3 * x * x + c4 * y * y + c5 * x * y + rng.normal(0, 0.01)
    sigma2 = 0.8 + 0.05 * x
    T = lr * sigma2 / 2
    r = np.sqrt(T * (D_IG - 1) / wd) * 1.02
    ones = np.ones_like(its)
    return {"entropy_kl_full": (its, S * ones + rng.normal(0, 1e-3, its.size)),
            "trace_sigma": (its, sigma2 * (D_IG - 1) * ones),
            "grad_sq": (its, 0.01 * ones), "radius": (its, r * ones),
            "train_loss": (its, (1 - 1 / (1 + T)) * ones)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    rng = np.random.default_rng(0)
    info = {"uri": uri, "root": root, "fe": {}, "ig": {}}

    exp = client.create_experiment("fe_sweep", artifact_location=(root / "art_fe").as_uri())
    pid = _parent(client, exp)
    info["fe_parent"] = pid
    for lr in [LR_CONV, *FE_LRS]:
        m = _fe_member_metrics(lr, rng)
        rid = _log_member(client, exp, pid, _params(lr=lr, D=D_FE), m,
                          status="converged" if lr == LR_CONV else "done")
        info["fe"][lr] = (rid, m)

    exp = client.create_experiment("ig_sweep", artifact_location=(root / "art_ig").as_uri())
    pid = _parent(client, exp)
    info["ig_parent"] = pid
    for lr in IG_LRS:
        for wd in IG_WDS:
            m = _ig_member_metrics(lr, wd, rng)
            p = _params(model="vmf", dim=3, protocol="fixed_elr", lr=lr, wd=wd, D=D_IG,
                        iterations=IG_ITERS, log_schedule="ideal_gas",
                        entropy=[{"name": "kl", "window": 1000, "stride": 50}])
            info["ig"][(lr, wd)] = (_log_member(client, exp, pid, p, m), m)

    exp = client.create_experiment("broken_sweep", artifact_location=(root / "art_br").as_uri())
    pid = _parent(client, exp)
    info["broken_parent"] = pid
    lrs = np.logspace(-4, -2, 5)
    for i, lr in enumerate(lrs):
        m = _fe_member_metrics(lr, rng, entropy=(i != 1), grads=False)
        kw = {}
        if i == 0:   # diverged: stopped early
            m = {k: (its[:20], v[:20]) for k, (its, v) in m.items()}
            kw = {"status": "diverged", "regime": "diverged", "run_status": "FINISHED"}
        if i == 4:
            kw = {"status": "running", "regime": None, "run_status": "RUNNING"}
        run_kw = {k: v for k, v in kw.items() if k != "regime"}
        rid = _log_member(client, exp, pid, _params(lr=lr, D=D_FE), m,
                          regime=kw.get("regime", "stationary") or "stationary", **run_kw)
        info.setdefault("broken", []).append(rid)
    return info


def _tail_mean(metrics, key, w):
    return float(np.mean(metrics[key][1][-w:]))


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 5000


# -----------------------------------------------------------------------------

def test_load_experiment_parses_layout(store):
    sw = load_experiment("fe_sweep", tracking_uri=store["uri"])
    assert sw.parent["run_id"] == store["fe_parent"]
    assert len(sw.members) == 9 and not sw.excluded
    rid, m = store["fe"][FE_LRS[3]]
    row = sw.members.loc[rid]
    assert isinstance(row["lr"], float) and row["lr"] == pytest.approx(FE_LRS[3], rel=1e-12)
    assert row["width"] == 8 and isinstance(row["width"], (int, np.integer)) and row["D"] == D_FE
    assert row["samples_per_label"] is None and row["entropy"][0]["ks"] == [20, 50]
    assert row["status"] == "done" and row["regime"] == "stationary" and not row["running"]
    # series: one row per (member, log step); entropy NaN before its window is complete
    s = sw.series[sw.series["run_id"] == rid].set_index("iteration")
    its, U = m["train_loss"]
    assert len(s) == its.size and np.allclose(s.loc[its, "train_loss"], U, rtol=0, atol=1e-12)
    assert s.loc[its[its < 100], "entropy_knn_k50"].isna().all()
    r = sw.running[sw.running["run_id"] == rid]
    assert len(r) == 60 and "radius_preproj" in r.columns
    # stationary: last W logs of each metric (log:N schedule), counted per metric
    st = sw.stationary.loc[rid]
    assert st["window"] == W_FE
    assert st["train_loss"] == pytest.approx(_tail_mean(m, "train_loss", W_FE), rel=1e-12)
    assert st["entropy_knn_k50"] == pytest.approx(_tail_mean(m, "entropy_knn_k50", W_FE), rel=1e-12)
    sw30 = load_experiment("ig_sweep", tracking_uri=store["uri"])
    rid, m = store["ig"][(IG_LRS[0], IG_WDS[0])]
    assert sw30.stationary.loc[rid, "window"] == 30
    assert sw30.stationary.loc[rid, "entropy_kl_full"] == pytest.approx(
        _tail_mean(m, "entropy_kl_full", 30), rel=1e-12)
    # an explicit parent run; a wrong one is a clear error
    same = load_experiment("fe_sweep", tracking_uri=store["uri"], parent_run=store["fe_parent"])
    assert sorted(same.members.index) == sorted(sw.members.index)
    with pytest.raises(ValueError, match="belongs to experiment"):
        load_experiment("fe_sweep", tracking_uri=store["uri"], parent_run=store["ig_parent"])
    # the per-(run, key) fallback (stores without a bulk query) returns the same histories
    client = MlflowClient(tracking_uri=store["uri"])

    class NoBulk:                       # hides the SQL store, like a REST client would
        get_metric_history = client.get_metric_history

    keys = {r: ["train_loss", "entropy_knn_k50"] for r in list(sw.members.index)[:3]}
    a = _fetch_histories(client, keys).sort_values(["run_id", "key", "step"], ignore_index=True)
    b = _fetch_histories(NoBulk(), keys).sort_values(["run_id", "key", "step"], ignore_index=True)
    assert len(a) > 0
    pd.testing.assert_frame_equal(a[["run_id", "key", "step", "value"]], b[["run_id", "key", "step", "value"]])
    sw7 = load_experiment("fe_sweep", tracking_uri=store["uri"], stationary_window=7)
    rid, m = store["fe"][FE_LRS[0]]
    assert sw7.stationary.loc[rid, "train_loss"] == pytest.approx(_tail_mean(m, "train_loss", 7))


def test_free_energy_and_snr_report(store, tmp_path):
    out = tmp_path / "rep"
    rc = main(["--experiment", "fe_sweep", "--tracking-uri", store["uri"], "--out", str(out),
               "--eps", "1e-6", "--lr-range", "1e-4", "1e-2", "--uniform-n", "100"])
    assert rc == 0
    for name in ("fe_all_training.png", "fe_all_stationary.png", "fe_all_temperature.png",
                 "fe_all_free_energy.png", "fe_all_op_temperature.png", "snr_all_training.png",
                 "snr_all_stationary.png", "snr_all_phase.png"):
        assert _is_png(out / name), name
    summary = pd.read_csv(out / "summary.csv")
    fe = summary[summary["section"] == "free_energy"].iloc[0]
    # expected: the same fit on stationary values computed here from the generated arrays
    lrs = np.array([LR_CONV, *FE_LRS])
    U = np.array([_tail_mean(store["fe"][lr][1], "train_loss", W_FE) for lr in lrs])
    S = np.array([_tail_mean(store["fe"][lr][1], "entropy_knn_k50", W_FE) for lr in lrs])
    fit = fit_temperature(lrs, U, S, eps=1e-6, lr_range=(1e-4, 1e-2))
    assert fe["exponent_a"] == pytest.approx(fit.a, rel=1e-6)
    assert fe["prefactor_b"] == pytest.approx(fit.b, rel=1e-6)
    assert fe["exponent_a"] == pytest.approx(A_TRUE, abs=0.01)
    assert fe["prefactor_b"] == pytest.approx(B_TRUE, rel=0.1)
    assert bool(fe["holds"]) and fe["n_empty"] == 0 and fe["k"] == 50 and fe["n_segment"] == 8
    assert fe["lr_lo"] == pytest.approx(1e-4) and fe["lr_hi"] == pytest.approx(1e-2)
    table = pd.read_csv(out / "fe_all.csv")
    assert table["in_segment"].sum() == 8 and not table.loc[0, "in_segment"]   # LR_CONV dropped
    # OP decay drawn for the converging member: finite-difference T = ΔU/ΔS > 0
    op = pd.read_csv(out / "fe_all_op_temperature.csv")
    assert set(op["lr"]) == {LR_CONV} and (op["T"] > 0).all()
    # SNR: the exact relation stoch = e^B full^A gives the exponent for every member
    ex = pd.read_csv(out / "snr_phase_exponents.csv")
    assert len(ex) == 9 and np.allclose(ex["exponent_a"], A_PH, atol=1e-6)
    assert np.allclose(ex["intercept_b"], B_PH, atol=1e-6)
    assert (ex["threshold"] == round(FE_ITERS * 200_000 / 1_600_000)).all()
    sn = summary[summary["section"] == "snr"].iloc[0]
    assert sn["exponent_a"] == pytest.approx(A_PH, abs=1e-6)
    md = (out / "summary.md").read_text()
    assert "## ideal_gas" in md and "no KL entropy" in md            # skipped, with its reason
    assert "samples_per_label" in md                                  # exponent-vs-subset note
    # attached to the parent run
    client = MlflowClient(tracking_uri=store["uri"])
    paths = {f.path for f in client.list_artifacts(store["fe_parent"], "report")}
    assert {"report/summary.md", "report/summary.csv", "report/fe_all_temperature.png"} <= paths


def test_ideal_gas_report_maxwell(store, tmp_path):
    out = tmp_path / "ig"
    assert main(["--experiment", "ig_sweep", "--tracking-uri", store["uri"], "--out", str(out),
                 "--no-upload"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    row = summary[summary["section"] == "ideal_gas"].iloc[0]
    keys = sorted(store["ig"])
    x = np.log([k[0] for k in keys])
    y = np.log([k[1] for k in keys])
    S = np.array([_tail_mean(store["ig"][k][1], "entropy_kl_full", 30) for k in keys])
    mf = maxwell_fit(x, y, S, D_IG, "fixed_elr")
    assert row["maxwell_r2"] == pytest.approx(mf.r2, rel=1e-9)
    assert row["ratio_1"] == pytest.approx(mf.ratios[0], rel=1e-9)
    assert row["rel_err_max"] == pytest.approx(mf.rel_err_max, rel=1e-6)
    assert row["rel_err_mean"] == pytest.approx(mf.rel_err_mean, rel=1e-6)
    assert row["ratio_1"] == pytest.approx(-1.0, abs=0.05)            # ∂S/∂ln λ = −(D − 1)/2
    # the generated radius is 2 % above the SDE prediction r*² = T (D − 1)/λ
    assert row["r_sde_rel_err_median"] == pytest.approx(0.02, abs=1e-9)
    assert 0.0 <= row["frac_own_minimum"] <= 1.0                      # vMF: potential map drawn
    for name in ("ig_all_state.png", "ig_all_radius.png", "ig_all_maxwell.png", "ig_all_potential.png"):
        assert _is_png(out / name), name
    md = (out / "summary.md").read_text()
    assert "## free_energy" in md and "no k-NN entropy" in md
    client = MlflowClient(tracking_uri=store["uri"])
    assert not client.list_artifacts(store["ig_parent"], "report")    # --no-upload


def test_broken_sweep_still_reports(store, tmp_path, capsys):
    out = tmp_path / "br"
    assert main(["--experiment", "broken_sweep", "--tracking-uri", store["uri"], "--out", str(out),
                 "--no-upload", "--uniform-n", "50"]) == 0
    diverged, no_entropy, *_, running = store["broken"]
    md = (out / "summary.md").read_text()
    assert f"{diverged} (lr = " in md and "status diverged" in md     # excluded with a reason
    assert f"member {no_entropy}" in md and "dropped" in md           # missing metric noted
    assert "Members still running" in md and running in md
    assert "## snr" in md and "no gradient metrics" in md
    summary = pd.read_csv(out / "summary.csv")
    fe = summary[summary["section"] == "free_energy"].iloc[0]
    assert fe["n_segment"] <= 3                                        # 3 usable LRs remain
    assert "skipped: no gradient metrics" in capsys.readouterr().out  # printed too


def test_crashing_section_is_caught(store, tmp_path):
    def boom_section(sweep, out_dir, opts):
        raise RuntimeError("boom")

    def ok_section(sweep, out_dir, opts):
        return SectionResult("ok", summary_rows=[{"n": len(sweep.members)}])

    sw = load_experiment("broken_sweep", tracking_uri=store["uri"])
    res = build_report(sw, tmp_path, Options(), sections=[boom_section, ok_section])
    assert res[0].skipped_reason == "error: RuntimeError: boom"
    assert "error: RuntimeError: boom" in (tmp_path / "summary.md").read_text()
    assert pd.read_csv(tmp_path / "summary.csv")["n"].tolist() == [5]


def test_the_report_runs_every_section_of_the_package_once_in_order():
    """analysis.sections lists its modules: every built-in section once, in ORDER (summary order)."""
    from analysis.sections import all_sections

    names = [f.__name__ for f in all_sections()]
    assert names == ["free_energy_section", "snr_section", "ideal_gas_section", "vmf_exact_section",
                     "vmf_adiabatic_section", "sphere_toy_section", "batch_size_section",
                     "replicates_section"]
    assert [f.__name__ for f in all_sections()] == names      # a second listing adds nothing


def test_a_new_section_module_joins_the_report_with_no_other_edit(store, tmp_path, monkeypatch):
    """docs/DESIGN.md "Adding a report section": one new module in analysis/sections/ defining
    SECTIONS and ORDER is run by the report (here between free_energy and snr), and nothing else
    names it. The module is written into a copy of the package so the repository stays untouched."""
    import shutil
    import sys

    import analysis

    copy = tmp_path / "pkg" / "analysis"
    shutil.copytree(os.path.dirname(analysis.__file__), copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "sections" / "member_count.py").write_text(
        "from analysis.sections.common import SectionResult\n"
        "ORDER = 15\n"
        "def member_count_section(sweep, out_dir, opts):\n"
        "    res = SectionResult('member_count')\n"
        "    res.summary_rows.append({'group': 'all', 'n_members': len(sweep.members)})\n"
        "    return res\n"
        "SECTIONS = (member_count_section,)\n")
    for name in [m for m in sys.modules if m == "analysis" or m.startswith("analysis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    try:
        import analysis.report as copied_report
        import analysis.sections as copied_sections
        assert copied_report.__file__.startswith(str(copy)) and copied_sections.__file__.startswith(str(copy))
        out = tmp_path / "out"
        assert copied_report.main(["--experiment", "fe_sweep", "--tracking-uri", store["uri"], "--out", str(out),
                                   "--no-upload", "--no-uniform-loss", "--uniform-n", "100"]) == 0
    finally:   # drop the copy's modules; monkeypatch then puts the repository's back
        for name in [m for m in sys.modules if m == "analysis" or m.startswith("analysis.")]:
            del sys.modules[name]
    summary = pd.read_csv(out / "summary.csv")
    sections_run = list(dict.fromkeys(summary["section"]))
    assert "member_count" in sections_run
    assert summary.loc[summary["section"] == "member_count", "n_members"].tolist() == [1 + len(FE_LRS)]
    md = (out / "summary.md").read_text()
    assert md.index("## free_energy") < md.index("## member_count") < md.index("## snr")


def test_unknown_experiment_exits_2(store, capsys):
    assert main(["--experiment", "nope", "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "fe_sweep" in err and "ig_sweep" in err


@pytest.mark.parametrize("flag", ["--toy-u-window", "--toy-pressure-window", "--window"])
def test_window_below_one_exits_2_before_reading_the_store(tmp_path, capsys, flag):
    out = tmp_path / "rep"
    # the store URI points nowhere: the options are checked first
    assert main(["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "--out", str(out),
                 flag, "0"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} 0: must be ≥ 1" in err and err.count("must be") == 1, err
    assert not out.exists() and not (tmp_path / "none.db").exists()


def _vmf_sweep_in_memory(protocol, lr, wd, radius, D, stationary, running=None):
    """A finished vMF Sweep built by hand (no MLflow): one member per (lr, wd, radius) entry, every
    member done and stationary, its series one row at iteration 1000 holding ``stationary``."""
    ids = [f"r{i}" for i in range(len(lr))]
    members = pd.DataFrame({"lr": lr, "wd": wd, "radius": radius, "protocol": protocol, "model": "vmf", "D": D,
                            "status": "done", "regime": "stationary", "running": False, "excluded": ""},
                           index=pd.Index(ids, name="run_id"))
    stationary = pd.DataFrame(stationary, index=members.index)
    series = stationary.reset_index().assign(iteration=1000)
    running = pd.DataFrame() if running is None else running
    return Sweep("mem", "0", None, None, members, series, running, stationary), ids


def test_ideal_gas_gibbs_map_with_a_member_missing_its_radius(tmp_path):
    """A fixed-ELR vMF member without a radius is left out of the Gibbs ranking (NaN rank in the table);
    the section still reports the others (it used to crash on int(NaN) or give NaN gaps)."""
    D = 3
    lr, wd = (a.ravel() for a in np.meshgrid([1e-3, 1e-2, 1e-1], [1e-3, 1e-2, 1e-1], indexing="ij"))
    T = lr / 2
    r = np.sqrt(T * (D - 1) / wd)
    r[4] = np.nan
    S_full = np.log(T) + (D - 1) * np.log(np.nan_to_num(r, nan=1.0))
    sw, ids = _vmf_sweep_in_memory("fixed_elr", lr, wd, 1.0, D, {"train_loss": T, "entropy_kl_full": S_full,
                                                                  "radius": r, "trace_sigma": float(D - 1)})
    res = ideal_gas_section(sw, str(tmp_path), Options())
    (row,) = res.summary_rows
    t = pd.read_csv(tmp_path / res.tables[0]).set_index("run_id").loc[ids]
    assert row["potential"] == "Gibbs"
    assert np.isnan(t.loc["r4", "potential_rank"]) and np.isfinite(t.drop("r4")["potential_rank"]).all()
    ranks = t.drop("r4")["potential_rank"].to_numpy()
    assert row["max_rank"] == ranks.max() and row["frac_own_minimum"] == pytest.approx(np.mean(ranks == 0))
    assert np.isfinite(row["mean_gap"])
    assert (tmp_path / "ig_all_potential.png").stat().st_size > 0


def test_fixed_sphere_pressure_in_memory(tmp_path):
    """§7 effective pressure on a hand-built Sweep (no MLflow): r̃ = r0 + λ_pred η r0³ over the
    last ``pressure_last`` running logs (an earlier transient must be ignored)."""
    D, sig2, G2 = 11, 0.4, 0.1
    grid = [(lr, r0) for lr in (1e-3, 1e-2, 1e-1) for r0 in (0.5, 1.0, 2.0)]
    ids = [f"r{i}" for i in range(len(grid))]
    lam = {rid: (lr * sig2 / 2) * (D - 1) / r0**2 for rid, (lr, r0) in zip(ids, grid)}
    running = pd.concat([pd.DataFrame({
        "run_id": rid, "iteration": np.arange(40) * 50,
        "radius_preproj": np.r_[np.full(20, r0 + 1.0), np.full(20, r0 + lam[rid] * lr * r0**3)]})
        for rid, (lr, r0) in zip(ids, grid)], ignore_index=True)
    sw, _ = _vmf_sweep_in_memory(
        "fixed_sphere", [g[0] for g in grid], 0.0, [g[1] for g in grid], D,
        {"trace_sigma": sig2 * (D - 1), "grad_sq": G2, "entropy_kl_full": [np.log(lr) * (D - 1) / 2 for lr, _ in grid],
         "radius": [r0 for _, r0 in grid], "train_loss": 0.3}, running)
    res = ideal_gas_section(sw, str(tmp_path), Options(pressure_last=20))
    t = pd.read_csv(tmp_path / res.tables[0]).set_index("run_id").loc[ids]
    lr = np.array([g[0] for g in grid])
    r0 = np.array([g[1] for g in grid])
    np.testing.assert_allclose(t["p_measured"], [lam[r] for r in ids], rtol=1e-9)
    np.testing.assert_allclose(t["p_predicted"], lr * sig2 / 2 * (D - 1) / r0**2, rtol=1e-12)
    np.testing.assert_allclose(t["p_discrete"], lr * (sig2 * (D - 1) + G2) / (2 * r0**2), rtol=1e-12)
    assert res.summary_rows[0]["p_predicted_rel_err_median"] == pytest.approx(0.0, abs=1e-9)
    assert res.summary_rows[0]["potential"] == "Helmholtz"              # vmf on the sphere
    assert (tmp_path / "ig_all_pressure.png").stat().st_size > 5000


def test_uniform_loss_asymptote_matches_an_independent_monte_carlo():
    """§4 uniform reference U: the report's value (its own tiled draws, evaluate() in train-mode BN)
    against a plain Monte Carlo written here (fresh torch.randn directions, direct forward passes),
    within 4 combined standard errors; a member whose D does not match the rebuilt model is refused."""
    import torch
    import torch.nn.functional as F
    from analysis.sections.uniform import uniform_loss
    from trainables.data import load_dataset
    from trainables.models import build_model, flatten_si_parameters

    member = {"model": "convnet", "width": 1, "dataset": "digits", "samples_per_label": None, "loss": "ce",
              "init_seed": 1, "head_seed": 4, "data_seed": 1, "data_dir": None}
    data = load_dataset("digits")
    model = build_model("convnet", 1, 10, in_channels=1)
    theta, _ = flatten_si_parameters(model)
    D, n = theta.numel(), 200
    got = uniform_loss(member, n, D, device="cpu")
    gen = torch.Generator().manual_seed(123)
    mine = []
    model.train()
    with torch.no_grad():
        for _ in range(n):
            z = torch.randn(D, generator=gen)
            theta.copy_(z / z.norm())
            mine.append(F.cross_entropy(model(data.x_train), data.y_train).item())   # < 1024 samples: one chunk
    mine = np.array(mine)
    assert got == pytest.approx(mine.mean(), abs=4 * np.sqrt(2) * mine.std(ddof=1) / np.sqrt(n))
    assert got > 0.5                                # far above a trained model's loss
    with pytest.raises(ValueError, match="D = "):
        uniform_loss(member, 10, D + 1, device="cpu")


# ---- per-group analysis settings (issue 11) --------------------------------------------------------

FE_GROUPS = {8: (3.9e-3, 0.85), 64: (2.5e-4, 0.86)}      # width → (b, a) of T = b η^a (docs/theory.md §5)


def _fe_sweep_in_memory(widths, converged_width=None, n_logs=120):
    """A finished ConvNet Sweep built by hand: per width, 9 LRs whose stationary (U, S) follow the exact
    free-energy family S = C ln η, U = (b C/a) η^a + offset; the smallest LR of ``converged_width`` is
    tagged converged. Series: n_logs rows per member, U relaxing to its stationary value."""
    lrs = np.logspace(-4, -2, 9)
    rows, series = [], []
    for w in widths:
        b, a = FE_GROUPS[w]
        for i, lr in enumerate(lrs):
            rid = f"w{w}_{i}"
            status = "converged" if (w == converged_width and i == 0) else "done"
            rows.append({"run_id": rid, "model": "convnet", "width": w, "dataset": "cifar10", "lr": lr,
                         "protocol": "fixed_sphere", "D": 24408 if w == 8 else 1550016, "status": status,
                         "regime": "stationary", "running": False, "excluded": "", "loss": "ce",
                         "entropy": [{"name": "knn", "window": 1000}]})
            its = np.arange(1, n_logs + 1) * 100.0
            U = b * C_S / a * lr**a + 0.1 + 0.3 * np.exp(-its / 500)
            S = C_S * np.log(lr) - 2.0 * np.exp(-its / 500)
            series.append(pd.DataFrame({"run_id": rid, "iteration": its, "train_loss": U, "entropy_knn_k50": S}))
    members = pd.DataFrame(rows).set_index("run_id")
    series = pd.concat(series, ignore_index=True)
    from analysis.load import stationary_means
    stationary = stationary_means(series, {r: 50 for r in members.index})
    return Sweep("mem", "0", None, None, members, series, pd.DataFrame(), stationary)


def _temperatures(sweep, tmp_path, name, opts):
    from analysis.sections.free_energy import free_energy_section
    out = tmp_path / name
    out.mkdir()
    res = free_energy_section(sweep, str(out), opts)
    tables = {}
    for row, table in zip(res.summary_rows, [t for t in res.tables if not t.endswith("op_temperature.csv")]):
        t = pd.read_csv(out / table)
        tables[row["group"]] = (row, t[t["in_segment"]].set_index("lr")["T"])
    return tables


def test_up_and_op_groups_reported_once_equal_two_reports_with_the_papers_eps(tmp_path):
    """Acceptance (issue 11): one report over UP and OP groups picks ε = 0.01 / 0.04 per group (from the
    OP group's converged member, or from the grid's analysis block) and gives the temperatures of two
    separate reports run with those ε; one ε for both would not."""
    opts = Options(uniform_loss=False, uniform_n=50)
    both = _temperatures(_fe_sweep_in_memory((8, 64), converged_width=64), tmp_path, "both", opts)
    up = _temperatures(_fe_sweep_in_memory((8,)), tmp_path, "up", Options(eps=0.01, uniform_loss=False, uniform_n=50))
    op = _temperatures(_fe_sweep_in_memory((64,), converged_width=64), tmp_path, "op",
                       Options(eps=0.04, uniform_loss=False, uniform_n=50))
    assert both["width=8"][0]["eps"] == 0.01 and both["width=8"][0]["regime"] == "up"
    assert both["width=64"][0]["eps"] == 0.04 and both["width=64"][0]["regime"] == "op"
    pd.testing.assert_series_equal(both["width=8"][1], up["all"][1])
    pd.testing.assert_series_equal(both["width=64"][1], op["all"][1])
    # the same sweep with one ε for every group: the OP temperatures change
    one = _temperatures(_fe_sweep_in_memory((8, 64), converged_width=64), tmp_path, "one",
                        Options(eps=0.01, uniform_loss=False, uniform_n=50))
    assert not np.allclose(one["width=64"][1].to_numpy(), op["all"][1].to_numpy())
    # the grid block says the same without a converged member; a per-group option beats the grid
    from engine.analysis_block import normalise_analysis_block
    block, problems = normalise_analysis_block({"groups": [{"match": {"width": 8}, "regime": "up"},
                                                           {"match": {"width": 64}, "regime": "op"}]})
    assert not problems
    grid = _temperatures(_fe_sweep_in_memory((8, 64)), tmp_path, "grid",
                         Options(uniform_loss=False, uniform_n=50, grid_block=block))
    pd.testing.assert_series_equal(grid["width=64"][1], op["all"][1])
    over = _temperatures(_fe_sweep_in_memory((8, 64)), tmp_path, "over",
                         Options(uniform_loss=False, uniform_n=50, grid_block=block,
                                 group_overrides=({"match": {"width": 64}, "eps": 0.01},)))
    assert over["width=64"][0]["eps"] == 0.01 and over["width=64"][0]["eps_source"] == "report option for this group"
    pd.testing.assert_series_equal(over["width=64"][1], one["width=64"][1])


def test_op_temperature_along_training_four_smallest_decreasing_lrs_and_smoothing(tmp_path):
    """§5.6: T_t for the 4 smallest LRs whose U decreases steadily (the second smallest does not, so
    LRs 1, 3, 4, 5 are used), T_t = (U_{t+2} − U_{t−2})/(S_{t+2} − S_{t−2}); with op_smooth_sigma the
    series are first smoothed with Gaussian weights in ln t (computed here by hand)."""
    from analysis.sections.free_energy import free_energy_section
    from engine.analysis_block import normalise_analysis_block
    sw = _fe_sweep_in_memory((64,), n_logs=60)
    lrs = sorted(sw.members["lr"])
    for rid in sw.members.index:                  # U falls and S falls: T_t > 0
        lr = sw.members.loc[rid, "lr"]
        sel = sw.series["run_id"] == rid
        t = sw.series.loc[sel, "iteration"].to_numpy()
        U = 1.0 / np.sqrt(t) * (1 + 10 * lr)
        if lr == lrs[1]:
            U = U + 0.01 * np.sin(t)                 # not steadily decreasing
        sw.series.loc[sel, "train_loss"] = U
        sw.series.loc[sel, "entropy_knn_k50"] = -2.0 * np.log(t)
    for sigma in (None, 0.2):
        block, _ = normalise_analysis_block({"op_smooth_sigma": sigma, "regime": "op"})
        out = tmp_path / f"s{sigma}"
        out.mkdir()
        res = free_energy_section(sw, str(out), Options(uniform_loss=False, uniform_n=50, grid_block=block))
        table = pd.read_csv(out / [t for t in res.tables if t.endswith("op_temperature.csv")][0])
        assert sorted(table["lr"].unique()) == pytest.approx([lrs[0], lrs[2], lrs[3], lrs[4]])
        rid = sw.members.index[sw.members["lr"] == lrs[2]][0]
        ser = sw.series[sw.series["run_id"] == rid]
        t, U, S = (ser[k].to_numpy() for k in ("iteration", "train_loss", "entropy_knn_k50"))
        if sigma is not None:
            W = np.exp(-(np.log(t)[:, None] - np.log(t)[None, :]) ** 2 / (2 * sigma**2))
            W /= W.sum(axis=1, keepdims=True)
            U, S = W @ U, W @ S
        expected = (U[4:] - U[:-4]) / (S[4:] - S[:-4])
        got = table[np.isclose(table["lr"], lrs[2], rtol=1e-12)].sort_values("iteration")
        np.testing.assert_allclose(got["T"], expected, rtol=1e-9)
        np.testing.assert_array_equal(got["iteration"], t[2:-2])


def test_report_reads_the_grid_analysis_block_from_the_parent_run(store, tmp_path, capsys):
    """No flags: ε, the LR segment and W come from the analysis block of the grid.yaml artifact; a
    per-group --eps beats it; a malformed group option exits 2 before reading anything."""
    client = MlflowClient(tracking_uri=store["uri"])
    exp = client.create_experiment("fe_block", artifact_location=(store["root"] / "art_block").as_uri())
    pid = _parent(client, exp)
    client.log_text(pid, "experiment: fe_block\nanalysis:\n  window: 10\n  groups:\n"
                         "    - match: {width: 8}\n      eps: 0.02\n      lr_range: [1.0e-4, 1.0e-2]\n", "grid.yaml")
    rng = np.random.default_rng(1)
    data = {}
    for lr in [LR_CONV, *FE_LRS]:
        m = _fe_member_metrics(lr, rng)
        data[lr] = m
        _log_member(client, exp, pid, _params(lr=lr, D=D_FE), m)
    out = tmp_path / "rep"
    assert main(["--experiment", "fe_block", "--tracking-uri", store["uri"], "--out", str(out),
                 "--no-upload", "--no-uniform-loss", "--uniform-n", "50"]) == 0
    fe = pd.read_csv(out / "summary.csv").query("section == 'free_energy'").iloc[0]
    assert fe["eps"] == 0.02 and fe["eps_source"] == "grid analysis.groups[0]"
    assert "ε = 0.02 (grid analysis.groups[0])" in capsys.readouterr().out
    st = pd.read_csv(out / "stationary.csv")
    assert (st["window"] == 10).all()
    lrs = np.array([LR_CONV, *FE_LRS])
    U = np.array([_tail_mean(data[lr], "train_loss", 10) for lr in lrs])
    S = np.array([_tail_mean(data[lr], "entropy_knn_k50", 10) for lr in lrs])
    fit = fit_temperature(lrs, U, S, eps=0.02, lr_range=(1e-4, 1e-2))
    assert fe["exponent_a"] == pytest.approx(fit.a, rel=1e-6)
    out2 = tmp_path / "rep2"
    assert main(["--experiment", "fe_block", "--tracking-uri", store["uri"], "--out", str(out2), "--no-upload",
                 "--no-uniform-loss", "--uniform-n", "50", "--eps", "width=8:0.03"]) == 0
    fe2 = pd.read_csv(out2 / "summary.csv").query("section == 'free_energy'").iloc[0]
    assert fe2["eps"] == 0.03 and fe2["eps_source"] == "report option for this group"
    capsys.readouterr()
    assert main(["--experiment", "fe_block", "--tracking-uri", "sqlite:////nonexistent/x.db",
                 "--eps", "width:0.1"]) == 2
    assert "key=value" in capsys.readouterr().err
