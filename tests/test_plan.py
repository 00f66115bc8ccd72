"""Memory per trial, per-axis resources, the node fit and the launch plan (engine/plan.py).

Expected sizes come from real models (trainables.models) and from the numbers written in cluster.yaml and
engine/throughput.yaml, never from the functions under test.
"""
import contextlib
import io
import math
from pathlib import Path

import pytest
import yaml

from engine import plan
from engine.grid import GridError, load_grid
from engine.resources import check_resources, trial_resources
from engine.sweep import main

ROOT = Path(__file__).resolve().parents[1]
GRIDS = ROOT / "grids"
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
TABLE = yaml.safe_load((ROOT / "engine" / "throughput.yaml").read_text())


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("model, width, dataset", [("convnet", 8, "cifar10"), ("convnet", 3, "digits"),
                                                    ("resnet18", 2, "cifar100")])
def test_dimension_matches_a_built_model(model, width, dataset):
    from trainables.models import build_model, num_si_params
    classes, channels = {"cifar10": (10, 3), "digits": (10, 1), "cifar100": (100, 3)}[dataset]
    real = num_si_params(build_model(model, width, classes, channels))
    assert plan.dimension({"model": model, "width": width, "dataset": dataset}) == real


def test_window_bytes_of_convnet64_as_the_issue_states():
    # issue 13: D = 1,550,016 for ConvNet-64; window 1000 + one chunk of 32 float32 snapshots
    grid = load_grid(GRIDS / "fixed_lr.yaml", ["width=64"])
    cfgs = [cfg for _, cfg in grid.trials()[0]["members"]]
    mem = plan.trial_memory(cfgs, on_gpu=True)
    assert mem.D == 1_550_016
    assert mem.object_store == 1_550_016 * (1000 + 32) * 4
    # today's reservoir stacks one full copy of the window while it evaluates
    assert mem.reservoir >= 1_550_016 * 1000 * 4


def test_memory_scales_with_members_per_trial():
    grid = load_grid(GRIDS / "fixed_lr.yaml", ["width=8"])
    cfg = grid.trials()[0]["members"][0][1]
    one, four = plan.trial_memory([cfg], True), plan.trial_memory([cfg] * 4, True)
    assert four.object_store == 4 * one.object_store
    assert four.reservoir > 3.9 * one.reservoir
    assert four.device > one.device and four.members == 4


def test_stochastic_entropy_adds_m_times_d_on_the_device():
    grid = load_grid(GRIDS / "fixed_lr.yaml", ["width=8"])
    cfg = grid.trials()[0]["members"][0][1]
    on = dict(cfg, stochastic_entropy=True)
    extra = plan.trial_memory([on], True).device - plan.trial_memory([cfg], True).device
    assert extra == cfg["num_stoch_grads"] * 24_408 * 4


# ----------------------------------------------------------------------------- resources.by

def test_resources_by_axis_value():
    grid = load_grid(GRIDS / "fixed_lr.yaml")
    gpus = {t["members"][0][1]["width"]: trial_resources(grid, t)["gpu"] for t in grid.trials()}
    assert gpus == {8: 0.25, 64: 1.0}
    asked = plan.ray_resources(grid)
    assert {r["gpu"] for r in asked.values()} == {0.25, 1.0}
    assert all(r["memory"] > 2 ** 30 for r in asked.values())


@pytest.mark.parametrize("by, where", [
    ({"widht": {64: {"gpu": 1}}}, "resources.by.widht"),
    ({"width": {64: {"gpu": 0.3}}}, "resources.by.width.64.gpu"),
    ({"width": {64: {"ram": 1}}}, "resources.by.width.64.ram"),
    ({"width": {64: "whole"}}, "resources.by.width.64"),
    ({"width": [64]}, "resources.by.width"),
])
def test_resources_by_rejects_bad_entries(by, where):
    raw = yaml.safe_load((GRIDS / "fixed_lr.yaml").read_text())
    raw["resources"]["by"] = by
    with pytest.raises(GridError) as e:
        load_grid(raw)
    assert any(p.startswith(where) for p in e.value.problems), e.value.problems


def test_resources_by_a_bundled_axis_is_refused():
    raw = yaml.safe_load((GRIDS / "fixed_lr.yaml").read_text())
    raw["bundle"] = ["width"]
    with pytest.raises(GridError) as e:
        load_grid(raw)
    assert any("bundled" in p for p in e.value.problems)


def test_two_axes_disagreeing_on_one_trial_are_refused():
    raw = yaml.safe_load((GRIDS / "fixed_lr.yaml").read_text())
    raw["resources"]["by"]["lr"] = {1.0: {"gpu": 0.5}}
    with pytest.raises(GridError) as e:
        load_grid(raw)
    assert any("width=64" in p and "lr=1" in p for p in e.value.problems), e.value.problems


def test_a_value_no_longer_on_the_axis_warns():
    grid = load_grid(GRIDS / "fixed_lr.yaml", ["width=8"])
    assert any("resources.by.width.64" in w for w in grid.warnings)


def test_set_resources_gpu_applies_to_every_trial():
    grid = load_grid(GRIDS / "fixed_lr.yaml", ["resources.gpu=0.5"])
    assert {trial_resources(grid, t)["gpu"] for t in grid.trials()} == {0.5}


# ----------------------------------------------------------------------------- fitting nodes

def gib(n):
    return f"{n / 2 ** 30:.2f} GiB"


def test_shipped_grid_fits_and_width64_goes_to_the_large_workers():
    rc, out, err = run_cli(str(GRIDS / "fixed_lr.yaml"), "--dry-run")
    assert rc == 0, err
    blocks = out.split("\n- ")
    wide = next(b for b in blocks if "(width=64)" in b)
    assert "planned onto gpu_worker_large" in wide
    assert "gpu_worker (g5.xlarge): does not fit" in wide
    small = next(b for b in blocks if "(width=8)" in b)
    assert "planned onto gpu_worker:" in small
    # per-node packing follows cluster.yaml: 4 ConvNet-8 trials on a g5.xlarge's one GPU
    assert "gpu_worker (g5.xlarge): 4 per node, 4 per GPU" in small


def test_oversized_grid_exits_2_naming_the_memory():
    rc, out, err = run_cli(str(GRIDS / "fixed_lr.yaml"), "--dry-run", "--set", "resources.gpu=0.25",
                           "--set", "width=64")
    assert rc == 2
    assert "memory" in err and "Ray memory" in err and "bytes" in err
    large = CLUSTER["available_node_types"]["gpu_worker_large"]["resources"]["memory"]
    assert f"it offers {gib(large)}" in err          # the figure cluster.yaml declares
    assert "trial t000" in err and "Fix:" in err
    # the suggested fix is a grid that passes the check
    fix = err.split("Fix: ")[1].split("\n")[0]
    assert "--set resources.gpu=1" in fix
    rc2, _, err2 = run_cli(str(GRIDS / "fixed_lr.yaml"), "--dry-run", "--set", "resources.gpu=1",
                           "--set", "width=64")
    assert rc2 == 0, err2


def test_object_store_limits_a_node_type():
    grid = load_grid(GRIDS / "fixed_lr.yaml", ["width=64"])
    small = [n for n in plan.nodes_from_cluster_yaml() if n.name == "gpu_worker"]
    problems = plan.check_fit(grid, small, "cluster.yaml")
    assert len(problems) == 1 and "object store" in problems[0]


def test_cpu_trials_on_a_node_pack_by_memory():
    grid = load_grid(GRIDS / "demo.yaml")
    cfgs = [cfg for _, cfg in grid.trials()[0]["members"]]
    mem = plan.trial_memory(cfgs, False)
    node = plan.Node("n", cpu=64, gpu=0, memory=3.5 * mem.request, object_store=2 ** 34)
    assert plan.per_node({"cpu": 1, "gpu": 0}, mem, node) == (3, None)


# ----------------------------------------------------------------------------- time and cost

def test_gpu_hours_follow_the_throughput_table():
    rows = {r["width"]: r["it_per_s"] for r in TABLE["models"] if r["model"] == "convnet"}
    per_width = {w: 28 * 1_600_000 / rows[w] / 3600 for w in (8, 64)}
    rc, out, _ = run_cli(str(GRIDS / "fixed_lr.yaml"), "--dry-run")
    assert f"{per_width[8]:,.0f} GPU-hours" in out and f"{per_width[64]:,.0f} GPU-hours" in out
    assert f"total: {sum(per_width.values()):,.0f} GPU-hours" in out
    g52 = TABLE["instances"]["g5.2xlarge"]["usd_per_hour"]
    assert f"${per_width[64] * g52:,.0f} on-demand" in out


def test_throughput_between_table_widths_is_between_their_speeds():
    cfg = load_grid(GRIDS / "fixed_lr.yaml", ["width=16"]).trials()[0]["members"][0][1]
    its, _ = plan.iterations_per_second(cfg, "V100")
    assert 22.2 < its < 111.0
    assert plan.iterations_per_second(cfg, "T4")[0] == pytest.approx(its * 0.5)


def test_plan_says_where_results_go(tmp_path):
    uri, sweeps = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "sweeps"
    rc, out, _ = run_cli(str(GRIDS / "demo.yaml"), "--dry-run", "--tracking-uri", uri, "--storage-path", str(sweeps))
    assert rc == 0
    assert f"results: MLflow {uri}" in out and f"checkpoints: {sweeps}" in out


# ----------------------------------------------------------------------------- start-up check

def test_advice_for_a_zero_cpu_head_passes_the_grid_check():
    """The head of an autoscaling cluster has CPU 0; the old advice (--set resources.cpu=0) was refused."""
    grid = load_grid(GRIDS / "demo.yaml")
    problems = check_resources(grid, {"CPU": 0, "GPU": 0})
    assert problems and not any("resources.cpu=0" in p for p in problems)
    head_only = [n for n in plan.nodes_from_cluster_yaml() if n.head]
    assert plan.check_fit(grid, head_only, "the head")
    assert plan.check_fit(grid, plan.nodes_from_cluster_yaml(), "cluster.yaml") == []


def test_start_check_on_a_connected_cluster_counts_the_node_types_it_can_add(ray_session):
    from engine.sweep import check_start
    grid = load_grid(GRIDS / "demo.yaml", ["resources.cpu=4"])       # the session Ray has 2 CPUs
    with pytest.raises(GridError) as e:
        check_start(grid)
    assert "this machine" not in str(e.value) and "CPU" in str(e.value)
    check_start(grid, cluster_yaml=ROOT / "cluster.yaml")           # g5 workers have 4 and 8 vCPUs
