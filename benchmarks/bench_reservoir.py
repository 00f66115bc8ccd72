"""The reservoir's memory and time per evaluation, on synthetic windows in a real object store.

    python benchmarks/bench_reservoir.py [--peak-D 1550016 --peak-N 200] [--time-N 1000]
                                         [--time-D 24408,43692,1550016] [--big-N 100]

1. Peak memory of one k-NN evaluation of a window of N snapshots of D float32 weights: the chunks are
   ``ray.put`` (the object store holds the window's bytes W once), then the reservoir evaluates them
   in this process while a thread samples this process's private memory (USS, from
   /proc/self/smaps_rollup; the object-store pages the evaluation reads are shared, not private).
   Peak = W + the largest private growth over the baseline; target ≤ 1.3 W. The paper's ConvNet-64
   window is D = 1,550,016, N = 1000 (W = 6.2 GB); the default N = 200 fits beside other work on a
   small machine; the extra memory does not grow with N (one column block of ≤ 2^25 float64 plus the
   N × N matrix), so the ratio at N = 1000 is at most the measured one.
2. Seconds per evaluation (k-NN, the papers' ks) at each D of ``--time-D`` with N = ``--time-N``;
   for D > 100,000 with N = ``--big-N`` and extrapolated to N = ``--time-N`` by the N² cost of the
   distance matrix (said so in the output).
3. The trial's stall at a log step (``--stall-D``, N = ``--time-N``): the sink's evaluate() call,
   synchronous (the trial waits for the entropy) and asynchronous (the engine's: it only ships the
   last chunk and submits).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
CHUNK = 32


def private_bytes() -> int:
    """This process's unique set size (private clean + dirty pages), in bytes."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


class PeakSampler:
    """Samples private memory every few milliseconds until stopped; keeps the maximum."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, private_bytes())
            self._stop.wait(0.002)

    def __enter__(self):
        self.peak = private_bytes()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, private_bytes())


def fill(n: int, D: int, seed: int = 0):
    """A WindowIndex with one k-NN spec of window n holding n snapshots (a random walk) in chunks."""
    import ray

    from engine.reservoir import WindowIndex

    rng = np.random.default_rng(seed)
    idx = WindowIndex([{"name": "knn", "window": n, "stride": 1, "ks": KS}])
    x = rng.standard_normal(D).astype(np.float32)
    for start in range(0, n, CHUNK):
        k = min(CHUNK, n - start)
        block = np.empty((k, 1, D), dtype=np.float32)
        for i in range(k):
            x += 0.01 * rng.standard_normal(D).astype(np.float32)
            block[i, 0] = x
        idx.add(list(range(start, start + k)), ray.put(block))
        del block
    return idx


def evaluate_once(res, idx, n: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    rows = res.evaluate("bench", n - 1, 1, [(idx.specs[0], idx.window(0, n - 1))])
    return rows[0], time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peak-D", type=int, default=1_550_016)
    p.add_argument("--peak-N", type=int, default=200)
    p.add_argument("--time-N", type=int, default=1000)
    p.add_argument("--time-D", default="24408,43692,1550016")
    p.add_argument("--big-N", type=int, default=100)
    p.add_argument("--stall-D", type=int, default=24_408)
    args = p.parse_args(argv)
    import ray
    import torch

    from engine.reservoir import Reservoir

    W = args.peak_N * args.peak_D * 4
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(int(1.6 * W), 200 * 2 ** 20))
    res = Reservoir()           # the actor's class, run here so that its memory is this process's
    print(f"torch threads: {torch.get_num_threads()}")

    idx = fill(args.peak_N, args.peak_D)
    with PeakSampler() as s:
        base = private_bytes()
        row, secs = evaluate_once(res, idx, args.peak_N)
    extra = max(0, s.peak - base)
    print(f"\n1. peak memory, D = {args.peak_D:,}, N = {args.peak_N}: window W = {W / 2**30:.2f} GiB in the "
          f"object store; private growth during the evaluation {extra / 2**20:.0f} MiB; "
          f"peak = {(W + extra) / W:.3f} × W  (target ≤ 1.3; evaluation {secs:.1f} s, "
          f"S_k1 = {row['entropy_knn_k1']:.6g})")
    W1000 = 1000 * args.peak_D * 4
    print(f"   at N = 1000 (W = {W1000 / 2**30:.2f} GiB) the extra memory is one column block and the "
          f"1000 × 1000 matrices, ≤ {extra / 2**20:.0f} MiB + 16 MiB: ≤ {(W1000 + extra + 2**24) / W1000:.3f} × W")
    del idx

    print(f"\n2. seconds per k-NN evaluation (ks {KS}), {torch.get_num_threads()} threads:")
    for D in [int(d) for d in args.time_D.split(",") if d]:
        n = args.time_N if D <= 100_000 else args.big_N
        idx = fill(n, D, seed=1)
        _, secs = evaluate_once(res, idx, n)
        del idx
        note = "" if n == args.time_N else (f"  (N = {n}; × ({args.time_N}/{n})² → "
                                            f"≈ {secs * (args.time_N / n) ** 2:.0f} s at N = {args.time_N})")
        print(f"   D = {D:>9,}  N = {n:>5}: {secs:7.2f} s{note}")
    stall(args.stall_D, args.time_N)
    ray.shutdown()
    return 0


def stall(D: int, n: int) -> None:
    """3. How long the trial waits at a log step: the sink's evaluate() call, synchronous (the old
    behaviour) and asynchronous (the engine's), with the window's last chunk still to ship."""
    import torch

    from engine.reservoir import ReservoirSink, get_reservoir

    import ray

    res = get_reservoir()
    ray.get(res.pid.remote())           # the actor is up before anything is timed
    spec = [{"name": "knn", "window": n, "stride": 1, "ks": KS}]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, D, generator=g)
    print(f"\n3. the trial's stall per log step, D = {D:,}, N = {n} (evaluation in the reservoir actor):")
    for asynchronous in (False, True):
        sink = ReservoirSink(f"stall{asynchronous}", spec, 1, D, "cpu", reservoir=res, asynchronous=asynchronous)
        for it in range(n):
            x += 0.01 * torch.randn(1, D, generator=g)
            sink.put(it, x)
        t0 = time.perf_counter()
        sink.evaluate(n - 1)
        waited = time.perf_counter() - t0
        t0 = time.perf_counter()
        sink.collect(wait=True)
        later = time.perf_counter() - t0
        print(f"   {'asynchronous' if asynchronous else 'synchronous '}: evaluate() blocked the trial "
              f"{waited * 1000:8.1f} ms" + (f" (the result came {later:.2f} s later, while training "
                                            f"would go on)" if asynchronous else ""))
        sink.close()


if __name__ == "__main__":
    sys.exit(main())
