"""Independent reference simulation of the isotropic noise (von Mises-Fisher) toy, docs/theory.md §8.

    python benchmarks/vmf_reference.py --protocol elr --seed 42 [--shared-noise] [--iters 2000000]

Written from docs/theory.md (§2, §4b, §7, §8) only; it imports nothing from trainables/, engine/ or analysis/
so it can serve as a cross-check of them. Plain numpy + scipy, one thread.

Model: L(w) = 1 + <mu, w/|w|> in D = 3, |mu| = 1. Stochastic gradient at w (r = |w|, u = w/r):
    g = P_u(mu + sigma*xi) / r,   P_u = I - u u^T,   xi ~ N(0, I_D),   sigma = 1.
All 17 x 17 (eta, lambda) walkers run as one (289, D) batch from a common start direction.
  fixed ELR: w <- w - eta_eff |w|^2 (g + lam w)      fixed LR: w <- w - eta (g + lam w)
Stationary law of the direction: vMF with kappa = 1/T, T from §7; radius r*^2 = T (D-1)/lam.

Figures are checked on the interior of the grid (smallest and largest value of each axis dropped,
15 x 15 = 225 walkers) and PASS/FAIL is printed per acceptance criterion.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import time

import numpy as np
from scipy import integrate
from scipy.spatial import cKDTree
from scipy.special import gammaln, ive

D = 3                              # ambient dimension; the sphere has d = D - 1 dimensions
SIGMA = 1.0                        # noise scale
GRID = np.logspace(-3, -1, 17)     # eta (or eta_eff) and lambda grid
LOG_EVERY = 50                     # running log / snapshot period (iterations)
WINDOW = 1000                      # entropy window: snapshots
ENT_EVERY = 40_000                 # entropy evaluation period (iterations)
N_ENT = 10                         # stationary S = mean of the last N_ENT evaluations
N_SHORT, N_LONG = 5000, 20000      # U and r windows in logged values (250k and 1M iterations)
BLOCK = 1000                       # noise is drawn this many steps at a time


# ----------------------------------------------------------------------------------------------------
# Exact stationary values (§8) and their sanity check
# ----------------------------------------------------------------------------------------------------
def vmf_exact(T, dim=D):
    """U = 1 - A_D(kappa) and S_sphere = -log C_D(kappa) - kappa A_D(kappa), kappa = 1/T.

    ive(nu, k) = I_nu(k) exp(-k), so log I_nu(k) = log ive(nu, k) + k (no overflow at kappa ~ 2000)."""
    k = 1.0 / np.asarray(T, dtype=float)
    nu = dim / 2 - 1
    A = ive(dim / 2, k) / ive(nu, k)
    log_c = nu * np.log(k) - (dim / 2) * np.log(2 * np.pi) - (np.log(ive(nu, k)) + k)
    return 1.0 - A, -log_c - k * A


def check_exact_formulas() -> bool:
    """Compare vmf_exact in D = 3 with (a) direct quadrature over c = cos(angle to the mode), where the
    density on S^2 is exp(kappa c)/Z with area element 2 pi dc, and (b) the D = 3 closed forms
    A = coth k - 1/k, C = k/(4 pi sinh k); also print the small-T asymptotics of §8."""
    print("exact-formula check, D = 3 (Bessel formula vs quadrature vs closed form):")
    print(f"  {'T':>8} {'U_bessel':>12} {'U_quad':>12} {'U_closed':>12} {'S_bessel':>10} {'S_quad':>10}"
          f" {'S_closed':>10} {'U~T':>9} {'S~log(2pieT)':>12}")
    ok = True
    for T in (1.0, 0.3, 0.05, 5e-3, 5e-4):
        k = 1 / T
        U_b, S_b = vmf_exact(T)
        # quadrature with the weight shifted by exp(-kappa) to stay finite; points help at large kappa
        wfun = lambda c: np.exp(k * (c - 1))
        pts = [max(-1.0, 1 - s / k) for s in (1, 10, 50)]
        Z0 = integrate.quad(wfun, -1, 1, points=pts, limit=200, epsabs=0, epsrel=1e-12)[0]
        Ec = integrate.quad(lambda c: c * wfun(c), -1, 1, points=pts, limit=200, epsabs=0,
                            epsrel=1e-12)[0] / Z0
        logZ = np.log(2 * np.pi * Z0) + k           # Z = 2 pi int exp(kappa c) dc
        U_q, S_q = 1 - Ec, logZ - k * Ec            # S = -E log f = log Z - kappa E[c]
        A_c = 1 / np.tanh(k) - 1 / k
        # -log C = log(4 pi) + log sinh k - log k, with log sinh k = k + log(1 - e^{-2k}) - log 2
        S_c = np.log(4 * np.pi) + k + np.log1p(-np.exp(-2 * k)) - np.log(2) - np.log(k) - k * A_c
        U_c = 1 - A_c
        ok &= bool(abs(U_b - U_q) <= 1e-8 * max(U_q, 1e-3) + 1e-12 and abs(S_b - S_q) < 1e-7
                   and abs(U_b - U_c) < 1e-9 and abs(S_b - S_c) < 1e-9)
        print(f"  {T:8.1e} {U_b:12.8f} {U_q:12.8f} {U_c:12.8f} {S_b:10.6f} {S_q:10.6f} {S_c:10.6f}"
              f" {(D - 1) * T / 2:9.2e} {(D - 1) / 2 * np.log(2 * np.pi * np.e * T):12.6f}")
    print(f"  exact-formula check: {'PASS' if ok else 'FAIL'}")
    return ok


# ----------------------------------------------------------------------------------------------------
# Kozachenko-Leonenko entropy on the sphere (§4b), standardised-angle variant (§8)
# ----------------------------------------------------------------------------------------------------
def sphere_angles(X):
    """Hyperspherical angles of the rows of X (N, D): phi_i = atan2(|x_{i+1..D}|, x_i), i = 1..D-2,
    phi_{D-1} = atan2(x_D, x_{D-1}) (1-based, as in §4b). Scale-invariant, so X need not be unit."""
    tail = np.sqrt(np.cumsum(X[:, ::-1] ** 2, axis=1)[:, ::-1])      # tail[:, j] = |x_{j..D-1}| (0-based)
    polar = np.arctan2(tail[:, 1:D - 1], X[:, :D - 2])                # (N, D-2), in [0, pi]
    azim = np.arctan2(X[:, D - 1], X[:, D - 2])                       # (N,), in (-pi, pi]
    return np.column_stack([polar, azim])


def kl_sphere_entropy(X, standardise=True):
    """S_sphere of the window X (N, D): KL entropy of the angle vectors + mean log-Jacobian."""
    n, d = len(X), D - 1
    phi = sphere_angles(X)
    # sphere Jacobian, mean over snapshots of sum_{i=1}^{D-2} (D-1-i) log sin phi_i
    jac = (np.log(np.sin(phi[:, :D - 2])) @ (D - 1 - np.arange(1, D - 1))).mean()
    log_scale = 0.0
    if standardise:                     # unit spread per coordinate; the log-scales are added back
        s = phi.std(axis=0)
        phi, log_scale = phi / s, np.log(s).sum()
    rho = cKDTree(phi).query(phi, k=2)[0][:, 1]                      # nearest *other* point
    rho = np.maximum(rho, 1e-8)
    H = (d * np.log(rho).mean() + d / 2 * np.log(np.pi) - gammaln(d / 2 + 1) + np.log(n - 1)
         + np.euler_gamma + log_scale)
    return H + jac


def householder_to(a, b):
    """Orthogonal (reflection) matrix sending unit vector a to unit vector b."""
    v = a - b
    return np.eye(len(a)) - 2 * np.outer(v, v) / (v @ v)


# ----------------------------------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------------------------------
def unit(x):
    return x / np.linalg.norm(x)


def simulate(protocol, seed, shared, iters):
    mu = unit(np.random.default_rng(44).standard_normal(D))
    u0 = unit(np.random.default_rng(42).standard_normal(D))
    eta_g, lam_g = np.meshgrid(GRID, GRID, indexing="ij")          # row = eta, column = lambda
    eta, lam = eta_g.ravel(), lam_g.ravel()
    W = eta.size
    w = np.tile(u0, (W, 1))                                         # start radius 1, common direction
    rng = np.random.default_rng(seed)
    rot = householder_to(-mu, np.eye(D)[1])                        # diagnostic frame: mode -> e_2

    n_rec = iters // LOG_EVERY
    n_keep = min(N_LONG, n_rec)
    U_hist = np.empty((n_keep, W))                                  # last n_keep logged U and r
    r_hist = np.empty((n_keep, W))
    snaps = np.empty((WINDOW, W, D))                                # ring buffer of snapshots
    ent_its = [t for t in range(ENT_EVERY, iters + 1, ENT_EVERY)][-N_ENT:]
    S_evals = []                                                    # (variant, walker) per evaluation
    lam_eta = eta * lam
    t_ent = 0.0

    t = 0
    t0 = time.perf_counter()
    while t < iters:
        nb = min(BLOCK, iters - t)
        # v = mu + sigma xi; the tangent projection is done inside the step
        if shared:
            V = mu + SIGMA * rng.standard_normal((nb, D))           # one xi for all walkers
        else:
            V = mu + SIGMA * rng.standard_normal((nb, W, D))
        for j in range(nb):
            v = V[j]
            r2 = np.einsum("ij,ij->i", w, w)
            vw = w @ v if shared else np.einsum("ij,ij->i", w, v)
            r = np.sqrt(r2)
            # g = (v - (v.w) w / r^2) / r
            if protocol == "elr":
                # w - eta r^2 (g + lam w) = w (1 - eta lam r^2 + eta (v.w)/r) - eta r v
                a = 1.0 - lam_eta * r2 + eta * vw / r
                b = eta * r
            else:
                # w - eta (g + lam w) = w (1 - eta lam + eta (v.w)/r^3) - (eta/r) v
                a = 1.0 - lam_eta + eta * vw / (r2 * r)
                b = eta / r
            w = w * a[:, None] - b[:, None] * v
            t += 1
            if t % LOG_EVERY:
                continue
            # --- running log every 50 iterations ---
            k = t // LOG_EVERY - 1                                  # record index 0..n_rec-1
            rr = np.sqrt(np.einsum("ij,ij->i", w, w))
            snaps[k % WINDOW] = w
            if k >= n_rec - n_keep:
                U_hist[k - (n_rec - n_keep)] = (w @ mu) / rr + 1.0
                r_hist[k - (n_rec - n_keep)] = rr
            if t in ent_its:
                te = time.perf_counter()
                m = min(k + 1, WINDOW)
                S = np.empty((3, W))
                for i in range(W):
                    X = snaps[:m, i]
                    S[0, i] = kl_sphere_entropy(X, standardise=True)          # the spec's estimator
                    S[1, i] = kl_sphere_entropy(X, standardise=False)         # diagnostic
                    S[2, i] = kl_sphere_entropy(X @ rot.T, standardise=True)  # diagnostic frame
                rbar = np.linalg.norm(snaps[:m], axis=2).mean(axis=0)
                S_evals.append((S, rbar))
                t_ent += time.perf_counter() - te
    wall = time.perf_counter() - t0
    S_all = np.stack([s for s, _ in S_evals])                       # (n_eval, 3, W)
    rbar_all = np.stack([rb for _, rb in S_evals])                  # (n_eval, W)
    return dict(eta=eta, lam=lam, mu=mu, u0=u0, U_hist=U_hist, r_hist=r_hist,
                S_sphere=S_all.mean(0), S_full=(S_all + (D - 1) * np.log(rbar_all)[:, None]).mean(0),
                wall=wall, t_ent=t_ent, n_eval=len(S_evals))


# ----------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------
def maxwell_fit(S, x, y, protocol):
    """Least squares S = c0 + c1 x + c2 y + c3 x^2 + c4 y^2 + c5 x y; the §7 combination normalised by
    R = (D-1)/2: ELR dS/dy / R (expect -1), LR (dS/dx - dS/dy) / R (expect +1)."""
    A = np.column_stack([np.ones_like(x), x, y, x * x, y * y, x * y])
    c, *_ = np.linalg.lstsq(A, S, rcond=None)
    r2 = 1 - ((S - A @ c) ** 2).sum() / ((S - S.mean()) ** 2).sum()
    R = (D - 1) / 2
    dSdx = lambda xx, yy: c[1] + 2 * c[3] * xx + c[5] * yy
    dSdy = lambda xx, yy: c[2] + 2 * c[4] * yy + c[5] * xx
    comb = (lambda xx, yy: dSdy(xx, yy) / R) if protocol == "elr" else \
           (lambda xx, yy: (dSdx(xx, yy) - dSdy(xx, yy)) / R)
    target = -1.0 if protocol == "elr" else 1.0
    grid_vals = comb(x, y)
    return dict(c=c, r2=r2, coef=comb(0.0, 0.0), centre=comb(x.mean(), y.mean()), target=target,
                grid_max=np.abs(grid_vals / target - 1).max(), grid_mean=np.abs(grid_vals / target - 1).mean())


def analyse(res, protocol):
    eta, lam = res["eta"], res["lam"]
    T = eta * SIGMA ** 2 / 2 if protocol == "elr" else np.sqrt(eta * lam * SIGMA ** 2 / (2 * (D - 1)))
    U_ex, S_ex = vmf_exact(T)
    r_star = np.sqrt(T * (D - 1) / lam)
    idx = np.arange(GRID.size)
    inner = ((idx[:, None] >= 1) & (idx[:, None] <= GRID.size - 2)
             & (idx[None, :] >= 1) & (idx[None, :] <= GRID.size - 2)).ravel()     # 15 x 15

    Uh, rh = res["U_hist"], res["r_hist"]
    ns = min(N_SHORT, len(Uh))
    U_s, U_l, r_s = Uh[-ns:].mean(0), Uh.mean(0), rh[-ns:].mean(0)
    # batch-means standard error of U over the short window (20 batches) -> z-scores
    se = Uh[-ns:].reshape(20, -1, Uh.shape[1]).mean(1).std(0, ddof=1) / np.sqrt(20)

    out = {}
    rows = []

    def report(name, err, lim_med, lim_max, unit_="%", scale=100.0):
        e = err[inner]
        i = np.flatnonzero(inner)[np.argmax(e)]
        ok = (lim_med is None or np.median(e) <= lim_med) and e.max() <= lim_max
        med_txt = "" if lim_med is None else f"<= {lim_med * scale:g}"
        rows.append(f"  {name:<26} {np.median(e) * scale:9.3f} {e.max() * scale:9.3f} {unit_:<4}"
                    f" {med_txt:>8} {'<= ' + format(lim_max * scale, 'g'):>8}  at eta={eta[i]:.3g},"
                    f" lam={lam[i]:.3g}   {'PASS' if ok else 'FAIL'}")
        out[name] = (np.median(e), e.max(), ok, eta[i], lam[i])

    report("U rel err (250k)", np.abs(U_s / U_ex - 1), 0.02, 0.07)
    report("U rel err (1M)", np.abs(U_l / U_ex - 1), 0.02, 0.07)
    report("S_sphere abs err [spec]", np.abs(res["S_sphere"][0] - S_ex), 0.1, 0.3, "nats", 1.0)
    report("  (no standardisation)", np.abs(res["S_sphere"][1] - S_ex), 0.1, 0.3, "nats", 1.0)
    report("  (mode rotated to e2)", np.abs(res["S_sphere"][2] - S_ex), 0.1, 0.3, "nats", 1.0)
    report("r rel err vs r* (250k)", np.abs(r_s / r_star - 1), None, 0.03)

    print(f"\n  {'criterion (interior 225)':<26} {'median':>9} {'max':>9} {'':<4} {'target':>8} {'target':>8}")
    print("\n".join(rows))
    # statistical context for U: z = (U_sim - U_exact)/SE and the signed relative error per eta row
    z = ((U_s - U_ex) / se)[inner]
    print(f"  U(250k) z-scores vs batch-means SE: median|z| = {np.median(np.abs(z)):.2f}, max|z| = "
          f"{np.abs(z).max():.2f}, mean z = {z.mean():+.2f}; median SE/U = "
          f"{np.median((se / U_ex)[inner]) * 100:.2f}%, max SE/U = {(se / U_ex)[inner].max() * 100:.2f}%")
    rel_s = (U_s / U_ex - 1).reshape(GRID.size, GRID.size)[1:-1, 1:-1]
    rel_l = (U_l / U_ex - 1).reshape(GRID.size, GRID.size)[1:-1, 1:-1]
    print("  per eta row (interior): eta, mean signed U rel err 250k/1M [%], max |.| 250k/1M [%]")
    for i, e in enumerate(GRID[1:-1]):
        print(f"    {e:8.2e}  {rel_s[i].mean() * 100:+6.2f} {rel_l[i].mean() * 100:+6.2f}"
              f"   {np.abs(rel_s[i]).max() * 100:6.2f} {np.abs(rel_l[i]).max() * 100:6.2f}")
    dS = (res["S_sphere"][0] - S_ex).reshape(GRID.size, GRID.size)[1:-1, 1:-1]
    print(f"  S_sphere - S_exact (spec), signed: mean {dS.mean():+.3f}, min {dS.min():+.3f}, max {dS.max():+.3f}")

    x, y = np.log(eta[inner]), np.log(lam[inner])
    mf = maxwell_fit(res["S_full"][0][inner], x, y, protocol)
    lab = "c2/R" if protocol == "elr" else "(c1-c2)/R"
    for name, val in ((f"Maxwell {lab}", mf["coef"]), ("Maxwell at grid centre", mf["centre"])):
        ok = abs(val / mf["target"] - 1) <= 0.03
        print(f"  {name:<26} {val:+9.4f}  target {mf['target']:+.0f} +- 3%   rel err "
              f"{abs(val / mf['target'] - 1) * 100:5.2f}%   {'PASS' if ok else 'FAIL'}")
        out[name] = (val, ok)
    print(f"  Maxwell fit R^2 = {mf['r2']:.5f}; c = {np.array2string(mf['c'], precision=4)};"
          f" derivative rel err over interior: max {mf['grid_max'] * 100:.2f}%, mean {mf['grid_mean'] * 100:.2f}%")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=["elr", "lr"], default="elr")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--shared-noise", action="store_true")
    ap.add_argument("--iters", type=int, default=2_000_000)
    ap.add_argument("--skip-check", action="store_true", help="skip the exact-formula sanity check")
    ap.add_argument("--save", default=None, help="optional .npz path for the raw stationary values")
    a = ap.parse_args()
    if a.iters < max(ENT_EVERY, LOG_EVERY * WINDOW) or a.iters % (20 * LOG_EVERY):
        ap.error("--iters must be >= 50000 and a multiple of 1000")
    if not a.skip_check:
        check_exact_formulas()
    print(f"\nprotocol={a.protocol} seed={a.seed} noise={'shared' if a.shared_noise else 'independent'}"
          f" iters={a.iters} walkers={GRID.size ** 2} D={D}")
    res = simulate(a.protocol, a.seed, a.shared_noise, a.iters)
    print(f"  mu = {np.round(res['mu'], 4)}, start = {np.round(res['u0'], 4)}; wall time {res['wall']:.1f} s"
          f" (of which entropy {res['t_ent']:.1f} s, {res['n_eval']} evaluations x 3 variants)")
    analyse(res, a.protocol)
    if a.save:
        np.savez_compressed(a.save, **{k: v for k, v in res.items() if isinstance(v, np.ndarray)})


if __name__ == "__main__":
    main()
