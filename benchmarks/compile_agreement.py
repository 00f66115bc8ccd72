"""How far the compiled one-member step's trajectory moves from eager's, next to two rounding controls.

    python benchmarks/compile_agreement.py [--lrs 0.001 0.003 0.01 0.03] [--width 8] [--batch-size 128]

ConvNet on digits, fixed sphere, seed 3. For each lr prints, after steps 1..5 (float32) and the worst of
100 steps (float64), |θ_variant − θ_eager| / |θ_eager − θ_0| for:
  compile            the runner's ``compile: true`` (torch.compile of forward + backward)
  eager_theta0_eps   eager from a θ_0 moved by the dtype's epsilon (rounding once, at the start)
  eager_2_threads    eager with 2 threads against 1 (another summation order at every step)
The bundle acceptance's bar (float32 5 steps ≤ 1e-4, float64 100 steps ≤ 1e-9) is what "same numbers"
means in docs/DESIGN.md; compiling takes minutes per dtype on this CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trainable import variant_runner  # noqa: E402
from trainables.network import NetworkRunner  # noqa: E402


def trajectory(runner, steps, threads):
    torch.set_num_threads(threads)
    out = []
    for t in range(steps):
        runner._step(t)
        out.append(runner.theta.detach().clone())
    return out


def gaps(name, cfg, steps):
    base = NetworkRunner([cfg])
    theta0 = base.theta0[0].clone()
    ref = trajectory(base, steps, 1)
    if name == "eager_2_threads":
        other = trajectory(NetworkRunner([cfg]), steps, 2)
    else:
        other = trajectory(variant_runner(name, cfg, torch.device("cpu")), steps, 1)
    return [((b - a).norm() / (a - theta0).norm()).item() for a, b in zip(ref, other)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--variants", nargs="+", default=["compile", "eager_theta0_eps", "eager_2_threads"])
    args = ap.parse_args(argv)
    print(f"ConvNet({args.width}) on digits, batch {args.batch_size}: |θ_variant − θ_eager| / |θ_eager − θ_0|")
    for dtype, steps in (("float32", 5), ("float64", 100)):
        for lr in args.lrs:
            cfg = dict(model="convnet", width=args.width, dataset="digits", protocol="fixed_sphere", lr=lr,
                       batch_size=args.batch_size, seed=3, iterations=10 ** 9, log_schedule="every:1000000000",
                       num_stoch_grads=1, entropy=[], device="cpu", dtype=dtype)
            for name in args.variants:
                g = gaps(name, cfg, steps)
                shown = " ".join(f"{v:.1e}" for v in g) if steps <= 5 else f"step 5 {g[4]:.1e}, worst of {steps} {max(g):.1e}"
                print(f"  {dtype} lr {lr:<6g} {name:17s} {shown}", flush=True)


if __name__ == "__main__":
    main()
