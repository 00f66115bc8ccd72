"""Throughput of bundled network trials (issue #10; run by hand, prints its figures).

    python benchmarks/bench_bundle.py                                # all K, both models, CPU, short
    python benchmarks/bench_bundle.py --models convnet --ks 1 8 --steps 20 --data digits --batch-size 64
    python benchmarks/bench_bundle.py --mechanisms                   # grouped convs vs torch.func.vmap
    python benchmarks/bench_bundle.py --compile                      # torch.compile of the solo step
    python benchmarks/bench_bundle.py --models convnet --ks 8 --stops 4   # stopped members: parked vs compacted

One line per (model, K): member-iterations/s of ``NetworkRunner._step`` (the hot loop: minibatch, one
forward and one backward of the K summed member losses, the protocol update on θ (K, D), running metrics)
and the aten operators dispatched per member-iteration (counted with a TorchDispatchMode over one step:
on a launch-bound GPU each operator is at least one kernel launch, so this count, divided by K, is what
decides the speed there). K = 1 is the plain one-member path. On CUDA the steps are timed with CUDA
events; elsewhere with the wall clock (the same code path, with a no-op synchronisation).

``--mechanisms`` compares, at the same K, the runner's grouped convolutions with the other candidate,
``torch.func.stack_module_state`` + ``functional_call`` + ``vmap`` over K copies of the plain model
(forward and backward only, no update), by operators and time.

``--stops N`` times, for each K, one step of the whole bundle with every member running, with N members
stopped and parked (learning rate masked, still in the batch: ``compacts`` off) and with N members stopped
and compacted out of the batch (trainables.compaction), rounds interleaved (median of ``--rounds``), and
counts the aten operators of one step of each.

``--compile`` times the one-member step eagerly, with ``torch.compile`` of the model, and the papers'
own loop (nn.Module parameters, ``torch.optim.SGD``, a per-tensor projection), and checks that the
compiled step gives the same θ. The interleaved comparison with the same-numbers bar is
``benchmarks/bench_trainable.py --compare``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables import compaction, metrics                       # noqa: E402
from trainables.data import load_dataset, sample_batch_indices         # noqa: E402
from trainables.models import build_model, si_parameters               # noqa: E402
from trainables.network import NetworkRunner                             # noqa: E402

WIDTHS = {"convnet": 8, "resnet18": 4}        # ConvNet-8 and ResNet-18 k=4 (docs/theory.md §1)


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values())


class Clock:
    """Elapsed seconds of a block: CUDA events on CUDA, the wall clock elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.stop.record()
            self.stop.synchronize()
            self.seconds = self.start.elapsed_time(self.stop) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def member_configs(model, K, args, device):
    lrs = torch.logspace(-3, -1, K).tolist() if K > 1 else [0.01]
    return [dict(model=model, width=args.width or WIDTHS[model], dataset=args.data, protocol="fixed_sphere",
                 lr=lr, batch_size=args.batch_size, iterations=10**9, log_schedule="every:1000000000",
                 num_stoch_grads=1, entropy=[], seed=0, device=str(device)) for lr in lrs]


def make_runner(model, K, args, device):
    runner = NetworkRunner(member_configs(model, K, args, device), device)
    if args.data == "synthetic":      # CIFAR-shaped; a small training set is enough for the hot loop
        data = load_dataset("synthetic", synthetic_size=(args.train_size, 100), device=device)
        runner.data.x_train, runner.data.y_train = data.x_train, data.y_train
    return runner


def bench_runner(model, K, args, device):
    runner = make_runner(model, K, args, device)
    for t in range(args.warmup):
        runner._step(t)
    with OpCounter() as counter:
        runner._step(args.warmup)
    with Clock(device) as clock:
        for t in range(args.steps):
            runner._step(args.warmup + 1 + t)
    return K * args.steps / clock.seconds, counter.total / K


def vmap_step(model, K, args, device):
    """One forward and backward of K stacked plain models with torch.func (the other candidate)."""
    nets = [build_model(model, args.width or WIDTHS[model], 10, in_channels=3).to(device) for _ in range(K)]
    params, buffers = torch.func.stack_module_state(nets)
    params = {k: v.detach().requires_grad_(v.requires_grad) for k, v in params.items()}
    base = copy.deepcopy(nets[0]).to("meta")
    data = load_dataset("synthetic", synthetic_size=(args.train_size, 100), device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def one(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    def step():
        idx = sample_batch_indices(data.x_train.shape[0], args.batch_size, gen)
        logits = torch.func.vmap(one, in_dims=(0, 0, None), randomness="same")(params, buffers, data.x_train[idx])
        trainable = [v for v in params.values() if v.requires_grad]
        grads = torch.autograd.grad(metrics.member_batch_losses(logits, data.y_train[idx], "ce").sum(), trainable)
        return grads
    return step


def bench_vmap(model, K, args, device):
    step = vmap_step(model, K, args, device)
    for _ in range(args.warmup):
        step()
    with OpCounter() as counter:
        step()
    with Clock(device) as clock:
        for _ in range(args.steps):
            step()
    return K * args.steps / clock.seconds, counter.total / K


def papers_loop(model, args, device):
    """The papers' style of step: module parameters, optim.SGD, per-tensor projection onto the sphere,
    the papers' layer order (conv-BN-ReLU-pool)."""
    net = build_model(model, args.width or WIDTHS[model], 10, in_channels=3).to(device)
    net.pool_first = False
    data = load_dataset("synthetic", synthetic_size=(args.train_size, 100), device=device)
    params = si_parameters(net)
    opt = torch.optim.SGD(params, lr=0.01)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        idx = sample_batch_indices(data.x_train.shape[0], args.batch_size, gen)
        loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            norm = torch.sqrt(sum((p * p).sum() for p in params))
            for p in params:
                p.mul_(1.0 / norm)
    return step


def stopped_runner(model, K, n_stop, compacted, args, device):
    """A bundle of K whose first ``n_stop`` members stopped: parked, or compacted out of the batch."""
    runner = make_runner(model, K, args, device)
    for k in range(n_stop):
        runner._park(k, "stopped")
    if compacted:
        compaction.compact(runner, list(range(n_stop, K)))
    return runner


def bench_stops(model, K, n_stop, args, device):
    """{case: (seconds per bundle step (median over rounds), aten ops per step)}."""
    runners = {"all running": stopped_runner(model, K, 0, False, args, device),
               f"{n_stop} parked": stopped_runner(model, K, n_stop, False, args, device),
               f"{n_stop} compacted": stopped_runner(model, K, n_stop, True, args, device)}
    ops, times = {}, {case: [] for case in runners}
    for case, runner in runners.items():
        for t in range(args.warmup):
            runner._step(t)
        with OpCounter() as counter:
            runner._step(args.warmup)
        ops[case] = counter.total
    for _ in range(args.rounds):
        for case, runner in runners.items():
            with Clock(device) as clock:
                for t in range(args.steps):
                    runner._step(t)
            times[case].append(clock.seconds / args.steps)
    return {case: (sorted(ts)[len(ts) // 2], ops[case]) for case, ts in times.items()}


def timed(step, args, device):
    for _ in range(args.warmup):
        step()
    with Clock(device) as clock:
        for _ in range(args.steps):
            step()
    return args.steps / clock.seconds


def bench_compile(model, args, device):
    """Eager vs torch.compile'd model in the one-member runner, and the papers' loop; same θ?"""
    eager = make_runner(model, 1, args, device)
    compiled = make_runner(model, 1, args, device)
    compiled.net.train_model = torch.compile(compiled.net.model)     # as the runner does for compile: true
    t0 = time.perf_counter()
    compiled._step(0)
    compile_s = time.perf_counter() - t0
    eager._step(0)
    for t in range(1, 6):
        eager._step(t)
        compiled._step(t)
    diff = ((eager.theta - compiled.theta).norm() / eager.theta.norm()).item()
    it = {"eager": timed(lambda: eager._step(0), args, device),
          "compiled": timed(lambda: compiled._step(0), args, device),
          "papers_loop": timed(papers_loop(model, args, device), args, device)}
    return it, compile_s, diff


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["convnet", "resnet18"], choices=list(WIDTHS))
    p.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--width", type=int, default=None, help="default: ConvNet 8, ResNet-18 4")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "digits"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--steps", type=int, default=10, help="timed steps per (model, K)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--mechanisms", action="store_true", help="grouped convs vs torch.func vmap")
    p.add_argument("--compile", action="store_true", help="torch.compile of the one-member step")
    p.add_argument("--stops", type=int, default=0, help="N stopped members: parked vs compacted")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of --stops")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    print(f"device {device}, {args.threads} thread(s), batch {args.batch_size}, data {args.data}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    if args.compile:
        for model in args.models:
            it, compile_s, diff = bench_compile(model, args, device)
            print(f"{model}: it/s eager {it['eager']:.1f}, torch.compile {it['compiled']:.1f} "
                  f"(compile {compile_s:.0f} s; θ after 6 steps differs by {diff:.1e} relative), "
                  f"papers' loop {it['papers_loop']:.1f}; eager / papers {it['eager'] / it['papers_loop']:.2f}, "
                  f"compiled / papers {it['compiled'] / it['papers_loop']:.2f}")
        return 0
    if args.stops:
        for model in args.models:
            for K in args.ks:
                res = bench_stops(model, K, args.stops, args, device)
                full = res["all running"][0]
                for case, (sec, ops) in res.items():
                    print(f"{model:8s} K={K:3d} {case:14s} s/step {sec:8.4f} ({sec / full:5.2f}× all running)  "
                          f"aten ops / step {ops:6d}", flush=True)
        return 0
    for model in args.models:
        base = None
        for K in args.ks:
            rate, ops = bench_runner(model, K, args, device)
            base = base or (rate, ops)
            line = (f"{model:8s} K={K:3d}  member-it/s {rate:8.1f} ({rate / base[0]:5.2f}× K=1)  "
                    f"aten ops / member-it {ops:7.1f} ({ops / base[1]:.3f} of K=1)")
            if args.mechanisms and K > 1:
                vrate, vops = bench_vmap(model, K, args, device)
                line += f"  | vmap fwd+bwd: member-it/s {vrate:8.1f}, ops / member-it {vops:7.1f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
