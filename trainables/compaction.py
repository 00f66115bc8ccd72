"""Parked members leave a bundle's vectorised batch (docs/DESIGN.md "Compaction").

A bundled ``NetworkRunner`` parks a member that stops or diverges (learning rate masked to zero). Once
nothing is buffered on the device (the end of a log step, or right after the running flush that found
a divergence) and at least one member still runs, ``compact`` rebuilds the batch with the members
``keep`` only (original member indices, a subset of ``runner.active`` in its order): a bundle of K' < K
groups, into which every piece of per-member state moves row by row —

* the model: θ rows, BN running statistics (and the shared ``num_batches_tracked``), the frozen heads
  (``models.select_members``);
* the runner's rows: θ₀, η (masked), η of the members, λ, r0, the optimizer state, ``_bad``, the
  stochastic-entropy buffer;
* the generators: the same ``torch.Generator`` objects (so their states) for the seeds a kept member
  uses, in first-use order of the kept members; the others are dropped (members with equal seeds keep
  sharing minibatches).

Exactness: member k's loss, gradient, update and metrics depend on member k's weights, statistics,
head, optimizer row and its seed's generator only; each of these moves unchanged, and the generators
draw the same numbers in any order. So the kept members' trajectories stay those of the batch with
every member (up to the rounding of kernels that now see fewer groups; tests/test_compaction.py).
"""
from __future__ import annotations

import torch

from trainables.models import bundle_skeleton, select_members

COMPACT = True      # the default of NetworkRunner.compacts (False: parked members ride the batch to the end)


def distinct_seeds(cfgs: list[dict]) -> list[int]:
    """The members' minibatch seeds, each once, in order of first use (one generator each)."""
    return list(dict.fromkeys(int(c["seed"]) for c in cfgs))


def members_to_keep(runner) -> list[int] | None:
    """The members to keep when some batch member is parked and some still runs, else None."""
    running = [k for k in runner.active if runner.status[k] == "running"]
    if not runner.compacts or not running or len(running) == len(runner.active):
        return None
    return running


def rebuilt_model(model, cfg: dict, data, n: int, pos: list[int]):
    """A bundle of the members at batch rows ``pos`` of ``model`` (a bundle of n), same device and dtype."""
    ref = next(iter(model.state_dict().values()))
    new = bundle_skeleton(cfg["model"], cfg["width"], data.num_classes, len(pos), data.in_channels)
    new = new.to(device=ref.device, dtype=data.x_train.dtype)
    new.load_state_dict(select_members(model.state_dict(), n, pos))
    return new


def compact(runner, keep: list[int]) -> None:
    """Rebuild ``runner``'s batch with the members ``keep`` (original indices, a subset of
    ``runner.active``); nothing may be buffered (``runner._running`` empty)."""
    from trainables.network import _Bundle

    if runner._running:
        raise RuntimeError("compact: running rows are still buffered on the device; flush first")
    missing = [k for k in keep if k not in runner.active]
    if missing:
        raise ValueError(f"compact: members {missing} already left the batch (active {runner.active})")
    pos = [runner.active.index(k) for k in keep]
    cfgs = [runner.members[k] for k in keep]
    model = rebuilt_model(runner.model, runner.members[0], runner.data, len(runner.active), pos)
    net = _Bundle(cfgs, runner.data, runner.device, model=model)
    with torch.no_grad():
        net.theta.copy_(runner.rows[pos])
    _cut_rows(runner, pos)
    _cut_generators(runner, cfgs)
    runner.net, runner.model = net, net.model
    runner.theta, runner.grad = net.theta, net.grad
    runner.rows = net.theta
    runner.set_active(keep)


def _cut_rows(runner, pos: list[int]) -> None:
    idx = torch.tensor(pos, device=runner.device)
    runner.theta0 = runner.theta0[idx]
    runner.lr, runner.lr_members = runner.lr[idx], runner.lr_members[idx]
    runner.wd, runner.r0 = runner.wd[idx], runner.r0[idx]
    runner.opt_state = {k: v[idx] if v.dim() == 2 else v for k, v in runner.opt_state.items()}
    runner._bad = runner._bad[idx]
    if runner._stoch_buf is not None:
        runner._stoch_buf = runner._stoch_buf[:, idx].contiguous()


def _cut_generators(runner, cfgs: list[dict]) -> None:
    gens, metric_gens = dict(zip(runner.seeds, runner.gens)), dict(zip(runner.seeds, runner.metric_gens))
    runner.seeds = distinct_seeds(cfgs)
    runner.gens = [gens[s] for s in runner.seeds]
    runner.metric_gens = [metric_gens[s] for s in runner.seeds]
