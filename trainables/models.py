"""Fully scale-invariant networks (docs/theory.md §1).

Every trainable tensor is a bias-free conv followed by ``BatchNorm2d(affine=False)``, so the training
loss satisfies L(αθ) = L(θ) for α > 0. The linear head is frozen at initialisation (Frobenius norm 10
for cross-entropy, 1.5 for MSE) and is not part of θ.

Public API:
    build_model(name, width, num_classes, ...) -> nn.Module
    build_bundle(name, width, num_classes, members, ...) -> nn.Module of K members (grouped convs)
    FlatBundle(model, K)          θ (K, D) and ∇ (K, D) of a bundled model, one row per member
    bundle_skeleton(name, width, num_classes, K, ...) -> a bundle of K members whose state is to be loaded
    select_members(state, K, keep) -> the state_dict of a bundle of members ``keep`` only
    si_parameters(model) -> list of trainable parameters (θ, fixed order)
    num_si_params(model) -> D
    flatten_si_parameters(model) -> (theta, grad) flat views shared with the model
    global_norm(theta) -> |θ|
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_NORMS = {"ce": 10.0, "mse": 1.5}  # docs/theory.md §1


def _conv(cin, cout, kernel, stride=1, bundle=None):
    """A bias-free conv; for a bundle of K members, K of them side by side (grouped, see BundleConv)."""
    if bundle is None:
        return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return BundleConv(bundle, cin, cout, kernel, stride)


def _conv3x3(cin, cout, stride=1, bundle=None):
    return _conv(cin, cout, 3, stride, bundle)


def _bn(c, bundle=None):
    """BN(affine=False); over K·c channels for a bundle, which keeps every member's statistics apart."""
    return nn.BatchNorm2d(c * (bundle or 1), affine=False)


def _head(cin, num_classes, bias, bundle=None):
    if bundle is None:
        return nn.Linear(cin, num_classes, bias=bias)
    return BundleHead(bundle, cin, num_classes, bias)


class BundleConv(nn.Module):
    """K bias-free convs cin→cout as one conv with K·cout output channels (member k: block k).

    The input is either per member, (B, K·cin, H, W), and the conv is grouped (groups = K); or shared
    by all members, (B, cin, H, W) (members that draw the same minibatch), and the conv is dense.
    """

    def __init__(self, K, cin, cout, kernel, stride=1):
        super().__init__()
        self.K, self.cin, self.stride, self.padding = K, cin, stride, kernel // 2
        self.weight = nn.Parameter(torch.empty(K * cout, cin, kernel, kernel))

    def forward(self, x):
        groups = self.K if x.shape[1] == self.K * self.cin else 1
        return F.conv2d(x, self.weight, None, self.stride, self.padding, 1, groups)


class BundleHead(nn.Module):
    """K frozen linear heads: features (B, K·F) → logits (K, B, classes)."""

    def __init__(self, K, cin, num_classes, bias):
        super().__init__()
        self.K = K
        self.register_buffer("weight", torch.zeros(K, num_classes, cin))
        self.register_buffer("bias", torch.zeros(K, 1, num_classes) if bias else None)

    def forward(self, f):
        f = f.view(f.shape[0], self.K, -1).transpose(0, 1)                 # (K, B, F)
        w = self.weight.transpose(1, 2)
        return torch.bmm(f, w) if self.bias is None else torch.baddbmm(self.bias, f, w)


# -----------------------------------------------------------------------------
# ConvNet(c)


class ConvNet(nn.Module):
    """conv(in→c) | conv(c→2c) pool | conv(2c→4c) pool | conv(4c→8c) pool | global max pool | head.

    Each conv is followed by BN(affine=False) and ReLU (docs/theory.md §1). The final MaxPool4 is an
    adaptive max pool to 1×1: identical at 32×32 input, and it also accepts 8×8 digits.

    ``features`` lists the layers in the papers' order. ``forward`` applies each max pool before the ReLU
    that precedes it (``pool_first``, the default): ReLU is monotone, so max(relu(x)) = relu(max(x))
    bit for bit, and the gradient is the same too (both send a window's gradient to its first maximum
    and zero it where that maximum is ≤ 0), but the ReLU then runs on a quarter of the activations (a
    64th after the global pool). ``pool_first = False`` runs the papers' order (the benchmark's
    reference loop; tests/test_models.py checks that both give the same bits).
    """

    pool_first = True

    def __init__(self, width, num_classes, in_channels=3, bundle=None):
        super().__init__()
        c = width
        chans = [in_channels, c, 2 * c, 4 * c, 8 * c]
        layers = []
        for i in range(4):
            layers += [_conv3x3(chans[i], chans[i + 1], bundle=bundle), _bn(chans[i + 1], bundle),
                       nn.ReLU(inplace=True)]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = _head(8 * c, num_classes, True, bundle)  # replaced and frozen by build_model
        self._pool_first_order = _pools_before_relus(layers)

    def forward(self, x):
        if not self.pool_first:
            return self.head(self.features(x))
        layers = list(self.features)
        for i in self._pool_first_order:
            x = layers[i](x)
        return self.head(x)


def _pools_before_relus(layers):
    """Indices of ``layers`` with every ReLU that is directly followed by a max pool swapped with it."""
    order, i = [], 0
    while i < len(layers):
        if (isinstance(layers[i], nn.ReLU) and i + 1 < len(layers)
                and isinstance(layers[i + 1], (nn.MaxPool2d, nn.AdaptiveMaxPool2d))):
            order += [i + 1, i]
            i += 2
        else:
            order.append(i)
            i += 1
    return order


# -----------------------------------------------------------------------------
# Pre-activation ResNet-18(k)


class PreActBlock(nn.Module):
    """BN ReLU conv3x3 BN ReLU conv3x3 + shortcut (docs/theory.md §1).

    Where the shape changes, the shortcut is BN(affine=False) → conv1x1(stride) applied to the
    block's pre-activated input relu(bn1(x)); otherwise it is the identity on x.
    """

    def __init__(self, cin, cout, stride, bundle=None):
        super().__init__()
        self.bn1 = _bn(cin, bundle)
        self.conv1 = _conv3x3(cin, cout, stride, bundle)
        self.bn2 = _bn(cout, bundle)
        self.conv2 = _conv3x3(cout, cout, bundle=bundle)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_bn(cin, bundle), _conv(cin, cout, 1, stride, bundle))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """conv3x3(in→k); stages of 2 blocks with k, 2k, 4k, 8k planes (strides 1,2,2,2); BN ReLU
    global average pool (adaptive; = AvgPool4 at 32×32); frozen bias-free head."""

    def __init__(self, width, num_classes, in_channels=3, bundle=None):
        super().__init__()
        k = width
        self.conv1 = _conv3x3(in_channels, k, bundle=bundle)
        blocks, cin = [], k
        for planes, stride in [(k, 1), (2 * k, 2), (4 * k, 2), (8 * k, 2)]:
            for s in (stride, 1):
                blocks.append(PreActBlock(cin, planes, s, bundle))
                cin = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = _bn(cin, bundle)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = _head(cin, num_classes, False, bundle)  # replaced and frozen by build_model

    def forward(self, x):
        out = self.blocks(self.conv1(x))
        return self.head(self.pool(F.relu(self.bn(out))))


# -----------------------------------------------------------------------------
# construction


MODELS = {"convnet": ConvNet, "resnet18": PreActResNet18}


def build_model(name, width, num_classes, in_channels=3, loss="ce", init_seed=1, head_seed=4,
                radius=1.0):
    """Build a scale-invariant network with the papers' initialisation order (docs/theory.md §1).

    seed `init_seed` → model with PyTorch default init → seed `head_seed` → fresh Linear head
    (weight rescaled to Frobenius norm 10 for 'ce' / 1.5 for 'mse', bias as is, frozen) →
    θ rescaled globally to |θ| = radius. The global torch RNG state is restored afterwards.
    The model is built on the CPU in float32; move it with `.to(device)`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {sorted(MODELS)}")
    if loss not in HEAD_NORMS:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {sorted(HEAD_NORMS)}")
    for key, val in [("width", width), ("num_classes", num_classes), ("in_channels", in_channels)]:
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = MODELS[name](width, num_classes, in_channels)
        torch.manual_seed(head_seed)
        old = model.head
        head = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    with torch.no_grad():
        head.weight.mul_(HEAD_NORMS[loss] / head.weight.norm())
        model.head = head
        for p in head.parameters():
            p.requires_grad_(False)
        params = si_parameters(model)
        scale = radius / global_norm(torch.cat([p.reshape(-1) for p in params]))
        for p in params:
            p.mul_(scale)
    return model


def si_parameters(model):
    """The trainable (scale-invariant) parameters θ, in module registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def num_si_params(model):
    """D = number of trainable scale-invariant weights (docs/theory.md §1)."""
    return sum(p.numel() for p in si_parameters(model))


def flatten_si_parameters(model):
    """Make every SI parameter's `.data` a view into one flat tensor `theta`, and its `.grad` a view
    into one flat zero tensor `grad`; return (theta, grad).

    Autograd accumulates into an existing `.grad` in place, so after `grad.zero_()` and
    `loss.backward()` the flat `grad` holds ∇L. Do not call `model.zero_grad()` (it sets grads to
    None and breaks the views) and do not move the model afterwards: call this once the model is on
    its device and in its dtype. In-place edits of `theta` change the model.
    """
    params = si_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters to flatten")
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    grad = torch.zeros_like(theta)
    offset = 0
    for p in params:
        n = p.numel()
        p.data = theta[offset:offset + n].view_as(p)
        p.grad = grad[offset:offset + n].view_as(p)
        offset += n
    return theta, grad


def global_norm(theta):
    """|θ|, the Euclidean norm of a flat tensor (0-dim tensor)."""
    return torch.linalg.vector_norm(theta)


# -----------------------------------------------------------------------------
# bundles: K members as one model


def build_bundle(name, width, num_classes, members, in_channels=3):
    """K members as one model with grouped convolutions (docs/DESIGN.md "Bundled network runner").

    ``members``: one dict per member with ``loss``, ``init_seed``, ``head_seed``, ``radius``. Member k
    starts exactly where ``build_model`` would start it alone: its weights are block k of every conv,
    its BN statistics channels k·c … (k+1)·c − 1, its frozen head ``head.weight[k]``.
    """
    solos = [build_model(name, width, num_classes, in_channels, loss=m["loss"], init_seed=m["init_seed"],
                         head_seed=m["head_seed"], radius=m["radius"]) for m in members]
    model = MODELS[name](width, num_classes, in_channels, bundle=len(solos))
    with torch.no_grad():
        for p, blocks in zip(si_parameters(model), zip(*(si_parameters(s) for s in solos)), strict=True):
            p.copy_(torch.cat(blocks))
        model.head.weight.copy_(torch.stack([s.head.weight for s in solos]))
        if model.head.bias is not None:
            model.head.bias.copy_(torch.stack([s.head.bias for s in solos]).unsqueeze(1))
    return model


def bundle_skeleton(name, width, num_classes, K, in_channels=3):
    """A bundle of K members with placeholder weights, to be filled by ``load_state_dict`` (the global
    torch RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        return MODELS[name](width, num_classes, in_channels, bundle=K)


def select_members(state, K, keep):
    """The state_dict of a bundle of K members cut down to the members ``keep`` (indices, in order).

    Every tensor of a bundled model with a leading dimension stacks its members block by block along it
    (conv weights K·c_out, BN statistics K·c, frozen heads K); a 0-dim tensor (BN's
    ``num_batches_tracked``) is shared by all members and kept as it is."""
    out = {}
    for name, v in state.items():
        if v.dim() == 0:
            out[name] = v.clone()
            continue
        if v.shape[0] % K:
            raise ValueError(f"{name}: leading dimension {v.shape[0]} is not a multiple of K = {K}")
        blocks = v.reshape(K, v.shape[0] // K, *v.shape[1:])
        out[name] = blocks[list(keep)].reshape(-1, *v.shape[1:]).clone()
    return out


class FlatBundle:
    """The weights of a bundled model as ``theta`` (K, D), row k = member k's θ in ``build_model``'s
    flat order, and its gradient as ``grad`` (K, D).

    The conv weights of a bundle stack the members block by block, so they cannot be views of the
    rows. They are views of a second flat buffer instead (``flatten_si_parameters``), refilled from
    ``theta`` by one gather (``load``); after a backward, one gather brings the gradient back to
    ``grad`` (``store_grad``). Protocol updates act on ``theta``.
    """

    def __init__(self, model, K):
        self.flat, self.flat_grad = flatten_si_parameters(model)
        D = self.flat.numel() // K
        self.K, self.D = K, D
        to_flat, offset = [], 0
        for p in si_parameters(model):
            n = p.numel() // K                  # one member's share of this tensor
            rows = torch.arange(K).view(K, 1) * D + offset
            to_flat.append((rows + torch.arange(n)).reshape(-1))
            offset += n
        dev = self.flat.device
        self.to_flat = torch.cat(to_flat).to(dev)                 # flat[i] = theta.view(-1)[to_flat[i]]
        self.to_rows = torch.argsort(self.to_flat)                # theta.view(-1)[j] = flat[to_rows[j]]
        self.theta = self.flat[self.to_rows].view(K, D).clone()
        self.grad = torch.zeros_like(self.theta)

    def load(self):
        """Copy ``theta`` into the model's weights."""
        torch.index_select(self.theta.view(-1), 0, self.to_flat, out=self.flat)

    def store_grad(self):
        """Copy the model's gradient into ``grad``."""
        torch.index_select(self.flat_grad, 0, self.to_rows, out=self.grad.view(-1))
