"""Tests for trainables/entropy.py (docs/theory.md §4, §8) against independently known answers."""
import math

import pytest
import torch

from conftest import vmf3_entropy, vmf3_mean_cos
from trainables.entropy import (
    DEFAULT_KS,
    hyperspherical_angles,
    kl_sphere_entropy,
    knn_graph_entropy,
    pairwise_sq_distances,
    uniform_sphere_reference,
    _uniform_tile,
    UNIFORM_TILE_ROWS,
    window_radius,
)

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def uniform_s2(n, seed):
    z = torch.randn(n, 3, generator=_gen(seed), dtype=F64)
    return z / z.norm(dim=1, keepdim=True)


def vmf_s2(n, kappa, mu, seed):
    """Exact von Mises–Fisher samples on S²: w = μ·x has density ∝ e^{κw} on [−1, 1], inverted CDF."""
    g = _gen(seed)
    u = torch.rand(n, generator=g, dtype=F64)
    w = 1.0 + torch.log(u + (1.0 - u) * math.exp(-2.0 * kappa)) / kappa
    psi = 2.0 * math.pi * torch.rand(n, generator=g, dtype=F64)
    mu = mu / mu.norm()
    e1 = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    e1 = e1 - (e1 @ mu) * mu
    e1 = e1 / e1.norm()
    e2 = torch.linalg.cross(mu, e1)
    s = (1.0 - w ** 2).clamp(min=0.0).sqrt()
    return w[:, None] * mu + s[:, None] * (psi.cos()[:, None] * e1 + psi.sin()[:, None] * e2)


# --------------------------------------------------------------------------- pairwise distances

def test_pairwise_distances_nearly_identical_float32_window():
    D, N = 5000, 200
    g = _gen(0)
    base = torch.randn(D, generator=g, dtype=F64)
    x = base + 1e-6 * torch.randn(N, D, generator=g, dtype=F64) * math.sqrt(D) / base.norm()
    x = (x / x.norm(dim=1, keepdim=True)).to(torch.float32)  # unit vectors, ~1e-6 apart, stored float32
    x64 = x.to(F64)
    ref = torch.stack([(x64 - x64[i]).square().sum(dim=1) for i in range(N)])  # direct differences
    off = ~torch.eye(N, dtype=torch.bool)
    assert ref[off].min() > 0

    d2 = pairwise_sq_distances(x)
    assert d2.dtype == F64 and d2.shape == (N, N)
    rel = ((d2 - ref).abs()[off] / ref[off]).max().item()
    assert rel < 1e-9
    assert torch.all(d2.diagonal() == 0)
    # small column blocks give the same answer
    assert torch.allclose(pairwise_sq_distances(x, chunk=333), ref, rtol=1e-9, atol=0)

    # the naive float32 formula |a|² + |b|² − 2⟨a,b⟩ is useless here, which is what makes this test bite
    sq = x.square().sum(dim=1)
    naive = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    naive_rel = ((naive.to(F64) - ref).abs()[off] / ref[off]).max().item()
    assert naive_rel > 0.5


# --------------------------------------------------------------------------- k-NN graph estimator

def test_knn_hand_computed_rectangle():
    # corners of a 1 × 2 rectangle, embedded in R^5 (so d_e defaults to 4).
    # every corner has neighbours at distances 1, 2, √5 → L_1 = 4, L_2 = 12, L_3 = 12 + 4√5.
    pts = torch.zeros(4, 5, dtype=F64)
    pts[:, :2] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 2.0]])
    L = {1: 4.0, 2: 12.0, 3: 12.0 + 4.0 * math.sqrt(5.0)}
    out = knn_graph_entropy(pts, ks=(1, 2, 3, 10, 1000))  # 10 and 1000 clip to N − 1 = 3
    assert sorted(out) == [1, 2, 3]
    for k, lk in L.items():
        assert out[k] == pytest.approx(4 * math.log(lk) - 3 * math.log(4), abs=1e-12)
    out = knn_graph_entropy(pts.float(), ks=(2,), intrinsic_dim=1.5)
    assert out[2] == pytest.approx(1.5 * math.log(12.0) - 0.5 * math.log(4), abs=1e-6)


def test_knn_scaling_and_translation():
    g = _gen(1)
    x = torch.randn(300, 40, generator=g, dtype=F64)
    base = knn_graph_entropy(x, ks=DEFAULT_KS)
    assert sorted(base) == [1, 2, 5, 10, 20, 50, 100, 200, 299]
    alpha, d_e = 3.7, 39
    scaled = knn_graph_entropy(alpha * x, ks=DEFAULT_KS)
    shifted = knn_graph_entropy(x + 50.0 * torch.randn(40, generator=g, dtype=F64), ks=DEFAULT_KS)
    for k in base:
        assert scaled[k] - base[k] == pytest.approx(d_e * math.log(alpha), abs=1e-9)
        assert shifted[k] == pytest.approx(base[k], abs=1e-8)


def test_knn_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        knn_graph_entropy(torch.zeros(10))
    with pytest.raises(ValueError, match="at least 2"):
        knn_graph_entropy(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="positive int"):
        knn_graph_entropy(torch.randn(5, 4), ks=(0, 1))


# --------------------------------------------------------------------------- Kozachenko–Leonenko

def test_hyperspherical_angles_reconstruct_vector():
    x = torch.randn(6, 9, generator=_gen(2), dtype=F64)
    phi = hyperspherical_angles(x)
    assert phi.shape == (6, 8)
    s = x.norm(dim=1)
    rec = torch.empty_like(x)
    for i in range(7):  # x_i = r sin φ_1 … sin φ_{i−1} cos φ_i
        rec[:, i] = s * phi[:, i].cos()
        s = s * phi[:, i].sin()
    rec[:, 7], rec[:, 8] = s * phi[:, 7].cos(), s * phi[:, 7].sin()
    assert torch.allclose(rec, x, atol=1e-13)
    assert torch.equal(hyperspherical_angles(x, chunk=3), phi)
    assert window_radius(x) == pytest.approx(x.norm(dim=1).mean().item(), rel=1e-14)


# Tolerance for N = 4000 on S²: over 20 seeds the estimator's error was +0.01 ± 0.03 (uniform and
# vMF, κ = 10 and 50, both standardise options), so 0.12 is about bias + 3.5 standard deviations.
KL_TOL = 0.12


def test_kl_uniform_sphere_and_radius():
    x = uniform_s2(4000, seed=3)
    s_sphere, s_full = kl_sphere_entropy(x)
    assert s_sphere == pytest.approx(math.log(4 * math.pi), abs=KL_TOL)
    assert s_full == pytest.approx(s_sphere, abs=1e-12)  # r̄ = 1
    r = 3.0
    s_sphere_r, s_full_r = kl_sphere_entropy(r * x.float())
    assert s_sphere_r == pytest.approx(s_sphere, abs=1e-4)  # angles do not depend on r
    assert s_full_r == pytest.approx(math.log(4 * math.pi * r * r), abs=KL_TOL)
    assert s_full_r - s_sphere_r == pytest.approx(2 * math.log(r), abs=1e-5)


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("kappa,tilt", [(10.0, 1.2), (50.0, 0.4)])
def test_kl_von_mises_fisher_s2(kappa, tilt, standardize):
    mu = torch.tensor([math.cos(tilt), math.sin(tilt) * 0.6, math.sin(tilt) * 0.8], dtype=F64)
    x = vmf_s2(4000, kappa, mu, seed=4)
    s_sphere, _ = kl_sphere_entropy(x, standardize=standardize)
    assert s_sphere == pytest.approx(vmf3_entropy(kappa), abs=KL_TOL)


def test_vmf_sampler_matches_closed_form_mean():
    # checks the test's own sampler: E[μ·x] = coth κ − 1/κ
    kappa = 5.0
    mu = torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    w = vmf_s2(200_000, kappa, mu, seed=5) @ mu
    assert w.mean().item() == pytest.approx(vmf3_mean_cos(kappa), abs=3e-3)


# --------------------------------------------------------------------------- uniform reference

def test_uniform_sphere_reference_loss_and_entropy():
    D, n = 50, 1000
    ref = uniform_sphere_reference(D, n=n, ks=(1, 50), loss_fn=lambda th: th[:, 0] ** 2, seed=0, chunk=77)
    # θ_1² ~ Beta(1/2, (D−1)/2): mean 1/D, variance 2(D−1)/(D²(D+2))
    sd = math.sqrt(2 * (D - 1) / (D * D * (D + 2)) / n)
    assert ref["train_loss"] == pytest.approx(1 / D, abs=4 * sd)
    assert set(ref) == {"entropy_knn_k1", "entropy_knn_k50", "train_loss"}
    # same seed → same samples; independent of the loss chunk size
    again = uniform_sphere_reference(D, n=n, ks=(1, 50), loss_fn=lambda th: th[:, 0] ** 2, seed=0, chunk=1000)
    assert again["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-12)
    assert again["entropy_knn_k50"] == ref["entropy_knn_k50"]


def test_uniform_sphere_reference_distances_concentrate():
    # in high D, distances between uniform unit vectors concentrate at √2 (std ≈ 1/√(2D)), so the
    # mean k-NN distance L_k/(n k) recovered from Ŝ_k must lie a little below √2.
    D, n = 2000, 400
    ref = uniform_sphere_reference(D, n=n, ks=(1, 50), seed=1)
    for k in (1, 50):
        log_L = (ref[f"entropy_knn_k{k}"] + (D - 2) * math.log(n)) / (D - 1)
        mean_dist = math.exp(log_L) / (n * k)
        assert math.sqrt(2) * (1 - 6 / math.sqrt(D)) < mean_dist < math.sqrt(2)


def test_uniform_reference_in_tiles_equals_the_whole_matrix():
    # 70 samples (3 row tiles, the last one partial) × D = 300 in column blocks of 128 (3 blocks): the
    # tiled Gram path must give the entropy and mean loss of the explicitly assembled unit vectors
    D, n, cols = 300, 70, 128
    ref = uniform_sphere_reference(D, n=n, ks=(1, 5), loss_fn=lambda th: th[:, :3].sum(dim=1) ** 2,
                                   seed=5, col_chunk=cols, chunk=7)
    rows = [(a, min(UNIFORM_TILE_ROWS, n - r)) for a, r in enumerate(range(0, n, UNIFORM_TILE_ROWS))]
    blocks = [(b, min(cols, D - c)) for b, c in enumerate(range(0, D, cols))]
    z = torch.cat([torch.cat([_uniform_tile(5, a, b, r, c) for b, c in blocks], dim=1) for a, r in rows])
    theta = z / z.norm(dim=1, keepdim=True)
    direct = knn_graph_entropy(theta, (1, 5))
    assert ref["entropy_knn_k1"] == pytest.approx(direct[1], rel=1e-9)
    assert ref["entropy_knn_k5"] == pytest.approx(direct[5], rel=1e-9)
    assert ref["train_loss"] == pytest.approx((theta[:, :3].sum(dim=1) ** 2).mean().item(), rel=1e-6)
    # (θ_1 + θ_2 + θ_3)² has mean 3/D for uniform directions
    assert ref["train_loss"] == pytest.approx(3 / D, rel=0.5)
