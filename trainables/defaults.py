"""Default member configuration (docs/DESIGN.md). One source for the CLI, the engine and the runners."""
from __future__ import annotations

import copy

DEFAULT_KS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]

MEMBER_DEFAULTS: dict = {
    "model": "convnet",
    "width": 8,
    "dataset": "digits",
    "samples_per_label": None,
    "loss": "ce",
    "protocol": "fixed_sphere",
    "lr": 0.01,
    "wd": 0.0,
    "radius": 1.0,
    "batch_size": 128,
    "iterations": 20000,
    "seed": 0,
    "init_seed": 1,
    "head_seed": 4,
    "data_seed": 1,
    "log_schedule": "free_energy",
    "running_every": 50,
    "num_stoch_grads": 1000,
    "stochastic_entropy": False,
    "entropy": [{"name": "knn", "window": 1000, "stride": 1, "ks": DEFAULT_KS}],
    "data_dir": None,
    "device": "auto",
    "optimizer": "sgd",      # trainables.optimizers; its own keys take their defaults there when None
    "momentum": None,
    "beta1": None,
    "beta2": None,
    "adam_eps": None,
    "stop_when": None,       # trainables.stopping: networks and the vmf toy
}


def fill_defaults(cfg: dict) -> dict:
    """A full member config: the defaults overlaid with ``cfg`` (which may hold model-specific keys)."""
    out = copy.deepcopy(MEMBER_DEFAULTS)
    out.update(copy.deepcopy(cfg))
    return out


def resolve_device(device: str | None):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
