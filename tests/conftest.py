"""Shared fixtures for the engine tests: one local Ray for the whole session, a tmp MLflow store.

The session Ray has 2 CPUs and 2 *logical* GPUs (no CUDA needed): Ray only hands out GPU ids and sets
CUDA_VISIBLE_DEVICES, which is enough to test fractional-GPU packing on a CPU machine.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# The per-log-step metric names every network run writes (docs/theory.md §3), entropy columns aside.
BASE_NAMES = {"iteration", "train_loss", "train_acc", "test_loss", "test_acc", "full_grad_norm",
              "stoch_grad_rms", "noise_mean_norm", "stoch_grad_mean_norm", "snr", "snr_mean", "radius",
              "trace_sigma", "grad_sq", "sigma2"}


def vmf3_mean_cos(kappa):
    """E[μ·x] for the von Mises–Fisher law on S² (D = 3): coth κ − 1/κ, written out by hand."""
    return 1 / np.tanh(kappa) - 1 / kappa


def vmf3_entropy(kappa):
    """Differential entropy on S² of f = κ/(4π sinh κ) e^{κ μ·x}:
    S = log(4π sinh κ / κ) − κ (coth κ − 1/κ), with log sinh κ = κ + log(1 − e^{−2κ}) − log 2 so large κ
    does not overflow."""
    log_sinh = kappa + np.log1p(-np.exp(-2 * kappa)) - math.log(2)
    return math.log(4 * math.pi) + log_sinh - np.log(kappa) - kappa * vmf3_mean_cos(kappa)


def repo_env() -> dict:
    """Environment for Ray workers and subprocesses: the repo importable, MLflow our only logger."""
    env = dict(os.environ)
    parts = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    env.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: one intra-op thread is much faster than two on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs one (workers inherit PYTHONPATH from here)."""
    import ray

    os.environ.update({k: v for k, v in repo_env().items() if k in
                       ("PYTHONPATH", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_AIR_NEW_OUTPUT")})
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh SQLite MLflow store under the test's tmp dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def mlflow_member_runs(uri: str, experiment: str) -> tuple:
    """(parent run, {member_id: child run}) of the single sweep of ``experiment`` in the store."""
    from mlflow.tracking import MlflowClient

    from engine import layout
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment '{experiment}' at {uri}"
    runs = c.search_runs([exp.experiment_id], max_results=10000)
    parents = [r for r in runs if r.data.tags.get(layout.TAG_ROLE) == layout.ROLE_SWEEP]
    assert len(parents) == 1, f"expected one sweep (parent) run, found {len(parents)}"
    children = {r.data.tags[layout.TAG_MEMBER_ID]: r for r in runs
                if r.data.tags.get(layout.TAG_PARENT_RUN) == parents[0].info.run_id}
    return parents[0], children


def metric_history(uri: str, run_id: str, name: str) -> list[tuple[int, float]]:
    """[(step, value)] of one MLflow metric of one run, in step order."""
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(tracking_uri=uri).get_metric_history(run_id, name)
    return sorted(((m.step, m.value) for m in hist), key=lambda sv: sv[0])
