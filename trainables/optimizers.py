"""SGD, heavy-ball momentum and Adam under the three protocols of docs/theory.md §2 (issue #12; §10).

A member chooses its optimizer with the keys of ``OPTIMIZER_DEFAULTS``:

    optimizer: sgd | momentum | adam      (default sgd: exactly trainables.protocols)
    momentum:  β        (momentum only, 0 ≤ β < 1; default 0.9)
    beta1, beta2        (adam only, 0 ≤ β < 1; defaults 0.9, 0.999)
    adam_eps            (adam only, > 0; default 1e-8; named so as not to be confused with §5's ε)

Everything works on a flat θ of shape (D,) or a bundle (K, D), in place, on the device and without
host synchronisation; ``lr``, ``wd`` and ``radius`` are floats or tensors broadcasting against
(..., 1), as in trainables.protocols. The optimizer state is a dict of tensors (``init_state``), which
is also its checkpoint form (``state_dict`` / ``load_state_dict``).

The update, with d the descent direction and p the step's power of the radius (docs/theory.md §10):
- sgd: the protocol update of trainables.protocols, unchanged.
- momentum (heavy ball, torch.optim.SGD's convention, no dampening): buf ← β buf + d, step along buf.
  fixed_lr: d = g + λθ (coupled WD), θ ← θ − η buf — torch.optim.SGD(momentum=β, weight_decay=λ).
  fixed_elr: d = g + λθ, θ ← θ − η_eff |θ|² buf (|θ| before the step), as plain fixed ELR.
  fixed_sphere: d = g, θ ← θ − η_eff r0² buf, θ ← r0 θ/|θ|, then buf ← buf − ⟨buf, θ̂⟩ θ̂: the buffer
  is projected onto the tangent space at the new θ, so that it never carries a radial component
  that the next projection would only undo (and that would inflate r̃, the pre-projection radius
  the effective pressure of §7 is measured from).
- adam (m, v, bias corrections as torch.optim.Adam; u = m̂/(√v̂ + eps)), moments of g only, with
  decoupled (AdamW-style) weight decay: the WD term is the protocol's own, η λ θ (fixed_lr) or
  η_eff |θ|² λ θ (fixed_elr), outside the preconditioner. Why decoupled: coupled WD would be divided
  by √v̂ coordinate by coordinate, so the pressure p = λ of §7 would no longer be λ; decoupled, the
  radial force is exactly plain SGD's and only the gradient step changes.
  fixed_lr: θ ← θ − η (u + λθ) — torch.optim.AdamW(weight_decay=λ); Adam itself for λ = 0.
  fixed_elr: θ ← θ − η_eff (|θ| u + |θ|² λ θ).
  fixed_sphere: θ ← θ − η_eff r0 u, project, and m projected onto the tangent space like buf.
  Adam's u does not shrink as 1/|θ| the way a gradient of a scale-invariant net does (it is
  invariant to the gradient's scale), so the step that keeps the angular step η_eff·u independent
  of the radius carries |θ| (p = 1), not |θ|² (p = 2) as for sgd and momentum.
"""
from __future__ import annotations

import torch

from trainables import protocols
from trainables.protocols import PROTOCOLS, norm, project

OPTIMIZERS = ("sgd", "momentum", "adam")
OPTIMIZER_DEFAULTS: dict = {"optimizer": "sgd", "momentum": 0.9, "beta1": 0.9, "beta2": 0.999,
                            "adam_eps": 1e-8}
_OWN_KEYS = {"sgd": (), "momentum": ("momentum",), "adam": ("beta1", "beta2", "adam_eps")}


# -----------------------------------------------------------------------------
# configuration

def optimizer_config(cfg: dict) -> dict:
    """The optimizer settings of a member config (missing keys take OPTIMIZER_DEFAULTS), checked.

    A key set to None counts as unset (so MEMBER_DEFAULTS may list them all as None). Keys of another
    optimizer (``momentum`` on an adam member) are checked but do not act: a grid with
    ``optimizer: [sgd, momentum, adam]`` on an axis sets them for every member (``ignored_keys``
    names them, for a warning). Raises ValueError naming the bad key and the fix: an unknown
    optimizer, a β outside [0, 1) or a non-positive adam_eps."""
    out = {k: v if cfg.get(k) is None else cfg[k] for k, v in OPTIMIZER_DEFAULTS.items()}
    name = out["optimizer"]
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
    for k in ("momentum", "beta1", "beta2"):
        v = out[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
            raise ValueError(f"{k} = {v!r}: must be a number with 0 ≤ {k} < 1")
    eps = out["adam_eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"adam_eps = {eps!r}: must be a number > 0 (e.g. 1e-8)")
    return out


def ignored_keys(cfg: dict) -> list:
    """Optimizer keys set (not None) in ``cfg`` that its optimizer does not use."""
    name = cfg.get("optimizer") or "sgd"
    return [k for k in ("momentum", "beta1", "beta2", "adam_eps")
            if cfg.get(k) is not None and k not in _OWN_KEYS.get(name, ())]


def init_state(opt: dict, theta: torch.Tensor) -> dict:
    """Zero state on θ's device and dtype: {} for sgd; ``buf`` for momentum; ``m``, ``v`` and the
    step count ``step`` (a 0-d tensor, so that bias corrections need no host value) for adam."""
    name = opt["optimizer"]
    if name == "momentum":
        return {"buf": torch.zeros_like(theta)}
    if name == "adam":
        return {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta),
                "step": torch.zeros((), dtype=theta.dtype, device=theta.device)}
    return {}


def state_dict(state: dict) -> dict:
    """A detached copy of the state, for a checkpoint (torch.save; load with weights_only=True)."""
    return {k: v.detach().clone() for k, v in state.items()}


def load_state_dict(state: dict, saved: dict) -> None:
    """Copy a checkpoint's tensors into ``state`` in place (same keys and shapes, any device)."""
    if set(saved) != set(state):
        raise ValueError(f"optimizer checkpoint has keys {sorted(saved)}, expected {sorted(state)}: "
                         "it was written by another optimizer setting; resume with the same grid")
    for k, v in saved.items():
        if v.shape != state[k].shape:
            raise ValueError(f"optimizer checkpoint {k!r} has shape {tuple(v.shape)}, expected "
                             f"{tuple(state[k].shape)}")
        state[k].copy_(v)


# -----------------------------------------------------------------------------
# the step

def radius_power(name: str) -> int:
    """p in the step η_eff |θ|^p (fixed sphere, fixed ELR): 2 for sgd and momentum, 1 for adam."""
    return 1 if name == "adam" else 2


def step_lr(opt: dict, protocol: str, lr, radius):
    """The factor multiplying the optimizer's direction (g, buf or u) at |θ| = radius."""
    return protocols.protocol(protocol).step_lr(lr, radius, radius_power(opt["optimizer"]))


def _tangent(vec, theta):
    """vec ← vec − ⟨vec, θ̂⟩ θ̂ in place (θ̂ = θ/|θ| along the last axis)."""
    unit = theta / norm(theta)
    vec.sub_(unit * (vec * unit).sum(dim=-1, keepdim=True))


def step(opt: dict, protocol: str, theta, grad, state, lr, wd, radius):
    """One update of θ (and of ``state``) in place; returns r̃ (the pre-projection radius, a tensor
    of shape (..., 1)) on the fixed sphere and None otherwise, like trainables.protocols."""
    name = opt["optimizer"]
    if name == "sgd":
        return protocols.get(protocol)(theta, grad, lr, wd, radius)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}'; choose one of {', '.join(PROTOCOLS)}")
    sphere = protocol == "fixed_sphere"
    r2 = None if protocol != "fixed_elr" else (theta * theta).sum(dim=-1, keepdim=True)
    if name == "momentum":
        buf = state["buf"]
        buf.mul_(opt["momentum"]).add_(grad if sphere else grad + wd * theta)
        theta.sub_(buf * (lr * r2 if r2 is not None else lr * radius ** 2 if sphere else lr))
        moment = buf
    else:
        moment = state["m"]
        u = _adam_direction(opt, state, grad)
        if protocol == "fixed_lr":
            theta.sub_((u + wd * theta) * lr)
        elif protocol == "fixed_elr":
            theta.sub_((u * torch.sqrt(r2) + wd * r2 * theta) * lr)
        else:
            theta.sub_(u * (lr * radius))
    if not sphere:
        return None
    r_tilde = project(theta, radius)
    _tangent(moment, theta)
    return r_tilde


def _adam_direction(opt, state, grad):
    """Update m, v and the step count in place; return u = m̂/(√v̂ + eps) (torch.optim.Adam's form)."""
    b1, b2 = opt["beta1"], opt["beta2"]
    state["step"].add_(1)
    state["m"].mul_(b1).add_(grad, alpha=1 - b1)
    state["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bc1 = 1 - torch.pow(b1, state["step"])
    bc2 = 1 - torch.pow(b2, state["step"])
    return (state["m"] / bc1) / (torch.sqrt(state["v"] / bc2) + opt["adam_eps"])


def momentum_lr_factor(opt: dict) -> float:
    """1/(1 − β) for momentum (its long-time step per unit gradient), 1 otherwise (docs/theory.md §10)."""
    return 1.0 / (1.0 - opt["momentum"]) if opt["optimizer"] == "momentum" else 1.0


__all__ = ["OPTIMIZERS", "OPTIMIZER_DEFAULTS", "optimizer_config", "ignored_keys", "init_state", "state_dict",
           "load_state_dict", "step", "step_lr", "radius_power", "momentum_lr_factor"]
