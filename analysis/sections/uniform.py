"""θ uniform on the unit sphere (docs/theory.md §4): the entropy and loss asymptotes of large LRs that the
free-energy section draws. A helper module of the sections package (no SECTIONS)."""

from __future__ import annotations

import torch

_UNIFORM_CACHE: dict = {}


def knn_window(entropy_param):
    """The window N of the member's knn entropy spec (1000 when it has none)."""
    specs = entropy_param if isinstance(entropy_param, list) else []
    for s in specs:
        if isinstance(s, dict) and s.get("name") == "knn":
            return int(s.get("window", 1000))
    return 1000


def uniform_entropy(D, n, k):
    """k-NN entropy of n uniform directions on the unit sphere in R^D (docs/theory.md §4, cached)."""
    key = (int(D), int(n), int(k))
    if key not in _UNIFORM_CACHE:
        from trainables.entropy import uniform_sphere_reference
        _UNIFORM_CACHE[key] = uniform_sphere_reference(int(D), n=int(n), ks=[int(k)])[
            f"entropy_knn_k{min(int(k), int(n) - 1)}"]
    return _UNIFORM_CACHE[key]


def uniform_loss(member: dict, n: int, D: int, device="auto"):
    """Expected train loss of the member's network for θ uniform on the unit sphere (docs/theory.md §4
    "uniform reference"): n directions, each loaded into the model, train loss over the training
    (sub)set in train-mode BN chunks of 1024, on the device (cuda if available). Cached per setup.
    Raises ValueError when the model cannot be rebuilt (a toy, or D ≠ the member's D)."""
    from trainables.defaults import resolve_device
    from trainables.entropy import uniform_sphere_reference
    from trainables.models import MODELS

    keys = ("model", "width", "dataset", "samples_per_label", "loss", "init_seed", "head_seed", "data_seed",
            "data_dir")
    cfg = {k: member.get(k) for k in keys}
    if cfg["model"] not in MODELS:
        raise ValueError(f"model {cfg['model']!r} is not a network")
    cache_key = ("loss", int(n), repr(sorted(cfg.items())))
    if cache_key not in _UNIFORM_CACHE:
        dev = resolve_device(device)
        theta, loss_fn = _network_loss(cfg, dev, D)
        _UNIFORM_CACHE[cache_key] = uniform_sphere_reference(int(D), n=int(n), ks=[1], loss_fn=loss_fn,
                                                             device=dev)["train_loss"]
    return _UNIFORM_CACHE[cache_key]


def _network_loss(cfg, dev, D):
    """(θ, loss_fn): the member's network rebuilt on ``dev`` and a function giving the train loss of
    each row of directions loaded into θ."""
    from trainables.data import load_dataset
    from trainables.metrics import evaluate
    from trainables.models import build_model, flatten_si_parameters

    spl = cfg["samples_per_label"]
    data = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"], download=False, device=dev,
                        samples_per_label=None if spl is None or spl != spl else int(spl),
                        data_seed=int(cfg["data_seed"] or 1))
    model = build_model(cfg["model"], int(cfg["width"]), data.num_classes, in_channels=data.in_channels,
                        loss=cfg["loss"] or "ce", init_seed=int(cfg["init_seed"] or 1),
                        head_seed=int(cfg["head_seed"] or 4)).to(dev)
    theta, _ = flatten_si_parameters(model)
    if theta.numel() != int(D):
        raise ValueError(f"the rebuilt model has D = {theta.numel()}, the members logged D = {int(D)}")

    def loss_fn(rows):
        out = torch.empty(rows.shape[0], dtype=torch.float64)
        for i, row in enumerate(rows):
            theta.copy_(row)
            out[i] = evaluate(model, data.x_train, data.y_train, cfg["loss"] or "ce", train_mode=True)[0]
        return out
    return theta, loss_fn


def uniform_asymptotes(g, label, K, opts, res):
    """(S, U) of θ uniform on the unit sphere (docs/theory.md §4), the asymptotes of large LRs; None where
    unavailable (a note says why). S from n = the k-NN window N samples (or --uniform-n), U from
    the member's model over its training set (skipped with --no-uniform-loss)."""
    D = g["D"].dropna().unique() if "D" in g else []
    if len(D) != 1:
        res.notes.append(f"group {label}: no single D param; uniform reference skipped")
        return None, None
    S_uni = U_uni = None
    N = knn_window(g["entropy"].iloc[0]) if "entropy" in g else 1000
    n = opts.uniform_n or N
    try:
        S_uni = uniform_entropy(D[0], n, K)
        note = "" if n == N else f" (≠ window N = {N}: not on the same scale)"
        res.notes.append(f"group {label}: uniform reference S = {S_uni:.6g} from n = {n} samples{note}")
    except Exception as e:  # noqa: BLE001 - a missing reference must not stop the section
        res.notes.append(f"group {label}: uniform reference S failed: {e}")
    if opts.uniform_loss:
        try:
            U_uni = uniform_loss(g.iloc[0].to_dict(), opts.uniform_loss_n, D[0])
            res.notes.append(f"group {label}: uniform reference U = {U_uni:.6g} (train loss, "
                             f"{opts.uniform_loss_n} uniform directions)")
        except Exception as e:  # noqa: BLE001
            res.notes.append(f"group {label}: uniform reference U skipped: {e}")
    return S_uni, U_uni
