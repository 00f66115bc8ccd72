"""Grid loading, expansion and validation (engine/grid.py, grids/*.yaml, docs/theory.md §9)."""
from pathlib import Path

import numpy as np
import pytest

from engine.grid import GridError, load_grid
from engine.resources import check_resources
from trainables.member import MEMBER_DEFAULTS

GRIDS = Path(__file__).resolve().parents[1] / "grids"

# docs/theory.md §9, free-energy paper: logspace(-5,-4,4)[:-1] ∪ logspace(-4,-3,5)[:-1] ∪ logspace(-3,-2,15)[:-1]
# ∪ logspace(-2,-1,4)[:-1] ∪ logspace(-1,0,4). Built here from decade fractions, not with the loader's code.
FE_LR = sorted([10.0 ** (-5 + j / 3) for j in range(3)] + [10.0 ** (-4 + j / 4) for j in range(4)]
               + [10.0 ** (-3 + j / 14) for j in range(14)] + [10.0 ** (-2 + j / 3) for j in range(3)]
               + [10.0 ** (-1 + j / 3) for j in range(4)])
WD5 = [1e-3, 10 ** -2.5, 1e-2, 10 ** -1.5, 1e-1]
IG_ELR = [1e-4 * 10 ** (k / 6) for k in range(14)]
IG_LR = [1e-3 * 10 ** (k / 6) for k in range(19)]
# §8 sphere toy: logspace(-3, 0, 32)[:-1] ∪ logspace(0, log10 2.5, 33)[:-1] ∪ logspace(log10 2.5, 1, 17)
TOY_LR = ([10 ** (-3 + 3 * j / 31) for j in range(31)] + [2.5 ** (j / 32) for j in range(32)]
          + [2.5 * 4 ** (j / 16) for j in range(17)])
VMF = [10 ** (-3 + j / 8) for j in range(17)]  # logspace(-3, -1, 17)
FE22 = [x for x in FE_LR if 1e-4 * (1 - 1e-9) <= x <= 1e-1 * (1 + 1e-9)]  # §9: the analysed 1e-4 … 1e-1
DIGITS7 = [1e-3 * 10 ** (k / 2) for k in range(7)]                      # logspace(-3, 0, 7)

# file → (members, {axis: expected values})
SHIPPED = {
    "demo.yaml": (2 * 8, {"width": [1, 8], "lr": [1e-3 * 10 ** (3 * k / 7) for k in range(8)]}),
    "fixed_lr.yaml": (2 * 28, {"width": [8, 64], "lr": FE_LR}),
    "fixed_lr_resnet.yaml": (2 * 28, {"width": [4, 32], "lr": FE_LR}),
    "fixed_lr_cifar100.yaml": (2 * 28, {"width": [8, 96], "lr": FE_LR}),
    "subset_size.yaml": (4 * 28, {"samples_per_label": [500, 1250, 2500, 5000], "lr": FE_LR}),
    "lr_wd.yaml": (19 * 5, {"lr": IG_LR, "wd": WD5}),
    "fixed_elr.yaml": (14 * 5, {"lr": IG_ELR, "wd": WD5}),
    "fixed_sphere.yaml": (14 * 5, {"lr": IG_ELR, "radius": [0.25, 0.5, 1, 2, 4]}),
    "sphere_toy.yaml": (2 * 80, {"setting": ["up", "op"], "lr": TOY_LR}),
    "vmf_fixed_lr.yaml": (17 * 17, {"lr": VMF, "wd": VMF}),
    "vmf_fixed_elr.yaml": (17 * 17, {"lr": VMF, "wd": VMF}),
    "vmf_fixed_sphere.yaml": (17 * 17, {"lr": VMF, "radius": [10 ** (-1 + j / 8) for j in range(17)]}),
    "batch_size.yaml": (3 * 22, {"batch_size": [32, 128, 512], "lr": FE22}),
    "seeds.yaml": (4 * 22, {"seed": [0, 1, 2, 3], "lr": FE22}),
    "digits_batch_size.yaml": (3 * 7, {"batch_size": [16, 64, 256], "lr": DIGITS7}),
    "digits_seeds.yaml": (4 * 7, {"seed": [0, 1, 2, 3], "lr": DIGITS7}),
    "optimizers.yaml": (3 * 28, {"optimizer": ["sgd", "momentum", "adam"], "lr": FE_LR}),
    "digits_optimizers.yaml": (3 * 9, {"optimizer": ["sgd", "momentum", "adam"],
                                       "lr": [1e-4 * 10 ** (k / 2) for k in range(9)]}),
}
TOY_KEYS = {"sphere_toy": {"setting"}, "vmf": {"dim", "noise", "mu_seed"}}


def _write(tmp_path, text, name="g.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _problems(source, overrides=()):
    with pytest.raises(GridError) as info:
        load_grid(source, overrides)
    return info.value.problems, str(info.value)


def test_free_energy_lr_grid_definition():
    # the independent reference itself: 28 values, 1e-5 ... 1, the 14 denser ones in [1e-3, 1e-2)
    assert len(FE_LR) == 28 and FE_LR[0] == pytest.approx(1e-5) and FE_LR[-1] == pytest.approx(1.0)
    assert sum(1e-3 <= x < 1e-2 * (1 - 1e-9) for x in FE_LR) == 14
    assert sum(1e-4 * (1 - 1e-9) <= x <= 1e-1 * (1 + 1e-9) for x in FE_LR) == 22  # §9's ConvNet analysis


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_grid_loads_with_expected_axes(name):
    grid = load_grid(GRIDS / name)
    n_members, axes = SHIPPED[name]
    assert len(grid.members()) == n_members
    for key, expected in axes.items():
        if isinstance(expected[0], str):
            assert grid.axes[key] == expected
        else:
            np.testing.assert_allclose(grid.axes[key], expected, rtol=1e-12)
    ids = [mid for mid, _ in grid.members()]
    assert len(set(ids)) == n_members
    # every member has exactly the DESIGN.md keys (+ its toy's own keys; networks carry none)
    for _, cfg in grid.members():
        assert set(cfg) == set(MEMBER_DEFAULTS) | TOY_KEYS.get(cfg["model"], set())
    assert grid.source_text == (GRIDS / name).read_text()


def test_every_grid_file_is_covered():
    shipped = {p.name for p in GRIDS.glob("*.yaml")}
    assert shipped == set(SHIPPED)


def test_paper_settings_in_grids():
    fe = load_grid(GRIDS / "fixed_lr.yaml")
    assert fe.experiment == "fe_convnet_cifar10"
    _, cfg = fe.members()[0]
    assert (cfg["iterations"], cfg["num_stoch_grads"], cfg["samples_per_label"]) == (1_600_000, 1000, 5000)
    assert cfg["protocol"] == "fixed_sphere" and cfg["entropy"][0]["window"] == 1000
    from engine.resources import trial_resources
    by_width = {t["members"][0][1]["width"]: trial_resources(fe, t) for t in fe.trials()}
    assert by_width == {8: {"cpu": 1.0, "gpu": 0.25}, 64: {"cpu": 1.0, "gpu": 1.0}}
    ig = load_grid(GRIDS / "lr_wd.yaml")
    _, cfg = ig.members()[0]
    assert cfg["protocol"] == "fixed_lr" and cfg["log_schedule"] == "ideal_gas"
    assert cfg["entropy"] == [{"name": "kl", "window": 4000, "stride": 25, "standardize": False,
                              "evaluate_last": None, "evaluate_every": None}]
    assert (cfg["model"], cfg["width"], cfg["num_stoch_grads"]) == ("resnet18", 4, 4000)
    assert load_grid(GRIDS / "fixed_sphere.yaml").members()[0][1]["wd"] == 0.0


def test_toy_grids_bundle_the_vectorised_axes():
    sphere = load_grid(GRIDS / "sphere_toy.yaml").trials()
    assert [len(t["members"]) for t in sphere] == [80, 80]
    assert [{c["setting"] for _, c in t["members"]} for t in sphere] == [{"up"}, {"op"}]
    vmf = load_grid(GRIDS / "vmf_fixed_sphere.yaml").trials()
    assert len(vmf) == 1 and len(vmf[0]["members"]) == 289
    assert len(TOY_LR) == 80 and TOY_LR[-1] == pytest.approx(10.0)


def test_demo_members_and_trials():
    grid = load_grid(GRIDS / "demo.yaml")
    members = grid.members()
    # product order: width is the outer axis, lr the inner one
    assert [m[1]["width"] for m in members] == [1] * 8 + [8] * 8
    assert members[9][0] == "m0009" and members[9][1]["lr"] == pytest.approx(1e-3 * 10 ** (3 / 7))
    cfg = members[0][1]
    assert (cfg["dataset"], cfg["iterations"], cfg["batch_size"], cfg["num_stoch_grads"]) == ("digits", 3000, 64, 20)
    assert cfg["entropy"] == [{"name": "knn", "window": 200, "stride": 1, "ks": [1, 2, 5, 10, 20, 50, 100, 199],
                              "evaluate_last": None, "evaluate_every": None}]
    assert cfg["seed"] == 0 and cfg["head_seed"] == 4  # untouched defaults
    trials = grid.trials()
    assert len(trials) == 16 and all(len(t["members"]) == 1 for t in trials)
    assert trials[3]["trial_id"] == "t003" and trials[3]["members"][0][0] == "m0003"
    assert grid.max_concurrent == 2 and grid.resources == {"cpu": 1.0, "gpu": 0.0}
    table = grid.table()
    assert "m0015" in table and "t015" in table and "0.002683" in table


def test_bundle_groups_members_sharing_the_other_axes():
    grid = load_grid({"experiment": "b", "axes": {"lr": [0.1, 0.2, 0.3], "width": [4, 8]}, "bundle": ["lr"]})
    trials = grid.trials()
    assert len(trials) == 2
    for trial, width in zip(trials, [4, 8]):
        assert [cfg["lr"] for _, cfg in trial["members"]] == [0.1, 0.2, 0.3]
        assert {cfg["width"] for _, cfg in trial["members"]} == {width}
    # lr outer, width inner: width 4 members are m0, m2, m4
    assert [mid for mid, _ in trials[0]["members"]] == ["m0000", "m0002", "m0004"]
    # bundling everything → one trial (a toy: network bundles must share their width)
    both = load_grid({"experiment": "b", "fixed": {"model": "vmf"}, "axes": {"lr": [0.1, 0.2, 0.3], "width": [4, 8]},
                      "bundle": ["lr", "width"]})
    assert [len(t["members"]) for t in both.trials()] == [6]


def test_overrides():
    grid = load_grid(GRIDS / "fixed_lr.yaml", ["iterations=1500", "lr=[0.1]", "resources.gpu=0.5", "max_concurrent=3"])
    assert all(cfg["iterations"] == 1500 for _, cfg in grid.members())
    assert grid.axes["lr"] == [0.1] and len(grid.members()) == 2
    assert grid.resources["gpu"] == 0.5 and grid.max_concurrent == 3
    # a fixed key given a list becomes an axis; fixed.KEY pins an axis
    g2 = load_grid(GRIDS / "demo.yaml", ["batch_size=[32, 64]", "fixed.width=4"])
    assert list(g2.axes) == ["lr", "batch_size"] and "batch_size" not in g2.fixed
    assert len(g2.members()) == 16 and {cfg["width"] for _, cfg in g2.members()} == {4}
    # --set iterations shortens every shipped grid
    for name in SHIPPED:
        assert {c["iterations"] for _, c in load_grid(GRIDS / name, ["iterations=1500"]).members()} == {1500}
    problems, _ = _problems(GRIDS / "demo.yaml", ["itertions=5", "lr"])
    assert any(p.startswith("--set itertions=5") and "did you mean 'iterations'" in p for p in problems)
    assert any(p.startswith("--set lr:") for p in problems)


def test_malformed_grid_reports_every_problem_with_location(tmp_path):
    text = """
experiment: bad
fixed:
  modle: convnet
  model: transformer
axes:
  lr: [0.1, 0.01, -0.1]
  width: []
bundle: [wd]
resources: {cpu: 1, gpu: 0.3}
"""
    problems, message = _problems(_write(tmp_path, text))
    def has(prefix, *words):
        return any(p.startswith(prefix) and all(w in p for w in words) for p in problems)
    assert has("fixed.modle:", "unknown key", "did you mean 'model'")
    assert has("fixed.model:", "transformer", "unknown model")
    assert has("axes.lr[2]:", "learning rate", "-0.1")
    assert has("axes.width:", "empty axis")
    assert has("bundle[0]:", "'wd'", "not an axis")
    assert has("resources.gpu:", "0.3")
    assert len(problems) == 6
    assert all(p in message for p in problems)  # str() lists them all


def test_more_value_checks():
    raw = {"experiment": "x", "extra": 1,
           "fixed": {"wd": -1e-3, "radius": 0, "iterations": 0, "batch_size": 0, "samples_per_label": 0,
                     "log_schedule": "every:0", "protocol": "sgd", "dataset": "mnist", "loss": "hinge",
                     "entropy": [{"name": "knn", "window": 1, "stride": 0}, {"name": "mine"},
                                 {"name": "kl", "windw": 10}]},
           "axes": {"lr": {"logspace": [-3, -1, 3]}, "wd": [0.1]},
           "resources": {"cpu": -1, "gpu": 1.5, "tpu": 1}, "max_concurrent": 0}
    problems, _ = _problems(raw)
    prefixes = ["extra:", "fixed.wd:", "fixed.radius:", "fixed.iterations:", "fixed.batch_size:",
                "fixed.samples_per_label:", "fixed.log_schedule:", "fixed.protocol:", "fixed.dataset:",
                "fixed.loss:", "fixed.entropy[0].window:", "fixed.entropy[0].stride:", "fixed.entropy[1].name:",
                "fixed.entropy[2].windw:", "axes.wd:", "resources.cpu:", "resources.gpu:", "resources.tpu:",
                "max_concurrent:"]
    for prefix in prefixes:
        assert any(p.startswith(prefix) for p in problems), prefix
    assert any("both fixed and an axis" in p for p in problems)


def test_axis_specs_and_number_parsing(tmp_path):
    text = """
experiment: x
fixed: {iterations: 1.6e+6}
axes:
  radius: {logspace: [-1, 1, 3], drop_last: true}
  lr: {segments: [{logspace: [-5, -4, 4], drop_last: true}, {logspace: [-4, -3, 5]}], }
  wd: [1e-3, 0]          # PyYAML reads 1e-3 as text; numeric keys accept it
  width: {linspace: [2, 8, 4]}
"""
    grid = load_grid(_write(tmp_path, text))
    expected = [10 ** (-5 + j / 3) for j in range(3)] + [10 ** (-4 + j / 4) for j in range(5)]
    np.testing.assert_allclose(grid.axes["lr"], expected, rtol=1e-12)
    np.testing.assert_allclose(grid.axes["radius"], [0.1, 1.0], rtol=1e-12)
    assert grid.axes["wd"] == [0.001, 0.0] and grid.axes["width"] == [2, 4, 6, 8]
    assert grid.fixed["iterations"] == 1_600_000 and isinstance(grid.fixed["iterations"], int)
    problems, _ = _problems({"experiment": "x", "axes": {"width": {"linspace": [1, 2, 3]}}})
    assert any(p.startswith("axes.width[1]:") and "whole number" in p for p in problems)


def test_invalid_yaml_reports_line(tmp_path):
    path = _write(tmp_path, "experiment: x\nfixed:\n  lr: [0.1, 0.2\n  wd: 0\n")
    problems, message = _problems(path)
    assert len(problems) == 1 and "invalid YAML" in problems[0] and "line " in problems[0]
    dup = _write(tmp_path, "experiment: x\naxes:\n  lr: [0.1]\n  lr: [0.2]\n", "dup.yaml")
    problems, _ = _problems(dup)
    assert any("line 4" in p and "'lr' repeats line 3" in p for p in problems)


def test_check_resources_and_plan():
    grid = load_grid({"experiment": "x", "axes": {"lr": [0.1, 0.2]}, "resources": {"cpu": 1, "gpu": 2}})
    problems = check_resources(grid, {"CPU": 8, "GPU": 1})
    assert len(problems) == 1 and problems[0].startswith("resources.gpu:") and "2" in problems[0]
    assert check_resources(grid, {"cpu": 8, "gpu": 2}) == []
    cpu_only = load_grid({"experiment": "x", "resources": {"cpu": 4}})
    assert check_resources(cpu_only, {"cpu": 2, "gpu": 0})[0].startswith("resources.cpu:")
    # 56 trials at 1/4 GPU on 8 CPUs + 2 GPUs: 8 at once (GPU-bound), ceil(56/8) = 7 waves
    plan = load_grid(GRIDS / "fixed_lr.yaml").resource_plan({"cpu": 8, "gpu": 2})
    assert "4 trials share one GPU" in plan and "8 trial(s) at once" in plan and "7 wave(s)" in plan


def test_toy_keys_and_cross_checks():
    grid = load_grid({"experiment": "t", "fixed": {"model": "vmf", "dim": 5}, "axes": {"lr": [0.1, 0.2]},
                      "bundle": ["lr"]})
    (_, cfg), = grid.trials()[0]["members"][:1]
    assert (cfg["dim"], cfg["noise"], cfg["mu_seed"], cfg["seed"]) == (5, 1.0, 44, 42)
    problems, _ = _problems({"experiment": "t", "fixed": {"model": "convnet", "setting": "up",
                                                           "dataset": "cifar100", "samples_per_label": 600}})
    assert any(p.startswith("fixed.setting:") and "sphere_toy" in p for p in problems)
    assert any("exceeds the 500" in p for p in problems)


def test_checkpoint_due():
    grid = load_grid({"experiment": "x", "checkpoint_every": 1000})
    assert grid.checkpoint_due(None, 0)
    assert not grid.checkpoint_due(0, 999) and grid.checkpoint_due(0, 1000) and grid.checkpoint_due(900, 1500)
    assert load_grid({"experiment": "x"}).checkpoint_due(5, 6)  # 0 = every log step


def test_evaluate_every_that_misses_the_log_steps_is_reported():
    elr = GRIDS / "vmf_fixed_elr.yaml"
    assert not [w for w in load_grid(elr).warnings if "evaluate_every" in w]     # shipped grid: fine
    sparse = load_grid(elr, overrides=["log_schedule=log:20"]).warnings
    assert any("only 1 log step(s) of log:20 are multiples of 40000, fewer than evaluate_last 10" in w
               for w in sparse), sparse
    none = load_grid(elr, overrides=["log_schedule=every:30000", "iterations=90000"]).warnings
    assert any("no log step of every:30000 is a multiple of 40000; no entropy will be logged" in w
               for w in none), none
    toy = load_grid(elr, overrides=["stochastic_entropy=true"]).warnings
    assert any("stochastic_entropy is computed for network models only; vmf ignores it" in w for w in toy)


def test_analysis_block_is_checked_before_anything_runs():
    from engine.grid import GridError, load_grid
    good = load_grid({"experiment": "x", "analysis": {"window": 40, "groups": [
        {"match": {"width": 4}, "eps": "1e-2", "lr_slice": [3, -6], "phase_window": [1.0e4, 4.0e5]}]}})
    assert good.experiment == "x"
    with pytest.raises(GridError) as e:
        load_grid({"experiment": "x", "analysis": {"eps": -1, "windw": 3,
                                                   "groups": [{"match": {"width": 4}, "lr_range": [2, 1],
                                                               "lr_slice": [0, 3]}]}})
    text = str(e.value)
    assert "analysis.eps: -1 must be a number ≥ 0" in text
    assert "analysis.windw: unknown key" in text
    assert "analysis.groups[0].lr_range: [2, 1] must be [lo, hi] with 0 < lo ≤ hi" in text
    assert "analysis.groups[0]: give lr_range or lr_slice, not both" in text
