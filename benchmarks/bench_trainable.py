"""Throughput of the network trainable (run by hand; prints its figures).

    python benchmarks/bench_trainable.py                  # CPU-sized defaults, ~3-5 minutes
    python benchmarks/bench_trainable.py --span 2000 --window 1000 --num-stoch-grads 1000 \
        --train-size 50000 --test-size 10000              # the paper's setting (GPU)

ConvNet(c) on synthetic CIFAR-shaped data (3×32×32, 10 classes), batch B, on the chosen device:

(a) iterations/s of the bare update loop (``NetworkRunner._step`` in a loop, no log steps);
(b) iterations/s over iterations 0..span of a run whose log schedule is the free-energy paper's for
    ``--schedule-iters`` iterations, with M stochastic gradients per log step and k-NN entropy windows
    of ``--window`` consecutive snapshots (only the snapshots the windows need are taken);
(c) seconds for one k-NN entropy evaluation (all default ks) at N × D;
(d) peak memory: max RSS of this process, and torch.cuda.max_memory_allocated on CUDA;
(e) host synchronisations in a span of pure steps (Tensor.item/.cpu/.tolist/__bool__/... calls), which
    must be zero.

It also projects the wall time of a whole paper run from the measured pieces (per-iteration step, per-
sample full-gradient / test pass, per stochastic gradient, per entropy evaluation), so that a short
CPU measurement says what a 1.6M-iteration run would cost.

    python benchmarks/bench_trainable.py --compare --threads 2 --rounds 40     # the step side by side

``--compare`` times the one-member step against the papers' own training loop (benchmarks/bench_bundle.py's
``papers_loop``: module parameters, torch.optim.SGD, a per-tensor projection, conv-BN-ReLU-pool) and the
candidates of ``STEP_VARIANTS``, interleaved (one block of ``--per-round`` steps of each candidate per
round, ``--rounds`` rounds), because the machine's load changes faster than a block-by-block comparison
can follow; it prints, per candidate, the median it/s and the median, quartiles and range of its per-round
ratio to the papers' loop. Then whether each candidate gives eager's numbers, by the bar of the bundle
acceptance (tests/test_bundle.py): float64, θ over 100 steps within 1e-9 of the distance moved; float32,
the first 5 steps within 1e-4 (ConvNet on digits, batch 32, fixed sphere); ``--agree-data synthetic``
runs the same check on the CIFAR-shaped data. A last row, eager from a θ_0 moved by the dtype's epsilon (rounding-sized),
shows what rounding alone does on that data: where it fails the bar too (the random CIFAR-shaped data at
these step sizes), the check cannot tell a sound kernel from a wrong one. On digits (one input channel)
channels-last changes no layout, so its row there is vacuous.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables import entropy                                 # noqa: E402
from trainables import metrics                                  # noqa: E402
from trainables.data import load_dataset                              # noqa: E402
from trainables.defaults import resolve_device                        # noqa: E402
from trainables.member import DEFAULT_KS                              # noqa: E402
from trainables.schedule import SnapshotPlan, log_iterations          # noqa: E402
from trainables.sinks import LocalSink                                # noqa: E402
from trainables.network import NetworkRunner                            # noqa: E402
from bench_bundle import papers_loop                                  # noqa: E402

SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_runner(args, device, iterations, schedule, window, M):
    specs = [{"name": "knn", "window": window, "stride": 1, "ks": list(DEFAULT_KS)}] if window else []
    cfg = dict(model="convnet", width=args.width, dataset="synthetic", protocol="fixed_sphere", lr=args.lr,
               batch_size=args.batch_size, iterations=iterations, log_schedule=schedule,
               num_stoch_grads=M, entropy=specs, seed=0, device=str(device))
    runner = NetworkRunner([cfg], device)
    # the runner loads the default synthetic size; swap in the requested one (same shapes and classes)
    runner.data = load_dataset("synthetic", synthetic_size=(args.train_size, args.test_size),
                               device=device)
    return runner, specs


def count_host_syncs(runner, steps, start):
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def wrapper(t, *a, **k):
            calls.append(name)
            return fn(t, *a, **k)
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        for t in range(start, start + steps):
            runner._step(t)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    return calls


def bench_bare(args, device):
    runner, _ = make_runner(args, device, 10 ** 9, "every:1000000000", 0, 1)
    runner._running.clear()
    for t in range(args.warmup):
        runner._step(t)
    sync(device)
    t0 = time.perf_counter()
    for t in range(args.warmup, args.warmup + args.bare_iters):
        runner._step(t)
    sync(device)
    dt = time.perf_counter() - t0
    calls = count_host_syncs(runner, args.sync_steps, args.warmup + args.bare_iters)
    return runner, args.bare_iters / dt, dt / args.bare_iters, calls


def bench_pieces(runner, args, device):
    """Per-sample cost of the full-gradient and test passes, per stochastic gradient."""
    d = runner.data
    sync(device)
    t0 = time.perf_counter()
    metrics.full_gradient(runner.model, d.x_train, d.y_train, runner.grad, runner.loss)
    sync(device)
    t_full = (time.perf_counter() - t0) / d.x_train.shape[0]
    t0 = time.perf_counter()
    metrics.evaluate(runner.model, d.x_test, d.y_test, runner.loss)
    sync(device)
    t_test = (time.perf_counter() - t0) / d.x_test.shape[0]
    gen = torch.Generator(device=device).manual_seed(7)
    n = 5
    t0 = time.perf_counter()
    for g in metrics.stochastic_gradients(runner.model, d.x_train, d.y_train, runner.grad, runner.loss, n,
                                     runner.batch_size, gen):
        g.sum()
    sync(device)
    t_sg = (time.perf_counter() - t0) / n
    return t_full, t_test, t_sg


def bench_span(args, device):
    runner, specs = make_runner(args, device, args.schedule_iters, "free_energy", args.window,
                                args.num_stoch_grads)
    sink = LocalSink(specs, 1, runner.D, device=device) if specs else None
    spent = {"measure": 0.0, "entropy": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(device)
                spent[key] += time.perf_counter() - t
        return wrapper

    runner.measure = timed(runner.measure, "measure")   # includes the entropy evaluation
    if sink is not None:
        sink.evaluate = timed(sink.evaluate, "entropy")
    n_logs = n_evals = 0
    last = 0
    t0 = time.perf_counter()
    for event in runner.run(sink):
        n_logs += 1
        row = event["rows"][0]
        if row is not None and "entropy_knn_k1" in row:
            n_evals += 1
        last = event["iteration"]
        if last >= args.span or runner.status[0] != "running":
            break
    sync(device)
    dt = time.perf_counter() - t0
    return last, dt, n_logs, n_evals, len([i for i in runner.plan.snapshot_iters if i <= last]), spent


def bench_entropy(args, device):
    """A realistic window: a slow random walk on the unit sphere (consecutive iterates very close)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    start = torch.randn(args.entropy_d, generator=g)
    steps = 1e-3 * torch.randn(args.entropy_n, args.entropy_d, generator=g) / args.entropy_d ** 0.5
    window = start + steps.cumsum(0)
    window = (window / window.norm(dim=1, keepdim=True)).to(device)
    entropy.knn_graph_entropy(window[:50], DEFAULT_KS)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    values = entropy.knn_graph_entropy(window, DEFAULT_KS)
    sync(device)
    return time.perf_counter() - t0, values


# ---- --compare: the one-member step side by side -------------------------------------------------

def _papers_order(runner):
    runner.model.pool_first = False        # conv-BN-ReLU-pool as written (the runner's step before)


def _channels_last(runner):
    model, forward = runner.model, runner.model.forward
    model.forward = lambda x: forward(x.contiguous(memory_format=torch.channels_last))


def _perturbed(runner):
    """θ_0 moved at random by its dtype's epsilon (relative): rounding-sized, the control of the check."""
    theta = runner.theta
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(theta.shape, generator=g, dtype=theta.dtype).to(theta.device)
    with torch.no_grad():
        theta.add_(noise * (torch.finfo(theta.dtype).eps * theta.norm() / noise.norm()))


# name: (member keys, patch of the built runner); "compile" is the runner's own opt-in
STEP_VARIANTS = {"eager": ({}, None), "eager_papers_order": ({}, _papers_order),
                 "channels_last": ({}, _channels_last), "compile": ({"compile": True}, None),
                 "eager_theta0_eps": ({}, _perturbed)}


def variant_runner(name, cfg, device):
    keys, patch = STEP_VARIANTS[name]
    runner = NetworkRunner([{**cfg, **keys}], device)
    if patch is not None:
        patch(runner)
    return runner


def stepper(runner):
    """A no-argument step of ``runner`` that counts its own iterations."""
    t = [0]

    def step():
        runner._step(t[0])
        t[0] += 1
    return step


def compare_speed(args, device, names):
    """Interleaved rounds; per candidate the per-round it/s. The papers' loop is always first."""
    cfg = dict(model="convnet", width=args.width, dataset="synthetic", protocol="fixed_sphere", lr=args.lr,
               batch_size=args.batch_size, iterations=10 ** 9, log_schedule="every:1000000000",
               num_stoch_grads=1, entropy=[], seed=0, device=str(device))
    bench_args = argparse.Namespace(width=args.width, train_size=args.train_size, batch_size=args.batch_size)
    steps = {"papers_loop": papers_loop("convnet", bench_args, device)}
    for name in names:
        runner = variant_runner(name, cfg, device)
        runner.data = load_dataset("synthetic", synthetic_size=(args.train_size, args.test_size), device=device)
        steps[name] = stepper(runner)
        t0 = time.perf_counter()
        steps[name]()
        sync(device)
        print(f"    {name}: first step {time.perf_counter() - t0:.1f} s", flush=True)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    rates = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.per_round):
                step()
            sync(device)
            rates[name].append(args.per_round / (time.perf_counter() - t0))
    return rates


def agreement(name, dtype, steps, data, width, lr):
    """Largest |θ_variant − θ_eager| / |θ_eager − θ_0| over ``steps`` steps (the bundle acceptance's measure)."""
    cfg = dict(model="convnet", width=width, dataset=data, protocol="fixed_sphere", lr=lr, batch_size=32, seed=3,
               iterations=10 ** 9, log_schedule="every:1000000000", num_stoch_grads=1, entropy=[], device="cpu",
               dtype=dtype)
    eager, other = NetworkRunner([cfg]), variant_runner(name, cfg, torch.device("cpu"))
    if data == "synthetic":
        eager.data = other.data = load_dataset("synthetic", synthetic_size=(512, 64))
    worst = 0.0
    for t in range(steps):
        eager._step(t)
        other._step(t)
        moved = (eager.theta - eager.theta0[0]).norm()
        worst = max(worst, ((other.theta - eager.theta).norm() / moved).item())
    return worst


def report_compare(args, device):
    names = [n for n in args.candidates if n != "papers_loop"]
    print(f"--compare: {args.rounds} rounds × {args.per_round} steps of each, interleaved, ConvNet({args.width}), "
          f"batch {args.batch_size}, CIFAR-shaped synthetic data")
    rates = compare_speed(args, device, names)
    base = rates["papers_loop"]
    for name, r in rates.items():
        ratio = [a / b for a, b in zip(r, base)]
        q = statistics.quantiles(ratio, n=4) if len(ratio) > 1 else [ratio[0]] * 3
        print(f"    {name:20s} {statistics.median(r):7.2f} it/s   / papers' loop: median {statistics.median(ratio):.3f}, "
              f"quartiles {q[0]:.3f}–{q[2]:.3f}, range {min(ratio):.3f}–{max(ratio):.3f}")
    print(f"    same numbers as eager? (bar: float64 100 steps ≤ 1e-9, float32 5 steps ≤ 1e-4 of the distance moved; "
          f"{args.agree_data}, batch 32)")
    for name in [*names, "eager_theta0_eps"]:     # the last: how much rounding alone does on this data
        if name == "eager":
            continue
        d64 = agreement(name, "float64", 100, args.agree_data, 2, 0.01)
        d32 = max(agreement(name, "float32", 5, args.agree_data, 4, lr) for lr in (0.001, 0.003, 0.01, 0.03))
        verdict = "same numbers" if d64 <= 1e-9 and d32 <= 1e-4 else "NOT the same numbers"
        print(f"    {name:20s} float64 {d64:.1e}, float32 {d32:.1e}: {verdict}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--train-size", type=int, default=512, help="synthetic training images")
    p.add_argument("--test-size", type=int, default=256, help="synthetic test images")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bare-iters", type=int, default=40, help="(a) timed steps")
    p.add_argument("--sync-steps", type=int, default=10, help="(e) steps watched for host syncs")
    p.add_argument("--span", type=int, default=100, help="(b) iterations 0..span of the logged run")
    p.add_argument("--schedule-iters", type=int, default=1_600_000, help="(b) free_energy schedule length")
    p.add_argument("--window", type=int, default=50, help="(b) knn window (0 = no entropy)")
    p.add_argument("--num-stoch-grads", type=int, default=2, help="(b) M per log step")
    p.add_argument("--entropy-n", type=int, default=1000, help="(c) N")
    p.add_argument("--entropy-d", type=int, default=24_408, help="(c) D")
    p.add_argument("--skip-span", action="store_true")
    p.add_argument("--compare", action="store_true", help="only the step side by side (see above)")
    p.add_argument("--candidates", nargs="+", default=["eager", "eager_papers_order", "channels_last"],
                   choices=list(STEP_VARIANTS), help="--compare: the runner variants (compile: minutes to compile)")
    p.add_argument("--rounds", type=int, default=20, help="--compare: interleaved rounds")
    p.add_argument("--per-round", type=int, default=2, help="--compare: steps of each candidate per round")
    p.add_argument("--agree-data", default="digits", choices=["digits", "synthetic"])
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print(f"ConvNet({args.width}) on synthetic 3x32x32 data, batch {args.batch_size}, fixed_sphere lr {args.lr}, "
          f"{args.train_size} train / {args.test_size} test images")
    if args.compare:
        report_compare(args, device)
        return 0

    runner, its, t_step, calls = bench_bare(args, device)
    print(f"(a) bare update loop: {its:.2f} it/s ({1e3 * t_step:.1f} ms/it over {args.bare_iters} steps), D = {runner.D}")
    print(f"(e) host syncs in {args.sync_steps} pure steps: {len(calls)} {sorted(set(calls)) or ''}")

    t_full, t_test, t_sg = bench_pieces(runner, args, device)
    print(f"    full-gradient pass {1e3 * t_full:.3f} ms/sample, test pass {1e3 * t_test:.3f} ms/sample, "
          f"one stochastic gradient {1e3 * t_sg:.1f} ms")
    del runner

    if not args.skip_span:
        last, dt, n_logs, n_evals, n_snaps, spent = bench_span(args, device)
        print(f"(b) logged span: iterations 0..{last} of a free_energy schedule for {args.schedule_iters} "
              f"iterations: {n_logs} log steps (M = {args.num_stoch_grads}), {n_evals} knn entropy "
              f"evaluations (window {args.window}), {n_snaps} snapshots")
        print(f"    {last / dt:.2f} it/s over the span ({dt:.1f} s: log-step measurements "
              f"{spent['measure'] - spent['entropy']:.1f} s, entropy {spent['entropy']:.1f} s, the rest "
              f"{dt - spent['measure']:.1f} s; the bare loop alone would take {last * t_step:.1f} s)")

    t_knn, values = bench_entropy(args, device)
    print(f"(c) one k-NN entropy evaluation, N = {args.entropy_n}, D = {args.entropy_d}, "
          f"{len(values)} ks: {t_knn:.2f} s")

    # projection of a whole paper run from the measured pieces
    n_iter, m_paper, n_train, n_test, window = 1_600_000, 1000, 50_000, 10_000, 1000
    logs = log_iterations("free_energy", n_iter)
    plan = SnapshotPlan(logs, [{"name": "knn", "window": window, "stride": 1}])
    t_log = n_train * t_full + n_test * t_test + m_paper * t_sg
    total = n_iter * t_step + len(logs) * t_log + len(plan.all_eval_steps) * t_knn
    print(f"    projection, ConvNet({args.width}) paper run ({n_iter} its, {len(logs)} logs with M = {m_paper} on "
          f"{n_train}/{n_test} images, {len(plan.all_eval_steps)} knn evaluations timed at N = {args.entropy_n}): "
          f"steps {n_iter * t_step / 3600:.1f} h + logs {len(logs) * t_log / 3600:.1f} h + entropy "
          f"{len(plan.all_eval_steps) * t_knn / 3600:.2f} h = {total / 3600:.1f} h on this device")

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(d) peak memory: max RSS {rss_mb:.0f} MB", end="")
    if device.type == "cuda":
        print(f", CUDA max allocated {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MB")
    else:
        print()
    if calls:
        print("FAIL: the hot loop synchronises with the host", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
