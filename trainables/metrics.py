"""Log-step measurements of a network (docs/theory.md §3).

Everything is computed on the trial's device into 0-dim tensors; the caller moves them to the host
once per log step. Gradients land in the flat ``grad`` buffer that the model's SI parameters view
(see ``models.flatten_si_parameters``), so a gradient is one ``backward`` away and never copied
parameter by parameter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.data import sample_batch_indices

CHUNK = 1024


def loss_sum(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Summed loss over a batch: cross-entropy, or the squared error to one-hot targets summed over
    classes (docs/theory.md §3, the papers' convention: the MSE head norm 1.5 was chosen for it; its batch
    mean is ``nn.MSELoss`` times the number of classes)."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    onehot = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return ((logits - onehot) ** 2).sum()


def batch_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    return loss_sum(logits, y, loss) / y.shape[0]


# ---- bundles: logits (K, B, C) of K members; targets per member (K, B) or shared by all (B,) ----

def _per_member(fn, logits, y, loss):
    return torch.func.vmap(fn, in_dims=(0, 0 if y.dim() == 2 else None, None))(logits, y, loss)


def member_loss_sums(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``loss_sum`` of every member of a bundle, (K,)."""
    return _per_member(loss_sum, logits, y, loss)


def member_batch_losses(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``batch_loss`` of every member of a bundle, (K,)."""
    return _per_member(batch_loss, logits, y, loss)


def _sums(out, y, loss):
    """Summed loss and correct count of a chunk: 0-dim for one model, (K,) for a bundle's (K, n, C)."""
    total = loss_sum(out, y, loss) if out.dim() == 2 else member_loss_sums(out, y, loss)
    return total, (out.detach().argmax(-1) == y).sum(-1)


def full_gradient(model, x, y, grad: torch.Tensor, loss: str, chunk: int = CHUNK):
    """Train loss, train accuracy and the full gradient ḡ (left in ``grad``) over the whole set.

    Train-mode BN with statistics per chunk of 1024; the summed chunk losses are backpropagated and
    divided by the set size (§3). For a bundled model (logits (K, n, C)) the values are (K,) and the
    backward of the summed member losses leaves every member's ḡ in its own weights.
    """
    model.train()
    grad.zero_()
    total = correct = 0
    n = x.shape[0]
    for start in range(0, n, chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        l, c = _sums(model(xb), yb, loss)
        (l if l.dim() == 0 else l.sum()).backward()
        total = total + l.detach().double()
        correct = correct + c.double()
    grad.div_(n)
    return total / n, correct / n


@torch.no_grad()
def evaluate(model, x, y, loss: str, chunk: int = CHUNK, train_mode: bool = False):
    """Loss and accuracy without gradients ((K,) for a bundled model): eval-mode BN (test metrics), or
    with ``train_mode`` the train-mode BN of ``full_gradient`` (statistics per chunk; the loss SGD
    optimises)."""
    model.train(train_mode)
    total = correct = 0
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        l, c = _sums(model(xb), yb, loss)
        total = total + l.double()
        correct = correct + c.double()
    model.train()
    return total / x.shape[0], correct / x.shape[0]


def gradient_noise_stats(gbar: torch.Tensor, grads) -> dict[str, torch.Tensor]:
    """SNR statistics of §3 from ḡ and an iterable of stochastic gradients g_1..g_M (flat tensors (D,),
    or (K, D) for a bundle: one statistic per row).

    Only running sums are kept, so M gradients never sit in memory together.
    """
    s_sq = s_abs = s_norm = None
    m = 0
    for g in grads:
        d = torch.linalg.vector_norm((g - gbar).double(), dim=-1)
        gn = torch.linalg.vector_norm(g.double(), dim=-1)
        s_sq = d * d if s_sq is None else s_sq + d * d
        s_abs = d if s_abs is None else s_abs + d
        s_norm = gn if s_norm is None else s_norm + gn
        m += 1
    if m == 0:
        raise ValueError("need at least one stochastic gradient (num_stoch_grads ≥ 1)")
    full = torch.linalg.vector_norm(gbar.double(), dim=-1)
    rms = torch.sqrt(s_sq / m)
    mean_noise = s_abs / m
    return {
        "full_grad_norm": full,
        "stoch_grad_rms": rms,
        "noise_mean_norm": mean_noise,
        "stoch_grad_mean_norm": s_norm / m,
        "snr": full / rms,
        "snr_mean": full / mean_noise,
    }


def stochastic_gradients(model, x, y, grad: torch.Tensor, loss: str, M: int, batch_size: int,
                         generator: torch.Generator):
    """Yield M fresh minibatch gradients at the current θ without stepping (train-mode BN).

    The yielded tensor is the shared ``grad`` buffer: consume it before asking for the next one.
    """
    model.train()
    n = x.shape[0]
    for _ in range(M):
        idx = sample_batch_indices(n, batch_size, generator)
        grad.zero_()
        batch_loss(model(x[idx]), y[idx], loss).backward()
        yield grad


def variance_terms(stats: dict, radius, D: int) -> dict:
    """tr Σ, G² and σ² rescaled to the unit sphere (§3): tr Σ = rms²·r², G² = |ḡ|²·r², σ² = tr Σ/(D−1).

    Works on device tensors and on the host floats of a log row alike."""
    r2 = (radius.double() if torch.is_tensor(radius) else float(radius)) ** 2
    trace = stats["stoch_grad_rms"] ** 2 * r2
    return {"trace_sigma": trace, "grad_sq": stats["full_grad_norm"] ** 2 * r2, "sigma2": trace / (D - 1)}
