"""The opt-in variants of the one-member step (docs/DESIGN.md "The single-member step").

``compile: true`` (torch.compile of the training forward and backward) must give eager's numbers by the
bar of the bundle acceptance (tests/test_bundle.py): float32 within 1e-4 over the first 5 steps, float64
within 1e-9 over 100 steps (relative to the distance θ moved), while the measurements stay eager.

``cuda_graph: true`` (trainables/cuda_graph.py). No GPU here: on the CPU the eager stand-in backend runs
the same phases and buffers, which must leave the trajectory bit for bit unchanged; the CUDA graph itself
is only checked where a GPU is present."""
import pytest
import torch

from trainables import cuda_graph
from trainables.network import NetworkRunner


def config(**kw):
    cfg = dict(model="convnet", width=2, dataset="digits", protocol="fixed_sphere", lr=0.02, batch_size=32,
               iterations=12, log_schedule="every:6", running_every=1, num_stoch_grads=2, seed=3, entropy=[],
               device="cpu")
    cfg.update(kw)
    return cfg


def run(cfg):
    runner = NetworkRunner([cfg])
    events = list(runner.run(None))
    return runner, events


def test_replayed_step_gives_the_eager_trajectory_bit_for_bit():
    eager, eager_events = run(config())
    replayed, replayed_events = run(config(cuda_graph=True))
    step = replayed.net._replay
    assert step is not None and step.captured and step.calls == 12       # every step went through it
    assert torch.equal(replayed.theta, eager.theta)
    assert (replayed.theta - replayed.theta0[0]).norm() > 0.05              # it trained
    assert replayed_events == eager_events                                  # log rows and running rows


def test_each_call_runs_the_step_once_and_returns_a_copy_of_the_static_buffer():
    calls = []

    def fn():
        calls.append(1)
        return torch.full((1,), float(len(calls)))

    step = cuda_graph.replayed_step(fn, None, torch.device("cpu"))
    outs = [step() for _ in range(cuda_graph.WARMUP + 4)]
    assert len(calls) == len(outs)                  # the capture did not run the step twice, nor skip it
    assert [o.item() for o in outs] == [float(i + 1) for i in range(len(outs))]
    buffer = step.out
    assert step.captured and buffer.item() == len(outs)
    assert all(o.data_ptr() != buffer.data_ptr() for o in outs[cuda_graph.WARMUP:])   # copies
    step()
    assert step.out is buffer and outs[-1].item() == len(outs)     # the buffer is reused, the copy kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_matches_eager_on_cuda():
    eager, _ = run(config(device="cuda", iterations=30, log_schedule="every:30"))
    graphed, _ = run(config(device="cuda", iterations=30, log_schedule="every:30", cuda_graph=True))
    assert isinstance(graphed.net._replay.backend, cuda_graph.CudaGraphBackend)
    moved = (eager.theta - eager.theta0[0]).norm()
    assert (graphed.theta - eager.theta).norm() <= 1e-4 * moved


def _compiled_against_eager(steps, **kw):
    cfg = config(iterations=10**6, log_schedule="every:1000000", **kw)
    eager, compiled = NetworkRunner([cfg]), NetworkRunner([{**cfg, "compile": True}])
    assert compiled.net.train_model is not compiled.model            # the compiled wrapper trains
    worst = 0.0
    for t in range(steps):
        eager._step(t)
        compiled._step(t)
        moved = (eager.theta - eager.theta0[0]).norm()
        worst = max(worst, ((compiled.theta - eager.theta).norm() / moved).item())
    stats = [torch.stack([b.double().norm() for n, b in r.model.named_buffers() if "running" in n])
             for r in (eager, compiled)]
    return worst, moved / eager.theta.norm(), (stats[1] - stats[0]).abs().max() / stats[0].abs().max()


def test_compiled_step_gives_the_eager_numbers_by_the_bundle_bar():
    """Minutes of compilation on a loaded 2-core machine (the inductor cache makes later runs faster)."""
    worst, moved, bn = _compiled_against_eager(5, width=4, lr=0.03)
    assert moved > 0.1 and worst <= 1e-4 and bn <= 1e-4
    worst, moved, bn = _compiled_against_eager(100, width=2, lr=0.01, dtype="float64")
    assert moved > 0.1 and worst <= 1e-9 and bn <= 1e-9
