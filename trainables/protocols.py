"""The three training protocols of docs/theory.md §2, as in-place updates of the flat weight vector.

``theta`` and ``grad`` are tensors of shape ``(..., D)``: the network's flat SI weights ``(D,)`` or a
bundle of toy walkers ``(n, D)``. ``lr``, ``wd`` and ``radius`` are floats or tensors that broadcast
against ``(..., 1)``. Everything stays on the device; nothing here reads a value back to the host.
Each update returns the pre-projection radius ``r̃`` on the fixed sphere (a device tensor of shape
``(..., 1)``) and ``None`` otherwise.
"""
from __future__ import annotations

import torch

PROTOCOLS = ("fixed_sphere", "fixed_elr", "fixed_lr")


def norm(theta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(theta, dim=-1, keepdim=True)


def project(theta: torch.Tensor, radius) -> torch.Tensor:
    """θ ← r0 · θ/|θ| in place; returns |θ| before the projection."""
    r = norm(theta)
    theta.mul_(radius / r)
    return r


def fixed_sphere(theta, grad, lr, wd, radius):
    """θ ← θ − η g with η = η_eff · r0², then θ ← r0 θ/|θ| (§2.1). ``lr`` is η_eff; ``wd`` unused."""
    theta.sub_(grad * (lr * radius ** 2))
    return project(theta, radius)


def fixed_elr(theta, grad, lr, wd, radius):
    """θ ← θ − η_eff |θ|² (g + λ θ), |θ| taken before the step (§2.2)."""
    r2 = (theta * theta).sum(dim=-1, keepdim=True)
    theta.sub_((grad + wd * theta) * (lr * r2))
    return None


def fixed_lr(theta, grad, lr, wd, radius):
    """θ ← θ − η (g + λ θ): plain SGD with weight decay (§2.3)."""
    theta.sub_((grad + wd * theta) * lr)
    return None


def get(name: str):
    """The update function of a protocol by name."""
    try:
        return {"fixed_sphere": fixed_sphere, "fixed_elr": fixed_elr, "fixed_lr": fixed_lr}[name]
    except KeyError:
        raise ValueError(f"unknown protocol '{name}'; choose one of {', '.join(PROTOCOLS)}") from None


def step_lr(protocol: str, lr: float, radius: float) -> float:
    """The η actually multiplying the gradient at |θ| = radius (for the stochastic-entropy displacements)."""
    return lr * radius ** 2 if protocol in ("fixed_sphere", "fixed_elr") else lr
