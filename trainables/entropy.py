"""Entropy estimators for windows of weight snapshots (docs/theory.md §4, §8).

A *window* is an (N, D) tensor: N snapshots of the D trainable weights, on any device and in any
float dtype. Everything is computed in float64 on the window's device; results are Python floats.

Large windows (N = 4000, D ~ 5e4) are processed in blocks of feature columns so that the only big
float64 buffers are one (N, chunk) block and the (N, N) Gram matrix.

- `pairwise_sq_distances`  : accurate |θ_i − θ_j|² (translation removed before the Gram trick)
- `knn_graph_entropy`      : §4a, the free-energy paper's k-NN graph estimator
- `hyperspherical_angles`  : §4b, angle coordinates of each snapshot
- `kl_sphere_entropy`      : §4b, Kozachenko–Leonenko on the sphere (+ §8 standardised variant)
- `window_radius`          : mean |θ| over the window
- `uniform_sphere_reference`: §4 "uniform reference" (loss and k-NN entropy of uniform directions)
"""
import math
import operator

import numpy as np
import torch


DEFAULT_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)   # k of the k-NN estimator unless a spec says
EULER_GAMMA = 0.5772156649015329
_BLOCK_ELEMENTS = 2 ** 25  # float64 elements per column block (256 MB)


# -----------------------------------------------------------------------------
# helpers

def _check_window(window, name="window", min_rows=2, min_cols=1):
    # besides a tensor, any object read only through .shape, .device, .dim(), .is_floating_point() and
    # column slices window[:, a:b] / window[:, j] (e.g. engine.reservoir.ChunkedWindow) is accepted
    if not (isinstance(window, torch.Tensor) or getattr(window, "column_sliced", False)):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, D); got {type(window).__name__}")
    if window.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N snapshots, D weights); got shape {tuple(window.shape)}. "
                         "Stack the snapshots with torch.stack first.")
    if not window.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got {window.dtype}. Convert with .float().")
    n, d = window.shape
    if n < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} snapshots; got N={n}. Use a longer window.")
    if d < min_cols:
        raise ValueError(f"{name} needs at least {min_cols} weights per snapshot; got D={d}.")


def _column_chunk(n, chunk=None):
    """Number of feature columns per block so that an (n, chunk) float64 block stays ~256 MB."""
    if chunk is not None:
        return max(1, int(chunk))
    return max(1, _BLOCK_ELEMENTS // max(n, 1))


def _centered_blocks(window, chunk=None):
    """Yield float64 column blocks of the window with each column's mean removed.

    Subtracting the same vector from every snapshot leaves all distances unchanged, but it turns
    nearly identical snapshots into small vectors, so the Gram trick no longer cancels catastrophically.
    (We use the window mean rather than one snapshot: it is the smallest such shift.)
    """
    n, d = window.shape
    c = _column_chunk(n, chunk)
    for a in range(0, d, c):
        x = window[:, a:a + c].to(torch.float64)
        yield x - x.mean(dim=0, keepdim=True)


def _sq_distances_from_blocks(blocks, n, device):
    """Accumulate |x_i − x_j|² over column blocks: |x_i|² + |x_j|² − 2 x_i·x_j in float64."""
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for x in blocks:
        gram.addmm_(x, x.T)
    sq = gram.diagonal().clone()
    d2 = sq[:, None] + sq[None, :] - 2.0 * gram
    d2.clamp_(min=0.0)
    d2.fill_diagonal_(0.0)
    return d2


def _row_sq_norms(window, chunk=None):
    n, d = window.shape
    c = _column_chunk(n, chunk)
    out = torch.zeros(n, dtype=torch.float64, device=window.device)
    for a in range(0, d, c):
        out += window[:, a:a + c].to(torch.float64).square().sum(dim=1)
    return out


# -----------------------------------------------------------------------------
# distances and the k-NN graph estimator (§4a)

def pairwise_sq_distances(window, chunk=None):
    """Squared Euclidean distances d_ij² between the rows of an (N, D) window, float64 (N, N).

    docs/theory.md §4a "Numerics": the window is centred before the Gram trick and accumulated in float64,
    in blocks of `chunk` feature columns (default: ~256 MB per block) to bound memory.
    """
    _check_window(window, min_rows=1)
    return _sq_distances_from_blocks(_centered_blocks(window, chunk), window.shape[0], window.device)


def _clean_ks(ks, n):
    if isinstance(ks, int):
        ks = (ks,)
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty; pass e.g. trainables.entropy.DEFAULT_KS")
    clean = set()
    for k in ks:
        try:
            k_int = operator.index(k)  # accepts int and numpy integers, rejects floats
        except TypeError:
            k_int = 0
        if isinstance(k, bool) or k_int < 1:
            raise ValueError(f"every k in ks must be a positive int; got {k!r}")
        clean.add(min(k_int, n - 1))
    return sorted(clean)


def knn_graph_entropy(window, ks=DEFAULT_KS, intrinsic_dim=None, chunk=None):
    """k-NN graph entropy Ŝ_k = d_e · log L_k − (d_e − 1) · log N for each k (docs/theory.md §4a).

    L_k = Σ_i Σ_{j ∈ kNN(i)} |θ_i − θ_j| over each snapshot's k nearest *other* snapshots;
    d_e = intrinsic_dim, default D − 1 (the sphere). ks above N − 1 are clipped to N − 1 and
    duplicates removed. Returns {k: Ŝ_k}. Identical snapshots give L_k = 0 and Ŝ_k = −inf.
    """
    _check_window(window)
    n, d = window.shape
    d_e = float(d - 1 if intrinsic_dim is None else intrinsic_dim)
    if not d_e > 0:
        raise ValueError(f"intrinsic dimension must be positive; got {d_e} (D={d}). "
                         "Pass intrinsic_dim explicitly for D = 1.")
    return _knn_entropy_from_sq_distances(pairwise_sq_distances(window, chunk), ks, d_e)


def _knn_entropy_from_sq_distances(d2, ks, d_e):
    """§4a's Ŝ_k from an (N, N) matrix of squared distances (overwritten)."""
    n = d2.shape[0]
    ks = _clean_ks(ks, n)
    d2.fill_diagonal_(float("inf"))  # exclude the point itself
    nearest = torch.topk(d2, ks[-1], dim=1, largest=False, sorted=True).values  # (N, kmax)
    del d2
    per_k = nearest.sqrt().sum(dim=0).cumsum(dim=0)  # per_k[k-1] = L_k
    out = {}
    for k in ks:
        L = per_k[k - 1].item()
        log_L = math.log(L) if L > 0 else float("-inf")
        out[k] = d_e * log_L - (d_e - 1.0) * math.log(n)
    return out


# -----------------------------------------------------------------------------
# Kozachenko–Leonenko on the sphere (§4b, §8)

def _tail_sq(x64):
    """tail[:, i] = Σ_{j > i} x_j² (0-based), by a reverse cumulative sum in float64."""
    rev = x64.flip(1).square().cumsum(dim=1).flip(1)  # rev[:, i] = Σ_{j ≥ i} x_j²
    return torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], dim=1)


def _angle_blocks(window, chunk=None):
    """Yield (angles, log_jacobian) per column block of the D − 1 hyperspherical angles.

    angles: float64 (N, c) block of φ; log_jacobian: (N,) partial sum of (D − 1 − i) log sin φ_i
    over the block's i ≤ D − 2 (1-based i). Tail norms beyond the block come from one first pass.
    """
    n, d = window.shape
    c = _column_chunk(n, chunk)
    starts = list(range(0, d - 1, c))  # angle blocks over angle indices 0..D-2 (0-based)
    # first pass: Σ x_j² for j ≥ end of each block (suffix over blocks)
    block_sums = [window[:, a:min(a + c, d - 1)].to(torch.float64).square().sum(dim=1) for a in starts]
    beyond = window[:, d - 1].to(torch.float64).square()  # last coordinate, after every angle block
    suffix = [None] * len(starts)
    for b in reversed(range(len(starts))):
        suffix[b] = beyond
        beyond = beyond + block_sums[b]
    for b, a in enumerate(starts):
        e = min(a + c, d - 1)
        x = window[:, a:e + 1].to(torch.float64)  # one extra column: x_{e} is needed for the last angle
        head = x[:, :-1]
        tail = _tail_sq(head) + suffix[b][:, None]  # |θ_{i+1:D}|² for each angle i in the block
        phi = torch.atan2(tail.sqrt(), head)
        # sin φ_i = |θ_{i+1:D}| / |θ_{i:D}|, computed from the norms (accurate near 0 and π)
        log_sin = 0.5 * (tail.log() - (tail + head.square()).log())
        i1 = torch.arange(a + 1, e + 1, device=window.device, dtype=torch.float64)  # 1-based angle index
        weight = (d - 1 - i1).clamp(min=0.0)  # zero for the last angle φ_{D-1}
        if e == d - 1:  # this block holds φ_{D-1} = atan2(θ_D, θ_{D-1})
            phi[:, -1] = torch.atan2(x[:, -1], x[:, -2])
            log_sin[:, -1] = 0.0
        yield phi, (log_sin * weight).sum(dim=1)


def hyperspherical_angles(window, chunk=None):
    """Hyperspherical angles of each snapshot, float64 (N, D − 1) (docs/theory.md §4b).

    φ_i = atan2(|θ_{i+1:D}|, θ_i) for i = 1..D−2 and φ_{D−1} = atan2(θ_D, θ_{D−1}); tail norms come
    from a reverse cumulative sum of squares in float64.
    """
    _check_window(window, min_rows=1, min_cols=2)
    return torch.cat([phi for phi, _ in _angle_blocks(window, chunk)], dim=1)


def window_radius(window, chunk=None):
    """Mean radius r̄ = mean_i |θ_i| of the window (docs/theory.md §4b)."""
    _check_window(window, min_rows=1)
    return _row_sq_norms(window, chunk).sqrt().mean().item()


SMALL_DIM = 16   # up to this many angles, nearest neighbours come from a k-d tree (toy models)


def _kl_constant(d: int, n: int) -> float:
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0) + math.log(n - 1) + EULER_GAMMA


def _kl_small_dim(window, standardize):
    """Same estimator as :func:`kl_sphere_entropy`, with a k-d tree for the nearest-neighbour search.

    For the toys (D = 3) a tree query costs about a millisecond where the all-pairs matrix costs tens.
    """
    from scipy.spatial import cKDTree

    n, D = window.shape
    d = D - 1
    phi, log_jac = next(_angle_blocks(window, chunk=D))
    phi = (phi - phi.mean(dim=0, keepdim=True)).cpu().numpy()
    log_std_sum = 0.0
    if standardize:
        std = phi.std(axis=0, ddof=1)
        std[std <= 0] = 1.0
        log_std_sum = float(np.log(std).sum())
        phi = phi / std
    dist, _ = cKDTree(phi).query(phi, k=2)
    rho = np.maximum(dist[:, 1], 1e-8)
    s_sphere = d * float(np.log(rho).mean()) + _kl_constant(d, n) + log_std_sum + log_jac.mean().item()
    s_full = s_sphere + d * math.log(window_radius(window))
    return s_sphere, s_full


def kl_sphere_entropy(window, standardize=False, chunk=None):
    """Kozachenko–Leonenko entropy on the sphere, returns (S_sphere, S_full) (docs/theory.md §4b).

    With d = D − 1 and ρ_i the distance from snapshot i's angle vector to its nearest other one
    (clipped at 1e-8):
      Ĥ = d·mean log ρ + (d/2) log π − log Γ(d/2 + 1) + log(N − 1) + γ_E,
      S_sphere = Ĥ + mean_snapshots Σ_{i=1}^{D−2} (D − 1 − i) log sin φ_i,
      S_full = S_sphere + (D − 1) log r̄.
    standardize=True is the toy variant of §8: each angle coordinate is divided by its standard
    deviation over the window before the nearest-neighbour search, and Σ log std_i is added back
    (coordinates with zero spread are left unscaled).
    """
    _check_window(window, min_cols=2)
    n, D = window.shape
    d = D - 1
    if d <= SMALL_DIM:
        return _kl_small_dim(window, standardize)
    log_jac = torch.zeros(n, dtype=torch.float64, device=window.device)
    log_std_sum = 0.0

    def blocks():
        nonlocal log_jac, log_std_sum
        for phi, lj in _angle_blocks(window, chunk):
            log_jac += lj
            phi = phi - phi.mean(dim=0, keepdim=True)  # centre (distances unchanged)
            if standardize:
                std = phi.std(dim=0)
                std = torch.where(std > 0, std, torch.ones_like(std))
                log_std_sum += std.log().sum().item()
                phi = phi / std
            yield phi

    d2 = _sq_distances_from_blocks(blocks(), n, window.device)
    d2.fill_diagonal_(float("inf"))
    rho = d2.min(dim=1).values.sqrt().clamp(min=1e-8)
    h = (d * rho.log().mean().item() + 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)
         + math.log(n - 1) + EULER_GAMMA + log_std_sum)
    s_sphere = h + log_jac.mean().item()
    s_full = s_sphere + d * math.log(window_radius(window, chunk))
    return s_sphere, s_full


# -----------------------------------------------------------------------------
# uniform reference (§4)

UNIFORM_TILE_ROWS = 32   # rows per tile of the uniform reference's Gaussian draws


def _uniform_tile(seed, a, b, rows, cols):
    """Tile (row block a, column block b) of the uniform reference's Gaussian matrix, float64 (CPU).

    Every tile has its own generator seeded from (seed, a, b), so a row block and a column block can
    each be drawn on their own: the same samples on every device and for every loss chunk."""
    g = torch.Generator(device="cpu").manual_seed(hash((int(seed), a, b)) & (2 ** 63 - 1))
    return torch.randn(rows, cols, generator=g, dtype=torch.float64)


def uniform_sphere_reference(D, n=1000, ks=DEFAULT_KS, loss_fn=None, seed=0, device="cpu", chunk=64,
                             col_chunk=None):
    """Expected loss and k-NN entropy (§4a) of n directions drawn uniformly on the unit sphere (docs/theory.md §4).

    Directions are Gaussian vectors z_i normalised. They are never held whole: z is drawn in tiles of
    UNIFORM_TILE_ROWS rows × a column block (``_uniform_tile``), so any D fits. Entropy: the Gram
    matrix z zᵀ is accumulated over column blocks on `device` (n × n float64), and
    |θ_i − θ_j|² = 2 − 2 z_i·z_j/(|z_i||z_j|) (uniform points are far apart: no cancellation).
    Loss: loss_fn maps an (m, D) float32 tensor of unit vectors on `device` to (m,) losses; it is called
    under torch.no_grad() on at most `chunk` rows at a time (one row block is rebuilt from its tiles).
    Returns {"entropy_knn_k{K}": Ŝ_K, ..., "train_loss": mean loss (if loss_fn)}.
    Memory: n² float64 plus one (n, column block) and one (UNIFORM_TILE_ROWS, D) block; `col_chunk`
    sets the column block (default ≈ 256 MB of float64 per block).
    """
    if isinstance(D, bool) or not isinstance(D, int) or D < 2:
        raise ValueError(f"D must be an int ≥ 2; got {D!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int ≥ 2 (number of uniform samples); got {n!r}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of rows; got {chunk!r}")
    row_blocks = [(a, min(UNIFORM_TILE_ROWS, n - r0)) for a, r0 in enumerate(range(0, n, UNIFORM_TILE_ROWS))]
    c = _column_chunk(n, col_chunk)
    col_blocks = [(b, min(c, D - c0)) for b, c0 in enumerate(range(0, D, c))]
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for b, cols in col_blocks:
        x = torch.cat([_uniform_tile(seed, a, b, rows, cols) for a, rows in row_blocks]).to(device)
        gram.addmm_(x, x.T)
    norms = gram.diagonal().sqrt()
    d2 = (2.0 - 2.0 * gram / (norms[:, None] * norms[None, :])).clamp_(min=0.0)
    del gram
    out = {f"entropy_knn_k{k}": v for k, v in _knn_entropy_from_sq_distances(d2, ks, float(D - 1)).items()}
    if loss_fn is not None:
        total, norms = 0.0, norms.cpu()
        with torch.no_grad():
            for a, rows in row_blocks:
                r0 = a * UNIFORM_TILE_ROWS
                z = torch.cat([_uniform_tile(seed, a, b, rows, cols) for b, cols in col_blocks], dim=1)
                theta = (z / norms[r0:r0 + rows, None]).to(device=device, dtype=torch.float32)
                del z
                for m in range(0, rows, int(chunk)):
                    total += loss_fn(theta[m:m + int(chunk)]).to(torch.float64).sum().item()
        out["train_loss"] = total / n
    return out
