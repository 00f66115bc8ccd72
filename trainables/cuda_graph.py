"""CUDA graph replay of the one-member training step (docs/DESIGN.md "The single-member step").

On a GPU the ConvNet-8 step is launch-bound: ~85 small kernels whose launch time, not arithmetic, sets
the speed. A CUDA graph records them once and replays them with one launch. The step may be recorded
because everything it touches stays at fixed addresses: the training set on the device, the model's
weights and gradient (views of the flat θ and ∇ the update writes in place), the BN statistics, and the
batch indices, drawn inside the graph from the trial's own generator (registered with the graph, so each
replay advances it as an eager draw would).

``replayed_step(fn, generator, device)`` calls ``fn()`` — a minibatch, forward, backward into ∇, returning the
loss — in three phases: the first ``WARMUP`` calls run it eagerly on a side stream (real steps; CUDA wants
some before a capture, for its allocator and library handles); the next call records it into a graph and
replays it; every later call only replays. The loss comes back as a copy of the graph's output buffer,
which the next replay overwrites.

The recording is done by a backend: ``CudaGraphBackend`` on CUDA. ``EagerBackend`` runs the same
bookkeeping on any device by calling ``fn`` again at each "replay" and copying its output into the
static buffer; the tests use it to check the phases and buffers on the CPU (no GPU here: the CUDA
backend itself is untested, see DESIGN).
"""
from __future__ import annotations

import torch

WARMUP = 3          # eager calls on a side stream before the capture


class EagerBackend:
    """Stand-in recorder for devices without graphs: "replay" calls ``fn`` again into the same buffer."""

    capture_runs_step = True

    def __init__(self, fn):
        self.fn = fn

    def warm(self):
        return self.fn()

    def capture(self):
        return self.fn()

    def replay(self, out):
        out.copy_(self.fn())


class CudaGraphBackend:
    """Warm-up on a side stream, capture into a ``torch.cuda.CUDAGraph``, replay it."""

    capture_runs_step = False      # recording runs nothing: the capturing call replays once

    def __init__(self, fn, generator):
        self.fn, self.generator = fn, generator
        self.graph = None

    def warm(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self):
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.generator)
        with torch.cuda.graph(self.graph):
            out = self.fn()
        return out

    def replay(self, out):
        self.graph.replay()       # writes ``out``, the buffer recorded at capture


class ReplayedStep:
    """``fn()`` eagerly for ``WARMUP`` calls, then captured once and replayed (see the module docstring)."""

    def __init__(self, backend):
        self.backend = backend
        self.calls = 0
        self.out = None            # the static output buffer, fixed at capture

    @property
    def captured(self) -> bool:
        return self.out is not None

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.calls <= WARMUP:
            return self.backend.warm()
        if self.out is None:
            self.out = self.backend.capture()
            if self.backend.capture_runs_step:
                return self.out.clone()
        self.backend.replay(self.out)
        return self.out.clone()


def replayed_step(fn, generator, device) -> ReplayedStep:
    """A ReplayedStep of ``fn`` with the backend for ``device``: CUDA graphs on CUDA, eager elsewhere."""
    backend = CudaGraphBackend(fn, generator) if device.type == "cuda" else EagerBackend(fn)
    return ReplayedStep(backend)
