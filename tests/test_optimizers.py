"""trainables.optimizers: momentum and Adam under the three protocols (docs/theory.md §10).

Expected values come from hand computations (literal numbers worked out in the comments), from a
separate numpy transcription of §10's formulas, and from torch.optim where the protocol reduces to it
(fixed LR)."""

import io
import math

import numpy as np
import pytest
import torch

from trainables import protocols
from trainables.optimizers import (ignored_keys, init_state, load_state_dict, optimizer_config,
                                   state_dict, step, step_lr)

PROTOCOLS = ("fixed_sphere", "fixed_elr", "fixed_lr")


def _opt(name, **kw):
    return optimizer_config({"optimizer": name, **kw})


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


# -----------------------------------------------------------------------------
# literal hand computations

def test_momentum_on_the_sphere_by_hand():
    """θ0 = e_z, r0 = 1, η_eff = 0.5, β = 0.5.
    step 1, g = e_x: buf = (1,0,0); θ = (−0.5, 0, 1), r̃ = √1.25; θ̂ = (−1, 0, 2)/√5;
            buf ← buf − ⟨buf, θ̂⟩θ̂ = (1,0,0) − (−1/√5)(−1, 0, 2)/√5 = (0.8, 0, 0.4).
    step 2, g = e_y: buf = 0.5 (0.8, 0, 0.4) + (0, 1, 0) = (0.4, 1, 0.2);
            θ = θ̂ − 0.5 buf = (−1/√5 − 0.2, −0.5, 2/√5 − 0.1), |θ|² = 1.3 exactly."""
    opt = _opt("momentum", momentum=0.5)
    theta = _t([0.0, 0.0, 1.0])
    st = init_state(opt, theta)
    r = step(opt, "fixed_sphere", theta, _t([1.0, 0, 0]), st, 0.5, 0.0, 1.0)
    assert r.item() == pytest.approx(math.sqrt(1.25))
    np.testing.assert_allclose(theta, np.array([-1, 0, 2]) / math.sqrt(5), rtol=1e-14)
    np.testing.assert_allclose(st["buf"], [0.8, 0.0, 0.4], atol=1e-15)
    r = step(opt, "fixed_sphere", theta, _t([0.0, 1, 0]), st, 0.5, 0.0, 1.0)
    assert r.item() == pytest.approx(math.sqrt(1.3))
    pre = np.array([-1 / math.sqrt(5) - 0.2, -0.5, 2 / math.sqrt(5) - 0.1])
    np.testing.assert_allclose(theta, pre / math.sqrt(1.3), rtol=1e-14)
    assert abs(float(st["buf"] @ theta)) < 1e-14          # buffer in the tangent space


def test_momentum_fixed_elr_and_fixed_lr_by_hand():
    """θ0 = (3, 4), |θ0|² = 25, g = (1, 0), λ = 0.1, β = 0.9.
    fixed ELR, η_eff = 0.01: d = g + λθ = (1.3, 0.4), buf = d, θ1 = θ0 − 0.01·25·d = (2.675, 3.9);
      step 2 with g = 0: d = 0.1 θ1 = (0.2675, 0.39), buf = 0.9 (1.3, 0.4) + d = (1.4375, 0.75),
      |θ1|² = 22.365625, θ2 = θ1 − 0.01·22.365625·buf.
    fixed LR, η = 0.1: θ1 = θ0 − 0.1 (1.3, 0.4) = (2.87, 3.96)."""
    opt = _opt("momentum", momentum=0.9)
    theta = _t([3.0, 4.0])
    st = init_state(opt, theta)
    assert step(opt, "fixed_elr", theta, _t([1.0, 0.0]), st, 0.01, 0.1, 1.0) is None
    np.testing.assert_allclose(theta, [2.675, 3.9], rtol=1e-14)
    step(opt, "fixed_elr", theta, _t([0.0, 0.0]), st, 0.01, 0.1, 1.0)
    np.testing.assert_allclose(st["buf"], [1.4375, 0.75], rtol=1e-14)
    np.testing.assert_allclose(theta, np.array([2.675, 3.9]) - 0.01 * 22.365625 * np.array([1.4375, 0.75]),
                               rtol=1e-14)
    theta = _t([3.0, 4.0])
    st = init_state(opt, theta)
    step(opt, "fixed_lr", theta, _t([1.0, 0.0]), st, 0.1, 0.1, 1.0)
    np.testing.assert_allclose(theta, [2.87, 3.96], rtol=1e-14)


def test_adam_first_steps_by_hand():
    """First Adam step: m̂ = g, v̂ = g², so u = g/(|g| + eps) coordinate-wise (≈ sign g).
    fixed sphere, θ0 = (0, 0, 2), r0 = 2, η_eff = 0.25, g = (1, 0, 0), β1 = 0.9: θ = (−0.5, 0, 2)
      before projection (the step is η_eff r0 u), r̃ = √4.25, θ = 2 (−1, 0, 4)/√17; m = (0.1, 0, 0)
      minus its radial part: ⟨m, θ̂⟩ = −0.1/√17, m = (0.1 − 0.1/17, 0, 0.4/17).
    fixed ELR, θ0 = (3, 4), g = (1, −2), η_eff = 0.01, λ = 0.1: θ1 = θ0 − 0.01 (5 u + 25·0.1 θ0)
      = (3 − 0.05 − 0.075, 4 + 0.05 − 0.1) = (2.875, 3.95).
    fixed LR, same θ0, g, λ, η = 0.1: θ1 = θ0 − 0.1 (u + 0.1 θ0) = (2.87, 4.06)."""
    eps = 1e-8
    opt = _opt("adam", beta1=0.9, beta2=0.999, adam_eps=eps)
    theta = _t([0.0, 0.0, 2.0])
    st = init_state(opt, theta)
    r = step(opt, "fixed_sphere", theta, _t([1.0, 0, 0]), st, 0.25, 0.0, 2.0)
    u = 1 / (1 + eps)
    assert r.item() == pytest.approx(math.sqrt(4 + (0.5 * u) ** 2), rel=1e-14)
    np.testing.assert_allclose(theta, 2 * np.array([-0.5 * u, 0, 2]) / math.sqrt(4 + (0.5 * u) ** 2),
                               rtol=1e-14)
    np.testing.assert_allclose(st["m"], [0.1 - 0.1 / 17, 0, 0.4 / 17], rtol=1e-7)
    assert st["step"].item() == 1
    for protocol, lr, want in (("fixed_elr", 0.01, [2.875, 3.95]), ("fixed_lr", 0.1, [2.87, 4.06])):
        theta = _t([3.0, 4.0])
        st = init_state(opt, theta)
        step(opt, protocol, theta, _t([1.0, -2.0]), st, lr, 0.1, 1.0)
        np.testing.assert_allclose(theta, want, rtol=1e-7)


# -----------------------------------------------------------------------------
# several steps against a numpy transcription of §10

def _reference(name, protocol, theta, grads, lr, wd, r0, beta=0.9, b1=0.9, b2=0.999, eps=1e-8):
    th = np.array(theta, float)
    buf, m, v = np.zeros_like(th), np.zeros_like(th), np.zeros_like(th)
    for t, g in enumerate(grads, start=1):
        r = np.linalg.norm(th)
        if name == "momentum":
            buf = beta * buf + (g if protocol == "fixed_sphere" else g + wd * th)
            th = th - {"fixed_sphere": lr * r0 ** 2, "fixed_elr": lr * r ** 2, "fixed_lr": lr}[protocol] * buf
        else:
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
            th = th - {"fixed_sphere": lr * r0 * u, "fixed_elr": lr * (r * u + r ** 2 * wd * th),
                       "fixed_lr": lr * (u + wd * th)}[protocol]
        if protocol == "fixed_sphere":
            th = r0 * th / np.linalg.norm(th)
            unit = th / r0
            buf = buf - (buf @ unit) * unit
            m = m - (m @ unit) * unit
    return th


@pytest.mark.parametrize("name", ["momentum", "adam"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ten_steps_match_the_formulas(name, protocol):
    rng = np.random.default_rng(3)
    D, r0, lr, wd = 6, 1.7, 0.02, 0.05
    theta0 = rng.standard_normal(D)
    theta0 *= r0 / np.linalg.norm(theta0)
    grads = rng.standard_normal((10, D))
    opt = _opt(name)
    theta = _t(theta0)
    st = init_state(opt, theta)
    for g in grads:
        step(opt, protocol, theta, _t(g), st, lr, wd, r0)
    np.testing.assert_allclose(theta.numpy(), _reference(name, protocol, theta0, grads, lr, wd, r0),
                               rtol=1e-12, atol=1e-14)
    if protocol == "fixed_sphere":
        assert theta.norm().item() == pytest.approx(r0, rel=1e-14)
        moment = st["buf" if name == "momentum" else "m"]
        assert abs(float(moment @ theta)) < 1e-12 * r0


# -----------------------------------------------------------------------------
# fixed LR reduces to torch.optim

def _quadratic_grad(theta, H, b):
    return H @ theta + b


@pytest.mark.parametrize("name,wd,torch_opt", [
    ("momentum", 0.0, lambda p: torch.optim.SGD([p], lr=0.05, momentum=0.8)),
    ("momentum", 0.1, lambda p: torch.optim.SGD([p], lr=0.05, momentum=0.8, weight_decay=0.1)),
    ("adam", 0.0, lambda p: torch.optim.Adam([p], lr=0.05, betas=(0.85, 0.99), eps=1e-6)),
    ("adam", 0.1, lambda p: torch.optim.AdamW([p], lr=0.05, betas=(0.85, 0.99), eps=1e-6, weight_decay=0.1)),
])
def test_fixed_lr_matches_torch_optim(name, wd, torch_opt):
    torch.manual_seed(0)
    D = 8
    A = torch.randn(D, D, dtype=torch.float64)
    H, b = A @ A.T / D, torch.randn(D, dtype=torch.float64)
    theta0 = torch.randn(D, dtype=torch.float64)
    p = theta0.clone().requires_grad_(True)
    ref = torch_opt(p)
    opt = _opt(name, **({"momentum": 0.8} if name == "momentum" else
                        {"beta1": 0.85, "beta2": 0.99, "adam_eps": 1e-6}))
    theta = theta0.clone()
    st = init_state(opt, theta)
    for _ in range(25):
        ref.zero_grad()
        p.grad = _quadratic_grad(p.detach(), H, b)
        ref.step()
        step(opt, "fixed_lr", theta, _quadratic_grad(theta, H, b), st, 0.05, wd, 1.0)
    torch.testing.assert_close(theta, p.detach(), rtol=1e-12, atol=1e-13)


# -----------------------------------------------------------------------------
# sgd, bundles, checkpoints, config

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sgd_is_the_plain_protocol_and_momentum_zero_equals_it(protocol):
    rng = np.random.default_rng(1)
    theta0, g = rng.standard_normal(5), rng.standard_normal(5)
    plain = _t(theta0)
    r_plain = protocols.get(protocol)(plain, _t(g), 0.03, 0.1, 1.3)
    for opt in (_opt("sgd"), _opt("momentum", momentum=0.0)):
        theta = _t(theta0)
        r = step(opt, protocol, theta, _t(g), init_state(opt, theta), 0.03, 0.1, 1.3)
        torch.testing.assert_close(theta, plain, rtol=1e-15, atol=1e-15)
        assert (r is None) == (r_plain is None)


@pytest.mark.parametrize("name", ["momentum", "adam"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bundle_equals_walkers_one_by_one(name, protocol):
    rng = np.random.default_rng(2)
    K, D = 4, 3
    th0, grads = rng.standard_normal((K, D)), rng.standard_normal((3, K, D))
    lr, wd, r0 = np.array([0.01, 0.02, 0.05, 0.1])[:, None], 0.1, np.array([0.5, 1, 2, 4.0])[:, None]
    th0 *= r0 / np.linalg.norm(th0, axis=1, keepdims=True)
    opt = _opt(name)
    bundle = _t(th0)
    st = init_state(opt, bundle)
    for g in grads:
        r_b = step(opt, protocol, bundle, _t(g), st, _t(lr), wd, _t(r0))
    for k in range(K):
        one = _t(th0[k])
        st1 = init_state(opt, one)
        for g in grads:
            r_1 = step(opt, protocol, one, _t(g[k]), st1, float(lr[k, 0]), wd, float(r0[k, 0]))
        torch.testing.assert_close(bundle[k], one, rtol=1e-13, atol=1e-14)
        if protocol == "fixed_sphere":
            assert r_b[k].item() == pytest.approx(r_1.item(), rel=1e-13)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_checkpoint_resume_is_exact(name):
    """Five steps, checkpoint θ and the state through torch.save / torch.load(weights_only=True),
    five more; a fresh state loaded from the checkpoint continues bit for bit."""
    torch.manual_seed(4)
    opt = _opt(name)
    theta = torch.randn(7)
    theta *= 1.5 / theta.norm()
    grads = torch.randn(10, 7)
    st = init_state(opt, theta)
    for g in grads[:5]:
        step(opt, "fixed_sphere", theta, g, st, 0.01, 0.0, 1.5)
    blob = io.BytesIO()
    torch.save({"theta": theta.clone(), "opt": state_dict(st)}, blob)
    for g in grads[5:]:
        step(opt, "fixed_sphere", theta, g, st, 0.01, 0.0, 1.5)
    blob.seek(0)
    ck = torch.load(blob, weights_only=True)
    resumed = ck["theta"]
    st2 = init_state(opt, resumed)
    load_state_dict(st2, ck["opt"])
    for g in grads[5:]:
        step(opt, "fixed_sphere", resumed, g, st2, 0.01, 0.0, 1.5)
    assert torch.equal(resumed, theta)
    with pytest.raises(ValueError, match="another optimizer setting"):
        load_state_dict(init_state(_opt("sgd"), theta), ck["opt"])


@pytest.mark.parametrize("cfg,match", [
    ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is not known"),
    ({"optimizer": "momentum", "momentum": 1.0}, "0 ≤ momentum < 1"),
    ({"optimizer": "adam", "beta2": -0.1}, "0 ≤ beta2 < 1"),
    ({"optimizer": "adam", "adam_eps": 0}, "adam_eps = 0: must be a number > 0"),
    ({"optimizer": "adam", "momentum": 1.5}, "0 ≤ momentum < 1"),   # checked even where it does not act
])
def test_bad_settings_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        optimizer_config(cfg)


def test_keys_of_another_optimizer_do_not_act():
    """optimizer on an axis with momentum: 0.9 fixed: the adam and sgd members ignore β."""
    assert ignored_keys({"optimizer": "adam", "momentum": 0.9, "beta1": 0.8}) == ["momentum"]
    assert ignored_keys({"optimizer": "momentum", "momentum": 0.9, "beta1": 0.8}) == ["beta1"]
    theta0, g = np.array([0.6, 0.8, 0.0]), np.array([0.0, 0.3, -0.2])
    plain, theta = _t(theta0), _t(theta0)
    protocols.fixed_lr(plain, _t(g), 0.1, 0.01, 1.0)
    opt = optimizer_config({"optimizer": "sgd", "momentum": 0.5, "beta1": 0.5})
    step(opt, "fixed_lr", theta, _t(g), init_state(opt, theta), 0.1, 0.01, 1.0)
    assert torch.equal(theta, plain)


def test_defaults_and_step_lr():
    assert optimizer_config({})["optimizer"] == "sgd"
    unset = {"optimizer": None, "momentum": None, "beta1": None, "beta2": None, "adam_eps": None}
    assert optimizer_config(unset) == {"optimizer": "sgd", "momentum": 0.9, "beta1": 0.9, "beta2": 0.999,
                                       "adam_eps": 1e-8}
    assert optimizer_config({"optimizer": "adam"})["beta2"] == 0.999
    assert step_lr(_opt("momentum"), "fixed_sphere", 0.1, 2.0) == pytest.approx(0.4)
    assert step_lr(_opt("adam"), "fixed_sphere", 0.1, 2.0) == pytest.approx(0.2)
    assert step_lr(_opt("adam"), "fixed_lr", 0.1, 2.0) == 0.1
