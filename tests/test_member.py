"""The member schema (trainables/member.py): one table of keys used by the grid, the CLI, the runners and
the MLflow reader."""
from pathlib import Path

import pytest

from engine import layout
from engine.grid import GridError, load_grid
from trainables import member, models
from trainables.toys.sphere import SphereToyRunner
from trainables.toys.vmf import VMFRunner

GRIDS = Path(__file__).resolve().parents[1] / "grids"


def test_every_default_passes_its_own_check():
    for name, key in member.keys().items():
        if key.default is not member.ABSENT:
            assert key.check(key.default) == key.default, name


def test_model_names_come_from_the_registries():
    assert member.model_names()[:len(models.MODELS)] == tuple(models.MODELS)
    assert set(member.model_names()) == {"convnet", "resnet18", "vmf", "sphere_toy"}
    with pytest.raises(GridError) as info:
        load_grid({"experiment": "x", "fixed": {"model": "convnett"}})
    assert "did you mean 'convnet'" in str(info.value)


@pytest.mark.parametrize("grid", ["demo.yaml", "vmf_fixed_lr.yaml", "sphere_toy.yaml", "digits_optimizers.yaml"])
def test_mlflow_params_decode_to_the_members_values_and_types(grid):
    # MLflow stores text for every param; decoding (types from the schema) gives back value and type
    for _, cfg in load_grid(GRIDS / grid).members()[:3]:
        for key, value in cfg.items():
            back = layout.decode_param(key, layout.encode_param(value))
            assert back == value and type(back) is type(value), (key, value, back)


def test_direct_toy_runners_fill_the_same_defaults_as_the_grid():
    # one table: a toy member built by the runner from a partial dict equals the grid's member
    grid = load_grid({"experiment": "x", "fixed": {"model": "vmf", "lr": 0.02, "entropy": []}})
    assert VMFRunner([{"lr": 0.02, "entropy": []}]).members == [grid.members()[0][1]]
    sphere = load_grid({"experiment": "x", "fixed": {"model": "sphere_toy", "lr": 0.1, "entropy": []}})
    member_cfg = sphere.members()[0][1]
    assert SphereToyRunner([{"lr": 0.1, "entropy": []}]).members == [member_cfg]
    assert member_cfg["log_schedule"] == "sphere_toy" and member_cfg["seed"] == 0
    assert member.defaults("vmf")["seed"] == 42 and "setting" not in member.defaults("vmf")


def test_entropy_spec_fills_defaults_once_and_reports_every_problem():
    spec = member.EntropySpec.from_text("kl:400:5:std")
    assert spec.as_dict() == {"name": "kl", "window": 400, "stride": 5, "standardize": True,
                              "evaluate_last": None, "evaluate_every": None}
    with pytest.raises(member.BadValue) as info:
        member.entropy_specs([{"name": "knn", "window": 1, "ks": [0]}, {"name": "knn"}])
    assert info.value.args[0] == ["[0].window: entropy window must be ≥ 2, got 1",
                                  "[0].ks: k must be ≥ 1, got 0",
                                  "[1]: a second 'knn' spec; its metric names would collide with the first"]
