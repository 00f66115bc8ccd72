"""The three training protocols of docs/theory.md §2, as in-place updates of the flat weight vector.

``theta`` and ``grad`` are tensors of shape ``(..., D)``: the network's flat SI weights ``(D,)`` or a
bundle of toy walkers ``(n, D)``. ``lr``, ``wd`` and ``radius`` are floats or tensors that broadcast
against ``(..., 1)``. Everything stays on the device; nothing here reads a value back to the host.
Each update returns the pre-projection radius ``r̃`` on the fixed sphere (a device tensor of shape
``(..., 1)``) and ``None`` otherwise. ``protocol(name)`` gives the ``Protocol`` object that owns the
rest of a protocol's meaning (what ``lr`` is, whether λ applies, its second grid axis); the toys and
the analysis ask it instead of comparing names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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


@dataclass(frozen=True)
class Protocol:
    """What a protocol means, in one place: its update and how the grid's ``lr`` and second axis read.

    ``lr_is_effective``: the grid's ``lr`` is η_eff and the gradient is multiplied by η = η_eff |θ|^p
    (p = 2 for SGD; ``step_lr``); otherwise ``lr`` is η itself. ``uses_wd``: λ enters the update (and
    a stationary radius exists, docs/theory.md §7). ``second_axis``: the member key of the grid's
    second axis (r0 on the sphere, λ otherwise). The labels are the ones figures put on the axes.
    """
    name: str
    update: Callable
    lr_is_effective: bool
    uses_wd: bool
    second_axis: str
    lr_symbol: str
    lr_label: str
    second_label: str

    def step_lr(self, lr, radius, power=2):
        """The η actually multiplying the gradient at |θ| = radius (``power``: p of η_eff |θ|^p)."""
        return lr * radius ** power if self.lr_is_effective else lr


_ETA_EFF = r"effective learning rate $\eta_\mathrm{eff}$"
_R0, _WD = r"initial radius $r_0$", r"weight decay $\lambda$"
FIXED_SPHERE = Protocol("fixed_sphere", fixed_sphere, lr_is_effective=True, uses_wd=False,
                        second_axis="radius", lr_symbol="η_eff", lr_label=_ETA_EFF, second_label=_R0)
FIXED_ELR = Protocol("fixed_elr", fixed_elr, lr_is_effective=True, uses_wd=True, second_axis="wd",
                     lr_symbol="η_eff", lr_label=_ETA_EFF, second_label=_WD)
FIXED_LR = Protocol("fixed_lr", fixed_lr, lr_is_effective=False, uses_wd=True, second_axis="wd",
                    lr_symbol="η", lr_label=r"learning rate $\eta$", second_label=_WD)
BY_NAME = {p.name: p for p in (FIXED_SPHERE, FIXED_ELR, FIXED_LR)}
PROTOCOLS = tuple(BY_NAME)


def protocol(name: str) -> Protocol:
    """The Protocol object of a name (ValueError naming the choices for an unknown one)."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}") from None


def get(name: str):
    """The update function of a protocol by name."""
    return protocol(name).update


def step_lr(name: str, lr: float, radius: float) -> float:
    """The η actually multiplying the gradient at |θ| = radius (for the stochastic-entropy displacements)."""
    return protocol(name).step_lr(lr, radius)
