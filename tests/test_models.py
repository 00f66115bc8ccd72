"""Tests for trainables.models (docs/theory.md §1)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables.models import (ConvNet, build_bundle, build_model, flatten_si_parameters, global_norm,
                               num_si_params, si_parameters)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in si_parameters(model)])


def convnet_D(c, cin=3):
    # four 3x3 convs without bias: cin→c, c→2c, 2c→4c, 4c→8c
    return 9 * (cin * c + c * 2 * c + 2 * c * 4 * c + 4 * c * 8 * c)


def resnet18_D(k, cin=3):
    d = 9 * cin * k  # stem
    cin_stage = k
    for planes in (k, 2 * k, 4 * k, 8 * k):
        d += 9 * cin_stage * planes + 9 * planes * planes  # first block, two 3x3 convs
        if cin_stage != planes:
            d += cin_stage * planes  # 1x1 shortcut conv
        d += 2 * 9 * planes * planes  # second block
        cin_stage = planes
    return d


def test_param_counts_match_hand_computation():
    assert convnet_D(8) == 24_408 and convnet_D(64) == 1_550_016 and resnet18_D(4) == 43_692
    assert num_si_params(build_model("convnet", 8, 10)) == 24_408
    assert num_si_params(build_model("convnet", 64, 10)) == 1_550_016
    assert num_si_params(build_model("resnet18", 4, 10)) == 43_692
    # in_channels and num_classes: the head is not counted, the stem conv is
    assert num_si_params(build_model("convnet", 4, 100, in_channels=1)) == convnet_D(4, cin=1)
    assert num_si_params(build_model("resnet18", 2, 100, in_channels=1)) == resnet18_D(2, cin=1)


def test_unknown_name_and_bad_args():
    with pytest.raises(ValueError, match="convnet.*resnet18"):
        build_model("vgg", 8, 10)
    with pytest.raises(ValueError, match="loss"):
        build_model("convnet", 8, 10, loss="hinge")
    with pytest.raises(ValueError, match="width"):
        build_model("convnet", 0, 10)
    with pytest.raises(ValueError, match="radius"):
        build_model("convnet", 8, 10, radius=0.0)


def _no_eps(model):
    """BN's eps=1e-5 makes the invariance approximate; shrink it (torch refuses 0) to test the exact
    identity in float64."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-30
    return model


def _loss_and_grad(model, x, y):
    model.train()
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, si_parameters(model))
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name,width", [("convnet", 4), ("resnet18", 2)])
def test_scale_invariance_float64(name, width):
    torch.manual_seed(0)
    model = _no_eps(build_model(name, width, 10).double())
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    theta0 = flat(model)
    loss0, grad0 = _loss_and_grad(model, x, y)
    # <∇L, θ> = 0
    assert abs(grad0 @ theta0) <= 1e-10 * grad0.norm() * theta0.norm()
    assert grad0.norm() > 0
    for alpha in (0.1, 7.0):
        with torch.no_grad():
            for p in si_parameters(model):
                p.mul_(alpha)
        loss_a, grad_a = _loss_and_grad(model, x, y)
        assert torch.allclose(loss_a, loss0, rtol=1e-10, atol=0)
        # ∇L(αθ) = ∇L(θ)/α
        assert torch.allclose(grad_a, grad0 / alpha, rtol=1e-7, atol=1e-12 * grad0.abs().max() / alpha)
        with torch.no_grad():
            for p in si_parameters(model):
                p.div_(alpha)


def test_scale_invariance_approximate_with_default_eps():
    # with the default BN eps and |θ| = 1 the identity holds closely, not exactly
    torch.manual_seed(0)
    model = build_model("convnet", 4, 10).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    loss0, _ = _loss_and_grad(model, x, y)
    with torch.no_grad():
        for p in si_parameters(model):
            p.mul_(2.0)
    loss2, _ = _loss_and_grad(model, x, y)
    assert torch.allclose(loss2, loss0, rtol=1e-2)


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
@pytest.mark.parametrize("loss,norm", [("ce", 10.0), ("mse", 1.5)])
def test_head_frozen_with_target_norm(name, loss, norm):
    model = build_model(name, 4, 10, loss=loss)
    head_params = list(model.head.parameters())
    assert all(not p.requires_grad for p in head_params)
    ids = {id(p) for p in si_parameters(model)}
    assert not any(id(p) in ids for p in head_params)
    assert abs(model.head.weight.norm().item() - norm) < 1e-5
    assert (model.head.bias is not None) == (name == "convnet")
    # every trainable tensor is a bias-free conv weight
    assert all(p.dim() == 4 for p in si_parameters(model))
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(not m.affine for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_seeding_order_follows_theory():
    # seed 1 -> default-init model, seed 4 -> fresh Linear head, then global rescale of θ
    model = build_model("convnet", 8, 10, radius=2.5)
    torch.manual_seed(1)
    ref = ConvNet(8, 10)
    torch.manual_seed(4)
    head = nn.Linear(64, 10)
    ref_theta = torch.cat([p.detach().reshape(-1) for n, p in ref.named_parameters()
                           if not n.startswith("head.")])
    assert torch.allclose(flat(model), 2.5 * ref_theta / ref_theta.norm(), atol=1e-7)
    assert torch.allclose(model.head.weight, 10 * head.weight / head.weight.norm(), atol=1e-6)
    assert torch.equal(model.head.bias, head.bias)  # frozen bias, not rescaled


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_same_seeds_same_init_and_radius(name):
    a = build_model(name, 4, 10, radius=3.0)
    b = build_model(name, 4, 10, radius=3.0)
    c = build_model(name, 4, 10, radius=3.0, init_seed=2)
    d = build_model(name, 4, 10, radius=3.0, head_seed=5)
    assert torch.equal(flat(a), flat(b))
    assert torch.equal(a.head.weight, b.head.weight)
    assert abs(global_norm(flat(a)).item() - 3.0) < 1e-5
    assert not torch.allclose(flat(a), flat(c))
    assert torch.equal(flat(a), flat(d)) and not torch.allclose(a.head.weight, d.head.weight)


def test_global_rng_state_restored():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    build_model("resnet18", 2, 10, init_seed=7, head_seed=9)
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_flat_views(name):
    torch.manual_seed(0)
    model = build_model(name, 4, 10).double()
    before = flat(model)
    theta, grad = flatten_si_parameters(model)
    D = num_si_params(model)
    assert theta.shape == grad.shape == (D,) and theta.is_contiguous()
    assert torch.equal(theta, before) and torch.all(grad == 0)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))

    # gradient lands in the flat buffer, in place, and accumulates across backward calls
    model.train()
    ref = torch.autograd.grad(F.cross_entropy(model(x), y), si_parameters(model))
    ref = torch.cat([g.reshape(-1) for g in ref])
    grad.zero_()
    F.cross_entropy(model(x), y).backward()
    assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-15)
    F.cross_entropy(model(x), y).backward()
    assert torch.allclose(grad, 2 * ref, rtol=1e-12, atol=1e-15)
    grad.zero_()
    assert all(torch.all(p.grad == 0) for p in si_parameters(model))

    # in-place edits of theta change the model
    with torch.no_grad():
        out0 = model(x)
        theta[: D // 2].neg_()
        assert torch.equal(si_parameters(model)[0].reshape(-1), theta[: si_parameters(model)[0].numel()])
        out1 = model(x)
        assert not torch.allclose(out0, out1)
        theta[: D // 2].neg_()
        assert torch.allclose(model(x), out0)


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_input_shapes(name):
    small = build_model(name, 2, 10, in_channels=1)
    assert small(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    big = build_model(name, 2, 100, in_channels=3)
    assert big(torch.randn(4, 3, 32, 32)).shape == (4, 100)


def test_resnet_shortcut_takes_preactivated_input():
    # docs/theory.md §1: the projection shortcut BN -> conv1x1 acts on relu(bn1(x)), so its input is >= 0
    model = build_model("resnet18", 2, 10)
    seen = []
    for name, m in model.named_modules():
        if name.endswith("shortcut") and m is not None:
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    model.train()
    model(torch.randn(4, 3, 16, 16))
    assert len(seen) == 3  # one projection per stage with a shape change
    assert all(t.min() >= 0 for t in seen)




@pytest.mark.parametrize("dtype,shape,bundle", [(torch.float32, (64, 3, 32, 32), None),
                                                (torch.float64, (64, 3, 32, 32), None),
                                                (torch.float32, (32, 1, 8, 8), None),
                                                (torch.float32, (32, 3, 16, 16), 3)])
def test_convnet_pool_before_relu_gives_the_papers_bits(dtype, shape, bundle):
    """ConvNet applies each max pool before the ReLU in front of it (faster); the logits, the gradient
    and the BN running statistics must be bit for bit those of the papers' conv-BN-ReLU-pool order."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype)
    y = torch.randint(0, 10, (shape[0],))
    runs = {}
    for pool_first in (True, False):
        model = (build_bundle("convnet", 4, 10, [dict(loss="ce", init_seed=s, head_seed=4, radius=1.0)
                                                 for s in range(bundle)], in_channels=shape[1])
                 if bundle else build_model("convnet", 4, 10, in_channels=shape[1])).to(dtype)
        model.pool_first = pool_first
        relu_inputs = []
        for m in model.features:
            if isinstance(m, nn.ReLU):
                m.register_forward_hook(lambda mod, inp, out: relu_inputs.append(inp[0].shape[-1]))
        model.train()
        theta, grad = flatten_si_parameters(model)
        logits = model(x)
        loss = (F.cross_entropy(logits.reshape(-1, 10), y.repeat(bundle)) if bundle
                else F.cross_entropy(logits, y))
        loss.backward()
        stats = torch.cat([b for n, b in model.named_buffers() if "running" in n])
        runs[pool_first] = (logits.detach(), grad.clone(), stats, relu_inputs)
    fast, papers = runs[True], runs[False]
    assert fast[3] != papers[3]            # the ReLUs really saw pooled (smaller) inputs
    assert papers[1].abs().sum() > 0
    for a, b in zip(fast[:3], papers[:3]):
        assert torch.equal(a, b)
