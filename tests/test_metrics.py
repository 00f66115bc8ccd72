"""Tests for trainables.metrics (docs/theory.md §3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainables import metrics
from trainables.data import load_dataset
from trainables.models import build_model, flatten_si_parameters


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    return d.x_train[:300], d.y_train[:300], d.x_test[:100], d.y_test[:100]


def twin_models(loss="ce"):
    """Two identical ConvNet(c=1) nets: one with flat θ/grad buffers (the code under test), one
    plain (the reference computed with autograd)."""
    a = build_model("convnet", 1, 10, in_channels=1, loss=loss)
    b = build_model("convnet", 1, 10, in_channels=1, loss=loss)
    theta, grad = flatten_si_parameters(a)
    return a, theta, grad, b


def ref_grad(model, loss_value):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_value, params)])


# ---- gradient_noise_stats ---------------------------------------------------------------------

def orthogonal_example():
    """ḡ = 3 e1 and g_i = ḡ + e_i with e_1 = e2, e_2 = 2 e3, e_3 = −2 e4 (mutually orthogonal)."""
    D = 6
    gbar = torch.zeros(D)
    gbar[0] = 3.0
    noise = [torch.zeros(D) for _ in range(3)]
    noise[0][1], noise[1][2], noise[2][3] = 1.0, 2.0, -2.0
    return gbar, [gbar + e for e in noise]


def test_gradient_noise_stats_known_answers():
    gbar, grads = orthogonal_example()
    s = metrics.gradient_noise_stats(gbar, iter(grads))
    # |e_i| = 1, 2, 2 → rms = sqrt((1 + 4 + 4)/3) = sqrt(3), mean = 5/3
    # |g_i| = sqrt(9 + |e_i|²) = sqrt(10), sqrt(13), sqrt(13)
    assert s["full_grad_norm"].item() == pytest.approx(3.0, rel=1e-12)
    assert s["stoch_grad_rms"].item() == pytest.approx(math.sqrt(3.0), rel=1e-12)
    assert s["noise_mean_norm"].item() == pytest.approx(5.0 / 3.0, rel=1e-12)
    assert s["stoch_grad_mean_norm"].item() == pytest.approx((math.sqrt(10) + 2 * math.sqrt(13)) / 3,
                                                             rel=1e-12)
    assert s["snr"].item() == pytest.approx(3.0 / math.sqrt(3.0), rel=1e-12)
    assert s["snr_mean"].item() == pytest.approx(3.0 / (5.0 / 3.0), rel=1e-12)
    assert all(v.dtype == torch.float64 for v in s.values())


def test_gradient_noise_stats_with_a_reused_buffer():
    """stochastic_gradients yields one shared buffer; the statistics must consume it immediately."""
    gbar, grads = orthogonal_example()
    buf = torch.empty_like(gbar)

    def shared():
        for g in grads:
            buf.copy_(g)
            yield buf

    s = metrics.gradient_noise_stats(gbar, shared())
    assert s["stoch_grad_rms"].item() == pytest.approx(math.sqrt(3.0), rel=1e-12)
    assert s["noise_mean_norm"].item() == pytest.approx(5.0 / 3.0, rel=1e-12)


def test_gradient_noise_stats_needs_one_gradient():
    with pytest.raises(ValueError, match="num_stoch_grads"):
        metrics.gradient_noise_stats(torch.zeros(3), iter([]))


def test_variance_terms_by_hand():
    stats = {"stoch_grad_rms": torch.tensor(2.0, dtype=torch.float64),
             "full_grad_norm": torch.tensor(0.5, dtype=torch.float64)}
    v = metrics.variance_terms(stats, torch.tensor(3.0), D=10)
    assert v["trace_sigma"].item() == pytest.approx(4.0 * 9.0)      # rms² r²
    assert v["grad_sq"].item() == pytest.approx(0.25 * 9.0)         # |ḡ|² r²
    assert v["sigma2"].item() == pytest.approx(36.0 / 9.0)          # tr Σ / (D − 1)


# ---- losses -------------------------------------------------------------------------------------

def test_loss_sum_matches_torch_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 10, generator=g)
    y = torch.randint(0, 10, (7,), generator=g)
    assert metrics.batch_loss(logits, y, "ce").item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    onehot = torch.zeros(7, 10)
    onehot[torch.arange(7), y] = 1.0
    # MSE: squared error summed over the 10 classes, averaged over the 7 samples (docs/theory.md §3)
    assert metrics.batch_loss(logits, y, "mse").item() == pytest.approx(10 * F.mse_loss(logits, onehot).item(), rel=1e-6)
    assert metrics.loss_sum(logits, y, "mse").item() == pytest.approx(70 * F.mse_loss(logits, onehot).item(), rel=1e-6)


def test_mse_sums_over_classes_by_hand():
    # two samples, three classes; targets 0 and 2:
    # sample 1: (1 − 1)² + (2 − 0)² + (0 − 0)² = 4; sample 2: (0.5)² + (−1)² + (3 − 1)² = 5.25
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    y = torch.tensor([0, 2])
    assert metrics.loss_sum(logits, y, "mse").item() == pytest.approx(9.25, abs=1e-7)
    assert metrics.batch_loss(logits, y, "mse").item() == pytest.approx(4.625, abs=1e-7)


# ---- full gradient ------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_full_gradient_one_chunk_is_the_mean_loss_gradient(digits, loss):
    x, y, _, _ = digits
    model, theta, grad, ref = twin_models(loss)
    grad.fill_(7.0)  # stale content must be cleared
    train_loss, train_acc = metrics.full_gradient(model, x, y, grad, loss)  # 300 samples < one chunk of 1024
    ref.train()
    out = ref(x)
    if loss == "ce":
        mean_loss = F.cross_entropy(out, y)
    else:
        mean_loss = F.mse_loss(out, F.one_hot(y, 10).float(), reduction="sum") / y.shape[0]
    expected = ref_grad(ref, mean_loss)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert train_loss.item() == pytest.approx(mean_loss.item(), rel=1e-5)
    assert train_acc.item() == pytest.approx((out.argmax(1) == y).sum().item() / y.shape[0], abs=1e-12)
    assert model.training


def test_full_gradient_chunked_is_chunk_sum_over_n(digits):
    x, y, _, _ = digits
    n, chunk = x.shape[0], 64
    model, theta, grad, ref = twin_models()
    metrics.full_gradient(model, x, y, grad, "ce", chunk=chunk)
    ref.train()
    total = None
    loss_total = 0.0
    for a in range(0, n, chunk):
        l = F.cross_entropy(ref(x[a:a + chunk]), y[a:a + chunk], reduction="sum")
        loss_total += l.item()
        g = ref_grad(ref, l)
        total = g if total is None else total + g
    expected = total / n
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    # and BN statistics per chunk do make it differ from the one-chunk gradient
    one_chunk, _, _, ref2 = twin_models()
    ref2.train()
    whole = ref_grad(ref2, F.cross_entropy(ref2(x), y))
    assert (whole - expected).norm() > 1e-3 * whole.norm()


def test_full_gradient_is_tangent_and_leaves_theta(digits):
    """Scale invariance (§1): ⟨ḡ, θ⟩ ≈ 0 (up to BN's eps; a random direction would give a cosine
    of order D^-1/2 ≈ 0.05); measuring does not move θ."""
    x, y, _, _ = digits
    model, theta, grad, _ = twin_models()
    before = theta.clone()
    metrics.full_gradient(model, x, y, grad, "ce", chunk=128)
    assert torch.equal(theta, before)
    assert abs(torch.dot(theta, grad).item()) < 2e-3 * theta.norm().item() * grad.norm().item()


# ---- evaluation and stochastic gradients --------------------------------------------------------

def test_evaluate_uses_eval_mode_and_restores_train_mode(digits):
    x, y, xt, yt = digits
    model, theta, grad, ref = twin_models()
    # give BN some running statistics first (identical in both nets)
    metrics.full_gradient(model, x, y, grad, "ce")
    ref.train()
    with torch.no_grad():
        ref(x)
    loss, acc = metrics.evaluate(model, xt, yt, "ce", chunk=32)
    assert model.training
    ref.eval()
    with torch.no_grad():
        out = ref(xt)
    assert loss.item() == pytest.approx(F.cross_entropy(out, yt).item(), rel=1e-5)
    assert acc.item() == pytest.approx((out.argmax(1) == yt).sum().item() / yt.shape[0], abs=1e-12)
    # train-mode statistics would give another loss
    ref.train()
    with torch.no_grad():
        assert abs(F.cross_entropy(ref(xt), yt).item() - loss.item()) > 1e-4


def test_stochastic_gradients_do_not_step_and_match_autograd(digits):
    x, y, _, _ = digits
    model, theta, grad, ref = twin_models()
    before = theta.clone()
    gen = torch.Generator().manual_seed(5)
    replay = torch.Generator().manual_seed(5)
    got = [g.clone() for g in metrics.stochastic_gradients(model, x, y, grad, "ce", 3, 16, gen)]
    assert len(got) == 3
    assert torch.equal(theta, before)
    ref.train()
    for g in got:
        idx = torch.randint(x.shape[0], (16,), generator=replay)
        expected = ref_grad(ref, F.cross_entropy(ref(x[idx]), y[idx]))
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # fresh batches
