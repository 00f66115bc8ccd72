"""Toy systems of docs/theory.md §8: exact vMF formulas, the isotropic-noise walkers, the 3D sphere toy."""
import io
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import gammaln

from trainables.toys.sphere import SphereToyRunner, gradient_metrics, sphere_toy_normals
from trainables.toys.vmf import (VMFRunner, kappa_from_temperature, vmf_entropy, vmf_loss, vmf_mean_cos)


# -----------------------------------------------------------------------------
# exact formulas vs numerical integration over the polar angle

def _sphere_integral(f, D):
    """∫ over S^{D−1} of f(cos θ), θ the angle to a fixed axis: |S^{D−2}| ∫_0^π f(cos θ) sin^{D−2}θ dθ."""
    area = math.exp(math.log(2) + (D - 1) / 2 * math.log(math.pi) - gammaln((D - 1) / 2))
    return area * quad(lambda t: f(math.cos(t)) * math.sin(t) ** (D - 2), 0, math.pi, limit=200)[0]


@pytest.mark.parametrize("D", [3, 5])
@pytest.mark.parametrize("kappa", [0.3, 2.0, 10.0, 60.0])
def test_vmf_formulas_match_numerical_integration(D, kappa):
    # unnormalised density exp(κ cos θ) around the mean direction
    Z = _sphere_integral(lambda c: math.exp(kappa * (c - 1)), D)  # scaled by e^{−κ} for stability
    mean_cos = _sphere_integral(lambda c: c * math.exp(kappa * (c - 1)), D) / Z
    log_p = lambda c: kappa * (c - 1) - math.log(Z)  # noqa: E731
    entropy = -_sphere_integral(lambda c: math.exp(log_p(c)) * log_p(c), D)
    assert vmf_mean_cos(kappa, D) == pytest.approx(mean_cos, rel=1e-7)
    assert vmf_entropy(kappa, D) == pytest.approx(entropy, rel=1e-6, abs=1e-8)
    # sign convention: L = 1 + ⟨μ, ŵ⟩ with density ∝ exp(−L/T), T = 1/κ: the mean of L is 1 − A_D
    w = lambda c: math.exp(-kappa * (1 + c))  # noqa: E731  (c = cos of the angle to μ)
    U = _sphere_integral(lambda c: (1 + c) * w(c), D) / _sphere_integral(w, D)
    assert vmf_loss(kappa, D) == pytest.approx(U, rel=1e-6)


@pytest.mark.parametrize("D", [3, 4, 10])
def test_vmf_small_temperature_asymptotics(D):
    T = 1e-5
    kappa = kappa_from_temperature(T)
    assert kappa == pytest.approx(1e5)
    assert vmf_loss(kappa, D) == pytest.approx((D - 1) * T / 2, rel=1e-3)
    assert vmf_entropy(kappa, D) == pytest.approx((D - 1) / 2 * math.log(2 * math.pi * math.e * T), abs=1e-3)
    assert np.isfinite(vmf_entropy(1e8, D))  # no overflow of the Bessel functions


def test_vmf_bad_kappa():
    with pytest.raises(ValueError, match="kappa"):
        vmf_mean_cos(-1.0, 3)


# -----------------------------------------------------------------------------
# walkers: stationary values vs vMF and the SDE radius

def _run(members, sink=None):
    runner = VMFRunner(members)
    return runner, list(runner.run(sink))


@pytest.mark.parametrize("protocol,radius", [("fixed_elr", 1.0), ("fixed_lr", 1.0), ("fixed_sphere", 2.0)])
def test_vmf_stationary_loss_and_radius(protocol, radius):
    # D = 3, σ = 1. η = λ = 0.02 gives T = 0.01 on every protocol:
    #   fixed ELR / sphere T = η_eff σ²/2;  fixed LR T = sqrt(η λ σ² / (2 (D − 1))).
    # The noise σ ξ/|w| in the D − 1 tangent directions has tr Σ = σ²(D − 1)/r², so §3's
    # σ² = tr Σ r²/(D − 1) is the noise parameter squared. SDE radius: r*² = T (D − 1)/λ = 1.
    D, eta, lam, T = 3, 0.02, 0.02, 0.01
    wd = 0.0 if protocol == "fixed_sphere" else lam
    members = [dict(protocol=protocol, lr=eta, wd=wd, radius=radius, dim=D, noise=1.0,
                    iterations=60_000, log_schedule="every:10000", entropy=[]) for _ in range(8)]
    _, events = _run(members)
    rows = [r for e in events[1:] for r in e["rows"]]  # the first 10k iterations are burn-in
    U = np.mean([r["train_loss"] for r in rows])
    exact = vmf_loss(1 / T, D)
    assert U == pytest.approx(exact, rel=0.05)
    r = np.mean([r["radius"] for r in rows])
    if protocol == "fixed_sphere":
        assert r == pytest.approx(radius, rel=1e-12)
        # pre-projection radius: r̃ = r0 sqrt(1 + η_eff² |v_t|²), E|v_t|² = σ²(D − 1) + G² ≈ 2 + 2T
        excess = np.mean([r["radius_preproj"] for r in rows]) - radius
        assert excess == pytest.approx(radius * eta ** 2 * (2 + 2 * T) / 2, rel=0.03)
    else:
        assert r == pytest.approx(math.sqrt(T * (D - 1) / lam), rel=0.03)


def test_vmf_entropy_through_local_sink():
    sinks = pytest.importorskip("trainables.sinks")
    D, eta, lam = 3, 0.02, 0.02
    spec = {"name": "kl", "window": 1000, "stride": 50, "standardize": True}
    members = [dict(protocol="fixed_elr", lr=eta, wd=lam, dim=D, iterations=100_000,
                    log_schedule="every:50000", entropy=[spec]) for _ in range(4)]
    sink = sinks.LocalSink([spec], 4, D, dtype=torch.float64)
    _, events = _run(members, sink)
    S = [r["entropy_kl_sphere"] for e in events for r in e["rows"]]
    assert len(S) == 8
    assert np.mean(S) == pytest.approx(vmf_entropy(1 / (eta / 2), D), abs=0.15)
    assert all(abs(r["window_radius"] - 1) < 0.1 for e in events for r in e["rows"])


def test_vmf_bundle_must_share_protocol():
    with pytest.raises(ValueError, match="protocol"):
        VMFRunner([dict(protocol="fixed_elr", lr=0.01, wd=0.01), dict(protocol="fixed_lr", lr=0.01, wd=0.01)])


def test_vmf_divergence_marks_member():
    # fixed LR with η λ = 3 flips and grows θ every step: |1 − ηλ| = 2
    members = [dict(protocol="fixed_lr", lr=0.01, wd=0.01, iterations=3000, log_schedule="every:1000", entropy=[]),
               dict(protocol="fixed_lr", lr=1.0, wd=3.0, iterations=3000, log_schedule="every:1000", entropy=[])]
    runner, events = _run(members)
    assert runner.status == ["done", "diverged"]
    assert events[-1]["rows"][1] is None and events[-1]["rows"][0] is not None


def _reference_steps(protocol, theta, v, lr, wd, r0):
    """docs/theory.md §2 written out: g = P_θ(v)/|θ| with P_θ the tangent projection, v = μ + σ ξ."""
    theta = theta.copy()
    for vk in v:
        r = np.linalg.norm(theta, axis=1, keepdims=True)
        u = theta / r
        g = (vk - np.sum(vk * u, axis=1, keepdims=True) * u) / r
        if protocol == "fixed_elr":
            theta = theta - lr * r ** 2 * (g + wd * theta)
        elif protocol == "fixed_lr":
            theta = theta - lr * (g + wd * theta)
        else:
            tilde = theta - lr * r0 ** 2 * g          # the step uses η = η_eff r0²
            theta = r0 * tilde / np.linalg.norm(tilde, axis=1, keepdims=True)
    return theta


@pytest.mark.parametrize("protocol", ["fixed_elr", "fixed_lr", "fixed_sphere"])
def test_vmf_steps_numpy_and_torch_paths_follow_the_protocol(protocol):
    from trainables.toys.vmf import _np_dot, _torch_dot, _walk
    rng = np.random.default_rng(3)
    n, D = 6, 3
    r0 = rng.uniform(0.5, 2.0, (n, 1))
    theta = rng.standard_normal((n, D))
    if protocol == "fixed_sphere":
        theta *= r0 / np.linalg.norm(theta, axis=1, keepdims=True)
    v = rng.standard_normal((5, n, D)) + np.array([0.3, -0.2, 0.9])
    lr, wd = rng.uniform(0.01, 0.2, (n, 1)), rng.uniform(0.01, 0.2, (n, 1))
    expected = _reference_steps(protocol, theta, v, lr, wd, r0)
    out = {"np": _walk(protocol, theta.copy(), v, lr, wd, r0, _np_dot, np.sqrt)[0]}
    T = lambda a: torch.from_numpy(a.copy())  # noqa: E731
    out["torch"] = _walk(protocol, T(theta), T(v), T(lr), T(wd), T(r0), _torch_dot, torch.sqrt)[0].numpy()
    np.testing.assert_allclose(out["np"], expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["torch"], expected, rtol=1e-12, atol=1e-14)


def _resume_equal(make_runner, make_sink, n_before):
    full = make_runner()
    reference = list(full.run(make_sink()))
    first, sink = make_runner(), make_sink()
    it = first.run(sink)
    head = [next(it) for _ in range(n_before)]
    buf = io.BytesIO()
    torch.save({"runner": first.state_dict(), "sink": sink.state_dict() if sink else None}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    second, sink2 = make_runner(), make_sink()
    second.load_state_dict(state["runner"])
    if sink2 is not None:
        sink2.load_state_dict(state["sink"])
    tail = list(second.run(sink2))
    assert head + tail == reference
    assert second.status == full.status


def test_vmf_resume_is_exact():
    sinks = pytest.importorskip("trainables.sinks")
    spec = {"name": "kl", "window": 20, "stride": 50, "standardize": False}
    members = [dict(protocol="fixed_sphere", lr=lr, radius=r, iterations=5000, log_schedule="every:1000",
                    entropy=[spec]) for lr in (0.01, 0.05) for r in (0.5, 2.0)]
    _resume_equal(lambda: VMFRunner(members), lambda: sinks.LocalSink([spec], 4, 3, dtype=torch.float64), 2)


# -----------------------------------------------------------------------------
# 3D sphere toy

def test_sphere_toy_metrics_match_autograd():
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    for setting in ("op", "up"):
        normals = sphere_toy_normals(setting)
        x = w.clone().requires_grad_(True)
        grads = []
        for n in normals:  # l_i(w) = ⟨n_i, w⟩² / |w|², differentiated by autograd
            (g,) = torch.autograd.grad(((x @ n) ** 2 / (x * x).sum(1)).sum(), x)
            grads.append(g)
        g = torch.stack(grads)
        gbar = g.mean(0)
        m = gradient_metrics(w, normals)
        assert torch.allclose(m["full_grad_norm"], gbar.norm(dim=1))
        assert torch.allclose(m["stoch_grad_mean_norm"], g.norm(dim=2).mean(0))
        assert torch.allclose(m["train_loss"], ((w @ normals.T) ** 2).mean(1))
        if setting == "op":  # two objects: snr = |g1 + g2| / |g1 − g2|
            assert torch.allclose(m["snr"], (g[0] + g[1]).norm(dim=1) / (g[0] - g[1]).norm(dim=1))
    up = sphere_toy_normals("up")
    assert torch.allclose(up @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
                          torch.full((3,), 0.2 / math.sqrt(1.04), dtype=torch.float64))


def test_sphere_toy_op_converges_with_positive_snr():
    runner = SphereToyRunner([dict(setting="op", lr=lr, iterations=3000) for lr in (0.05, 0.2)])
    events = list(runner.run())
    assert runner.status == ["converged", "converged"]
    for i in range(2):
        rows = [e["rows"][i] for e in events if e["rows"][i] is not None]
        assert rows[-1]["train_loss"] < 1e-16
        assert rows[-1]["snr"] > 0.1
        assert events[-1]["rows"][i] is None  # stopped after converging


def test_sphere_toy_up_snr_grows_with_lr():
    runner = SphereToyRunner([dict(setting="up", lr=lr, iterations=20_000) for lr in (0.01, 0.3)])
    events = list(runner.run())
    assert runner.status == ["done", "done"]
    late = [e for e in events if e["iteration"] >= 5000]
    snr = [np.mean([e["rows"][i]["snr"] for e in late]) for i in range(2)]
    loss = [np.mean([e["rows"][i]["train_loss"] for e in late]) for i in range(2)]
    assert 0 < snr[0] < snr[1]
    assert min(loss) > 0.01  # no common zero in UP


def test_sphere_toy_resume_is_exact_and_bundle_checked():
    members = [dict(setting="op", lr=lr, iterations=2000) for lr in (0.01, 0.5, 3.0)]
    _resume_equal(lambda: SphereToyRunner(members), lambda: None, 150)
    with pytest.raises(ValueError, match="setting"):
        SphereToyRunner([dict(setting="op", lr=0.1), dict(setting="up", lr=0.1)])


def test_sphere_toy_draws_one_object_per_step_for_every_lr():
    """Common random numbers (docs/theory.md §8, the papers' code): the object index of step k is the k-th
    draw of the setting's generator, the same for every LR. A walker therefore follows the path a hand
    loop over those draws gives, whatever other LRs share its bundle."""
    lrs, steps = (0.01, 0.1, 0.3), 500
    bundle = SphereToyRunner([dict(setting="up", lr=lr, iterations=steps, log_schedule="every:500")
                              for lr in lrs])
    list(bundle.run())
    gen = torch.Generator().manual_seed(43)                 # the UP seed
    idx = torch.randint(3, (steps,), generator=gen).tolist()
    normals = sphere_toy_normals("up")
    for i, lr in enumerate(lrs):
        w = torch.tensor([-0.8, 0.6, 0.1], dtype=torch.float64)
        w = w / w.norm()
        for k in idx:
            n = normals[k]
            c = (n * w).sum()
            w = w - (2 * lr * c) * (n - c * w)
            w = w / w.norm()
        torch.testing.assert_close(bundle.w[i], w, rtol=0, atol=1e-10)
        alone = SphereToyRunner([dict(setting="up", lr=lr, iterations=steps, log_schedule="every:500")])
        list(alone.run())
        torch.testing.assert_close(alone.w[0], bundle.w[i], rtol=0, atol=0)
