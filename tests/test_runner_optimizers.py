"""Momentum and Adam inside the network runner (issue #12): the runner's trajectory is the optimizer of
trainables.optimizers applied on the runner's own batches, it reduces to torch.optim where the protocol
is plain SGD with weight decay, its state is checkpointed exactly, and a bundle keeps one state row per
member. Tiny ConvNet(c=2) on digits, float64, few steps (see tests/test_bundle.py on rounding)."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from trainables.data import load_dataset
from trainables.models import build_model, si_parameters
from trainables.network import NetworkRunner


def config(**kw):
    cfg = dict(model="convnet", width=2, dataset="digits", protocol="fixed_lr", lr=0.01, wd=0.01,
               radius=1.0, batch_size=32, iterations=15, log_schedule="every:15", running_every=5,
               num_stoch_grads=2, seed=3, entropy=[], device="cpu", dtype="float64")
    cfg.update(kw)
    return cfg


TORCH_OPTIM = {
    "momentum": (dict(momentum=0.9, lr=0.01),
                 lambda p, c: torch.optim.SGD(p, lr=c["lr"], momentum=0.9, weight_decay=c["wd"])),
    "adam": (dict(beta1=0.9, beta2=0.99, adam_eps=1e-8, lr=1e-3),
             lambda p, c: torch.optim.AdamW(p, lr=c["lr"], betas=(0.9, 0.99), eps=1e-8, weight_decay=c["wd"])),
}


@pytest.mark.parametrize("name", sorted(TORCH_OPTIM))
def test_fixed_lr_runner_follows_torch_optim_on_the_same_batches(name):
    """Fixed LR + WD: momentum is torch's SGD(momentum, weight_decay), Adam with decoupled WD is AdamW."""
    kw, make_opt = TORCH_OPTIM[name]
    cfg = config(optimizer=name, **kw)
    runner = NetworkRunner([cfg])
    theta0 = runner.theta.detach().clone()
    list(runner.run(None))
    assert runner.status == ["done"]

    data = load_dataset("digits")
    x, y = data.x_train.double(), data.y_train
    model = build_model("convnet", 2, 10, in_channels=1, radius=1.0).double()
    params = si_parameters(model)
    vector_to_parameters(theta0.clone(), params)
    opt = make_opt(params, cfg)
    gen = torch.Generator().manual_seed(cfg["seed"])
    for _ in range(cfg["iterations"]):
        idx = torch.randint(x.shape[0], (cfg["batch_size"],), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    expected = parameters_to_vector(params).detach()
    moved = (expected - theta0).norm()
    assert moved > 1e-3 * theta0.norm()
    assert (runner.theta - expected).norm() <= 1e-9 * moved


def test_momentum_with_beta_zero_is_the_plain_protocol_and_beta_changes_the_path():
    plain = NetworkRunner([config(protocol="fixed_elr", lr=0.001)])
    zero = NetworkRunner([config(protocol="fixed_elr", lr=0.001, optimizer="momentum", momentum=0.0)])
    heavy = NetworkRunner([config(protocol="fixed_elr", lr=0.001, optimizer="momentum", momentum=0.9)])
    for r in (plain, zero, heavy):
        list(r.run(None))
        assert r.status == ["done"]
    moved = (plain.theta - plain.theta0[0]).norm()
    assert (zero.theta - plain.theta).norm() <= 1e-12 * moved
    assert (heavy.theta - plain.theta).norm() > 0.1 * moved


@pytest.mark.parametrize("name,kw", [("momentum", {"momentum": 0.9, "lr": 0.001}), ("adam", {"lr": 1e-3})])
@pytest.mark.parametrize("protocol", ["fixed_sphere", "fixed_elr"])
def test_resume_with_optimizer_state_is_exact(name, kw, protocol):
    cfg = config(optimizer=name, protocol=protocol, iterations=40, log_schedule="every:10", **kw)
    whole = NetworkRunner([cfg])
    full = list(whole.run(None))
    assert whole.status == ["done"]

    first = NetworkRunner([cfg])
    for event in first.run(None):
        if event["iteration"] == 20:
            break
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = NetworkRunner([cfg])
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = list(resumed.run(None))
    assert [e["iteration"] for e in rest] == [30, 40]
    assert [e["rows"] for e in rest] == [e["rows"] for e in full[-2:]]
    assert torch.equal(resumed.theta, whole.theta)


def test_a_bundle_keeps_one_optimizer_state_per_member():
    """Two learning rates with Adam on the sphere: each bundle row is its solo run (moments per row)."""
    members = [config(protocol="fixed_sphere", optimizer="adam", lr=lr, iterations=30) for lr in (1e-3, 3e-3)]
    bundle = NetworkRunner(members)
    list(bundle.run(None))
    for k, cfg in enumerate(members):
        solo = NetworkRunner([cfg])
        list(solo.run(None))
        moved = (solo.theta - solo.theta0[0]).norm()
        assert moved > 1e-2 * solo.theta.norm()
        assert (bundle.rows[k] - solo.theta).norm() <= 1e-9 * moved
