"""Tests for trainables.protocols (docs/theory.md §2).

Each update is applied to the flat weights of a tiny scale-invariant ConvNet after one backward pass
on a fixed batch; the expected result is the §2 formula written out by hand in float64 (numpy) from
copies of θ and g taken before the update.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables import protocols
from trainables.models import build_model, flatten_si_parameters


def tiny_net(radius):
    """ConvNet(c=1) on 1×8×8 inputs (D = 387) with one gradient on a fixed batch in its buffer."""
    model = build_model("convnet", 1, 10, in_channels=1, radius=radius)
    theta, grad = flatten_si_parameters(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    grad.zero_()
    F.cross_entropy(model(x), y).backward()
    return model, theta, grad


def as64(t):
    return t.detach().cpu().double().numpy().copy()


@pytest.mark.parametrize("r0", [0.5, 2.0])
def test_fixed_sphere_step_matches_formula(r0):
    _, theta, grad = tiny_net(r0)
    th, g = as64(theta), as64(grad)
    assert abs(np.linalg.norm(th) - r0) < 1e-5  # build_model put θ on the sphere of radius r0
    eta_eff = 0.3
    eta = eta_eff * r0 ** 2                     # §2.1: the step uses η = η_eff · r0²
    stepped = th - eta * g
    r_tilde = math.sqrt(float(np.sum(stepped ** 2)))
    expected = r0 * stepped / r_tilde
    returned = protocols.fixed_sphere(theta, grad, eta_eff, 123.0, r0)  # wd is ignored
    np.testing.assert_allclose(as64(theta), expected, rtol=1e-5, atol=1e-7 * r0)
    # r̃ is the norm before the projection, shape (1,) for a single flat vector
    assert tuple(returned.shape) == (1,)
    assert returned.item() == pytest.approx(r_tilde, rel=1e-6)
    # the step moved θ by a visible amount (the test would notice a wrong η)
    assert np.linalg.norm(expected - th) > 1e-2 * r0


@pytest.mark.parametrize("r0,wd", [(1.0, 0.0), (2.0, 0.1), (0.5, 0.05)])
def test_fixed_elr_step_matches_formula(r0, wd):
    _, theta, grad = tiny_net(r0)
    th, g = as64(theta), as64(grad)
    eta_eff = 0.02
    r2_before = float(np.sum(th ** 2))
    expected = th - eta_eff * r2_before * (g + wd * th)
    assert protocols.fixed_elr(theta, grad, eta_eff, wd, r0) is None
    np.testing.assert_allclose(as64(theta), expected, rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(expected - th) > 1e-3


@pytest.mark.parametrize("r0,wd", [(1.0, 0.0), (2.0, 0.1), (0.5, 0.05)])
def test_fixed_lr_step_matches_formula(r0, wd):
    _, theta, grad = tiny_net(r0)
    th, g = as64(theta), as64(grad)
    eta = 0.05
    expected = th - eta * (g + wd * th)
    assert protocols.fixed_lr(theta, grad, eta, wd, r0) is None
    np.testing.assert_allclose(as64(theta), expected, rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(expected - th) > 1e-3


def test_pre_projection_radius_from_tangent_gradient():
    """For a scale-invariant net ⟨g, θ⟩ = 0 (§1), so r̃² = r0² + η²|g|² exactly up to BN's eps."""
    r0, eta_eff = 2.0, 0.1
    _, theta, grad = tiny_net(r0)
    th, g = as64(theta), as64(grad)
    assert abs(np.dot(th, g)) < 1e-4 * np.linalg.norm(th) * np.linalg.norm(g)
    eta = eta_eff * r0 ** 2
    r_tilde = protocols.fixed_sphere(theta, grad, eta_eff, 0.0, r0).item()
    assert r_tilde == pytest.approx(math.sqrt(r0 ** 2 + eta ** 2 * np.dot(g, g)), rel=1e-5)
    assert r_tilde > r0


@pytest.mark.parametrize("r0", [0.5, 2.0])
def test_fixed_sphere_keeps_radius_over_many_steps(r0):
    model, theta, grad = tiny_net(r0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    start = theta.clone()
    for _ in range(60):
        idx = torch.randint(0, 64, (16,), generator=g)
        grad.zero_()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        protocols.fixed_sphere(theta, grad, 0.5, 0.0, r0)
        assert abs(theta.double().norm().item() - r0) < 1e-5 * r0
    # and the walk really moved on the sphere
    assert (theta - start).norm().item() > 0.05 * r0


def test_batched_walkers_with_per_walker_tensors():
    """(n, D) walkers; lr, wd, radius as (n, 1) tensors give each row its own scalar update."""
    gen = torch.Generator().manual_seed(3)
    n, D = 4, 6
    theta0 = torch.randn(n, D, generator=gen, dtype=torch.float64)
    grad = torch.randn(n, D, generator=gen, dtype=torch.float64)
    lr = torch.tensor([[0.01], [0.1], [0.3], [1.0]], dtype=torch.float64)
    wd = torch.tensor([[0.0], [0.1], [0.5], [0.2]], dtype=torch.float64)
    r0 = torch.tensor([[0.5], [1.0], [2.0], [4.0]], dtype=torch.float64)
    th0, g = theta0.numpy(), grad.numpy()

    theta = theta0.clone()
    r_tilde = protocols.fixed_sphere(theta, grad, lr, wd, r0)
    assert tuple(r_tilde.shape) == (n, 1)
    for i in range(n):
        eta = lr[i, 0].item() * r0[i, 0].item() ** 2
        stepped = th0[i] - eta * g[i]
        norm = math.sqrt(sum(v * v for v in stepped))
        np.testing.assert_allclose(theta[i].numpy(), r0[i, 0].item() * stepped / norm, rtol=1e-12)
        assert r_tilde[i, 0].item() == pytest.approx(norm, rel=1e-12)

    theta = theta0.clone()
    assert protocols.fixed_elr(theta, grad, lr, wd, r0) is None
    for i in range(n):
        r2 = sum(v * v for v in th0[i])
        expected = th0[i] - lr[i, 0].item() * r2 * (g[i] + wd[i, 0].item() * th0[i])
        np.testing.assert_allclose(theta[i].numpy(), expected, rtol=1e-12)

    theta = theta0.clone()
    assert protocols.fixed_lr(theta, grad, lr, wd, r0) is None
    for i in range(n):
        expected = th0[i] - lr[i, 0].item() * (g[i] + wd[i, 0].item() * th0[i])
        np.testing.assert_allclose(theta[i].numpy(), expected, rtol=1e-12)


def test_get_by_name_and_unknown_protocol():
    assert protocols.get("fixed_sphere") is protocols.fixed_sphere
    assert protocols.get("fixed_elr") is protocols.fixed_elr
    assert protocols.get("fixed_lr") is protocols.fixed_lr
    with pytest.raises(ValueError, match="unknown protocol 'sgd'.*fixed_sphere"):
        protocols.get("sgd")


def test_step_lr_is_the_gradient_multiplier():
    assert protocols.step_lr("fixed_sphere", 0.01, 2.0) == pytest.approx(0.04)
    assert protocols.step_lr("fixed_elr", 0.01, 0.5) == pytest.approx(0.0025)
    assert protocols.step_lr("fixed_lr", 0.01, 2.0) == pytest.approx(0.01)


@pytest.mark.parametrize("name", protocols.PROTOCOLS)
def test_protocol_object_describes_its_own_update(name):
    """What a Protocol says about itself holds for its update: with λ = 0 the step before any
    projection is θ − step_lr(lr, |θ|)·g, and λ changes the result exactly when ``uses_wd``."""
    from trainables.member import MEMBER_DEFAULTS

    proto = protocols.protocol(name)
    assert proto.name == name and protocols.get(name) is proto.update
    assert proto.second_axis in MEMBER_DEFAULTS
    _, theta, grad = tiny_net(1.7)
    th0, g = as64(theta), as64(grad)
    r = float(np.linalg.norm(th0))
    lr = 0.02
    plain, decayed = theta.clone().double(), theta.clone().double()
    r_tilde = proto.update(plain, grad.double(), lr, 0.0, r)
    proto.update(decayed, grad.double(), lr, 0.5, r)
    stepped = th0 - proto.step_lr(lr, r) * g
    if r_tilde is not None:                       # the sphere projects: compare before projection
        np.testing.assert_allclose(r_tilde.item(), np.linalg.norm(stepped), rtol=1e-12)
        stepped = stepped * (r / np.linalg.norm(stepped))
    np.testing.assert_allclose(plain.numpy(), stepped, rtol=1e-10, atol=1e-14)
    assert (not np.allclose(decayed.numpy(), plain.numpy(), rtol=1e-12, atol=0)) == proto.uses_wd
    assert proto.step_lr(lr, 2.0) == (lr * 4.0 if proto.lr_is_effective else lr)


def test_unknown_protocol_object_names_the_choices():
    with pytest.raises(ValueError, match="unknown protocol 'sgd'; choose one of fixed_sphere, fixed_elr, fixed_lr"):
        protocols.protocol("sgd")
