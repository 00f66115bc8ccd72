"""Gradient statistics and the gradient phase diagram (docs/theory.md §3 and §6).

Pure numpy reference implementations; the trainers compute the same statistics on the
device, and tests/analysis use these to check them.
"""

from __future__ import annotations

import numpy as np

from analysis.free_energy import power_law_fit


def snr_stats_from_gradients(G, gbar):
    """Gradient statistics at one log step (docs/theory.md §3).

    G: (M, D) stochastic gradients g_1..g_M; gbar: (D,) full gradient ḡ. Returns a dict
    with full_grad_norm = |ḡ|, stoch_grad_rms = sqrt(mean |g_i − ḡ|²),
    noise_mean_norm = mean |g_i − ḡ|, stoch_grad_mean_norm = mean |g_i|,
    snr = |ḡ| / stoch_grad_rms and snr_mean = |ḡ| / noise_mean_norm
    (inf when the noise is zero and ḡ is not, NaN when both are zero).
    """
    G = np.asarray(G, dtype=np.float64)
    gbar = np.asarray(gbar, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] < 1:
        raise ValueError(f"G must be (M, D) with M >= 1 stochastic gradients, got shape {G.shape}")
    if gbar.shape != (G.shape[1],):
        raise ValueError(f"gbar must have shape ({G.shape[1]},) to match G, got {gbar.shape}")
    full = float(np.linalg.norm(gbar))
    noise = np.linalg.norm(G - gbar[None, :], axis=1)
    rms = float(np.sqrt(np.mean(noise**2)))
    mean_noise = float(np.mean(noise))
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = float(np.float64(full) / rms)
        snr_mean = float(np.float64(full) / mean_noise)
    return {
        "full_grad_norm": full,
        "stoch_grad_rms": rms,
        "noise_mean_norm": mean_noise,
        "stoch_grad_mean_norm": float(np.mean(np.linalg.norm(G, axis=1))),
        "snr": snr,
        "snr_mean": snr_mean,
    }


def gradient_phase_exponent(full_norms, stoch_mean_norms, iterations, min_iteration, max_iteration=np.inf):
    """Fit ln(stoch_grad_mean_norm) = a · ln(full_grad_norm) + b (docs/theory.md §6).

    Only log steps with ``min_iteration`` ≤ iteration ≤ ``max_iteration`` enter the fit (the ResNet
    analysis used 1e4 ≤ t ≤ 4e5); non-finite or
    non-positive norms are ignored. Returns (a, b) with b the intercept in natural log
    (so stoch ≈ e^b · full^a). a = 1 is the ideal interpolation regime.
    """
    full = np.asarray(full_norms, dtype=np.float64)
    stoch = np.asarray(stoch_mean_norms, dtype=np.float64)
    its = np.asarray(iterations, dtype=np.float64)
    if not (full.shape == stoch.shape == its.shape) or full.ndim != 1:
        raise ValueError("full_norms, stoch_mean_norms and iterations must be 1-D of equal length")
    keep = (its >= min_iteration) & (its <= max_iteration)
    if keep.sum() < 2:
        raise ValueError(f"only {int(keep.sum())} log steps with {min_iteration:g} ≤ iteration ≤ {max_iteration:g}; "
                         "widen the window: lower min_iteration (see default_phase_threshold) or raise max_iteration")
    a, prefactor = power_law_fit(full[keep], stoch[keep])
    return a, float(np.log(prefactor))


def default_phase_threshold(num_iters, paper_iters=1_600_000, paper_threshold=200_000):
    """Phase-diagram start iteration scaled to a shorter run (docs/theory.md §6).

    The paper fits iterations ≥ 2·10⁵ of 1.6M; keep the same fraction of ``num_iters``.
    """
    if num_iters <= 0 or paper_iters <= 0 or paper_threshold < 0:
        raise ValueError("num_iters and paper_iters must be > 0 and paper_threshold >= 0")
    return int(round(num_iters * paper_threshold / paper_iters))
