"""The entropy reservoir: a Ray actor per node that computes the entropy of the trials' windows.

A trial never keeps a window of weights in its own memory. Its ``ReservoirSink`` gathers snapshots
into chunks (on the trial's device, no host synchronisation), moves a full chunk to the host once and
``ray.put``s it into the node's object store; the trial's process owns these objects. The sink's
:class:`WindowIndex` remembers which chunk holds which iteration and drops a chunk as soon as none of
its snapshots can still fall in a window. At a log step the sink sends the reservoir of the *same
node* the window's chunk references (a few per window, nothing copied); the reservoir reads the chunks
from the local object store without copying them (:class:`ChunkedWindow`) and computes the entropy
with ``trainables.sinks.window_entropy`` — the same function the single-process ``LocalSink`` uses, so
both give identical values for the same window.

The chunks reach the reservoir as top-level arguments of its task, so Ray resolves them before the
task runs and hands it zero-copy views; the reservoir itself never calls ``ray.get``. (It used to, from
its worker threads, on references nested in the arguments: under CPU load one such ``ray.get`` on a
chunk its owner held never returned, and the trial collecting that evaluation waited with it.)

Memory bound per trial (object store): for each estimator, at most ``(window + chunk − 1)`` snapshots of
``n_members × D × 4`` bytes (float32), e.g. (1000 + 32) × 1 × 24,408 × 4 ≈ 0.10 GB for ConvNet-8 with
the k-NN window and ≈ 6.4 GB for ConvNet-64; an evaluation adds one column block (≤ 2^25 float64 values)
and the N × N distance matrix, not a copy of the window (benchmarks/bench_reservoir.py).

Failure semantics: the reservoir holds no state a trial needs: if it dies, Ray restarts it and runs
the pending evaluation again (``max_task_retries=-1``). The windows die with the trial's process; a
restored trial rebuilds them by replay (engine.replay). Every call from the trial is guarded, so a
reservoir problem never fails a trial: that log step's rows get ``entropy_missing = 1`` instead.

Members that left a bundle's batch (trainables.compaction): from then on the trial puts only the rows of
the members still in it, so chunks made before and after hold different member sets. A chunk is
therefore shipped whole with its members (original indices) and the window of member m reads, in each
chunk, the row of m (``ChunkedWindow``); a running member is in every chunk of its windows, since the set
only shrinks. Only the members a log step asks for (the running ones) are evaluated.

Asynchronous mode (the engine's): ``evaluate`` only submits the evaluation and returns empty rows; the
trial keeps training and picks the results up, in log-step order, with :meth:`ReservoirSink.collect`.
"""
from __future__ import annotations

import logging
import threading

import numpy as np
import ray
import torch

from trainables.schedule import window_complete, window_iterations
from trainables.sinks import add_window_entropy, window_entropy

log = logging.getLogger(__name__)
NAMESPACE = "thermosweep"
NAME_PREFIX = "thermosweep-reservoir-"
CHUNK_SNAPSHOTS = 32
CHUNK_BYTES = 256 * 2 ** 20


class WindowIndex:
    """Which chunk holds which snapshot, per estimator spec, with the release rule: a chunk is dropped
    as soon as none of its snapshots is among the ``window`` most recent stride-aligned ones of any
    spec (the trial's sink keeps one; a dropped chunk's object is freed once no evaluation uses it).
    Each chunk remembers the members its rows hold (original indices; None: all, in order)."""

    def __init__(self, specs: list[dict]):
        self.specs = [dict(s) for s in specs]
        self.index: list[dict[int, tuple[int, int]]] = [dict() for _ in self.specs]  # it -> (chunk, row)
        self.chunks: dict[int, tuple] = {}      # chunk id -> (ref, iterations, members)
        self.next_id = 0

    def add(self, iterations: list[int], ref, members: list[int] | None = None) -> None:
        cid, self.next_id = self.next_id, self.next_id + 1
        self.chunks[cid] = (ref, list(iterations), None if members is None else list(members))
        for spec, idx in zip(self.specs, self.index):
            stride, n = int(spec.get("stride", 1)), int(spec["window"])
            for row, it in enumerate(iterations):
                if it % stride == 0:
                    idx[it] = (cid, row)
            if len(idx) > n:    # older snapshots are in no future window
                for old in sorted(idx)[:-n]:
                    del idx[old]
        alive = {c for idx in self.index for c, _ in idx.values()}
        for c in [c for c in self.chunks if c not in alive]:
            del self.chunks[c]

    def window(self, k: int, t: int) -> list | None:
        """[(ref, row, members)] of spec k's window at log step t, oldest first (``members``: the chunk's,
        None for all); None if a snapshot is missing."""
        spec = self.specs[k]
        where = [self.index[k].get(i) for i in window_iterations(t, int(spec["window"]),
                                                                 int(spec.get("stride", 1)))]
        if any(w is None for w in where):
            return None
        return [(self.chunks[cid][0], row, self.chunks[cid][2]) for cid, row in where]

    def live(self) -> list[tuple]:
        """(iterations, ref) of the chunks kept, oldest first."""
        return [(its, ref) for _, (ref, its, _) in sorted(self.chunks.items())]

    def snapshot_counts(self) -> list[int]:
        return [len(i) for i in self.index]


class ChunkedWindow:
    """One member's window (N, D), oldest snapshot first, read straight from the chunks that hold it.

    ``parts``: [(chunk array (k, members, D), [rows], chunk's members or None)]; member ``member``
    (an original index) is read from its own column of every chunk (KeyError: a chunk lacks it).

    The estimators of trainables.entropy read a window only in column blocks (``window[:, a:b]``,
    ``window[:, j]``); each such slice gathers just those columns from the chunks (N × (b − a) floats),
    so an evaluation needs no copy of the whole window: its extra memory is one column block plus the
    N × N distance matrix, whatever D is."""

    column_sliced = True
    dtype = torch.float32

    def __init__(self, parts: list, member: int, device=None):
        self.parts, self.member = parts, member
        self.columns = [member if held is None else held.index(member) if member in held else None
                        for _, _, held in parts]
        if None in self.columns:
            raise KeyError(f"member {member} is not in every chunk of its window")
        self.device = torch.device(device or "cpu")
        self.shape = torch.Size((sum(len(rows) for _, rows, _ in parts), parts[0][0].shape[-1]))

    def dim(self) -> int:
        return 2

    def is_floating_point(self) -> bool:
        return True

    def __getitem__(self, key) -> torch.Tensor:
        rows, cols = key
        if rows != slice(None):
            raise IndexError("a ChunkedWindow is read in column slices only: window[:, a:b] or window[:, j]")
        block = torch.from_numpy(np.concatenate([a[r, c, cols] for (a, r, _), c in zip(self.parts, self.columns)],
                                                axis=0))
        return block.to(self.device, non_blocking=True)


class Reservoir:
    """Per-node entropy evaluator (wrapped as a Ray actor by :func:`get_reservoir`); stateless apart
    from counters."""

    def __init__(self):
        import os
        self.served: dict[str, int] = {}        # evaluations per trial key
        self.evaluations = 0
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Ray gives a 0-CPU actor one thread; use the node's cores like the single-process run (≤ 4)
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
        self.lock = threading.Lock()

    def evaluate(self, trial_key: str, t: int, n_members: int, jobs: list, members: list[int] | None,
                 *chunks) -> list[dict]:
        """Entropy rows at log step t, for ``members`` (None: all; the others' rows stay empty).
        ``jobs``: [(spec, window)] with window = [(chunk number, row, chunk's members)] oldest first, or
        None when a snapshot is missing (that step's rows get entropy_missing); ``chunks``: the chunk
        arrays those numbers point at, which Ray resolved from the trial's object references."""
        rows: list[dict] = [{} for _ in range(n_members)]
        members = range(n_members) if members is None else members
        for spec, where in jobs:
            parts = self._parts(where, chunks)
            for m in members:
                try:
                    window = None if parts is None else ChunkedWindow(parts, m, self.device)
                except KeyError:
                    window = None
                if window is None:
                    rows[m]["entropy_missing"] = 1.0
                else:
                    add_window_entropy(rows[m], window_entropy(window, spec))
        with self.lock:
            self.evaluations += 1
            self.served[trial_key] = self.served.get(trial_key, 0) + 1
        return rows

    @staticmethod
    def _parts(where: list | None, chunks: tuple) -> list | None:
        """The window's parts [(chunk array (k, members, D), [rows], chunk's members)] in window order
        (the arrays are Ray's zero-copy views of the object store), or None if a snapshot is missing."""
        if where is None:
            return None
        parts: list = []
        for number, row, held in where:
            if parts and parts[-1][0] is chunks[number]:
                parts[-1][1].append(row)
            else:
                parts.append((chunks[number], [row], held))
        return parts

    def forget(self, trial_key: str) -> None:
        with self.lock:
            self.served.pop(trial_key, None)

    def stats(self) -> dict:
        with self.lock:
            return {key: {"evaluations": n} for key, n in self.served.items()} | {
                "_evaluations": self.evaluations, "_device": str(self.device)}

    def pid(self) -> int:
        import os
        return os.getpid()


def reservoir_name(node_id: str) -> str:
    return NAME_PREFIX + node_id


def get_reservoir(node_id: str | None = None, num_gpus: float = 0.0):
    """The reservoir of a node (this worker's node by default), created on first use and pinned there.

    With ``num_gpus`` > 0 (the first caller decides) it holds that share of one of the node's GPUs and
    computes there; with 0, Ray hides the GPUs from it and it computes on the node's CPUs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = node_id or ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(Reservoir)
    return actor_cls.options(
        name=reservoir_name(node_id), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=0, num_gpus=num_gpus, max_restarts=-1, max_task_retries=-1, max_concurrency=4,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote()


def _reservoir_names() -> set[str]:
    return {e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
            if e.get("namespace") == NAMESPACE and e.get("name", "").startswith(NAME_PREFIX)}


def shutdown_reservoirs(wait_s: float = 30.0) -> int:
    """Kill every reservoir (the driver does this when a sweep ends) and wait until their names are
    released, so that a reservoir asked for afterwards is a fresh one. Returns how many were killed."""
    import time

    names = _reservoir_names()
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except Exception:
            pass
    deadline = time.monotonic() + wait_s
    while names & _reservoir_names() and time.monotonic() < deadline:
        time.sleep(0.05)          # polling the name registry until the kills have landed
    return len(names)


def by_number(windows: list) -> tuple[list, list]:
    """[(spec, [(chunk ref, row, members)] or None)] -> (the same with each ref replaced by its number in
    the returned list of distinct refs, that list): the refs then travel as top-level task arguments."""
    numbers: dict = {}
    jobs = [(spec, None if where is None else [(numbers.setdefault(ref, len(numbers)), row, held)
                                              for ref, row, held in where])
            for spec, where in windows]
    return jobs, list(numbers)


class ReservoirSink:
    """The trial's side: chunk snapshots on the device, ship them, have windows evaluated at log steps.

    While ``replaying`` (a restored trial rebuilding its windows, engine.replay) snapshots are kept but
    nothing is evaluated. With ``asynchronous=True``, :meth:`evaluate` submits and returns empty rows;
    :meth:`collect` returns the finished evaluations in log-step order.
    """

    def __init__(self, trial_key: str, specs: list[dict], n_members: int, D: int, device,
                 reservoir=None, chunk_snapshots: int | None = None, asynchronous: bool = False):
        self.trial_key, self.specs, self.n_members, self.D = trial_key, [dict(s) for s in specs], n_members, D
        per_snapshot = max(1, n_members * D * 4)
        self.chunk = max(1, min(chunk_snapshots or CHUNK_SNAPSHOTS, CHUNK_BYTES // per_snapshot))
        self.buffer = torch.empty(self.chunk, n_members, D, device=device, dtype=torch.float32)
        self.buffered: list[int] = []
        self.members: list[int] | None = None     # the members of the buffered snapshots (None: all)
        self.windows = WindowIndex(self.specs)
        self.replaying = False
        self.asynchronous = asynchronous
        self.outstanding: list[tuple[int, object]] = []     # (log step, result ref), oldest first
        self.reservoir = reservoir if reservoir is not None else get_reservoir()

    def _guard(self, fn, default=None):
        try:
            return fn()
        except Exception as e:  # a reservoir failure must never fail the trial
            log.warning("reservoir call failed for %s: %s", self.trial_key, e)
            return default

    def put(self, it: int, theta: torch.Tensor, members: list[int] | None = None) -> None:
        """Buffer the snapshot of iteration ``it``: one row per member, or per member of ``members``
        (original indices); a change of members closes the chunk (a chunk holds one member set)."""
        if members is not None and len(members) == self.n_members:
            members = None
        if self.buffered and members != self.members:
            self.flush()
        self.members = None if members is None else list(members)
        self.buffer[len(self.buffered), :theta.shape[0]].copy_(theta, non_blocking=True)
        self.buffered.append(it)
        if len(self.buffered) == self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        k, n = len(self.buffered), self.n_members if self.members is None else len(self.members)
        ref = ray.put(self.buffer[:k, :n].cpu().numpy().copy())
        its, self.buffered = self.buffered, []
        self.windows.add(its, ref, self.members)

    def _missing(self) -> list[dict]:
        return [{"entropy_missing": 1.0} for _ in range(self.n_members)]

    def evaluate(self, t: int, spec_ids: list[int] | None = None, members: list[int] | None = None) -> list[dict]:
        """Entropy rows at log step t for ``members`` (default all), or empty rows (asynchronous: see
        ``collect``)."""
        if self.replaying:
            return [{} for _ in range(self.n_members)]
        self.flush()
        windows = [(spec, self.windows.window(k, t)) for k, spec in enumerate(self.specs)
                   if (spec_ids is None or k in spec_ids)
                   and window_complete(t, int(spec["window"]), int(spec.get("stride", 1)))]
        jobs, chunks = by_number(windows)
        ref = self._guard(lambda: self.reservoir.evaluate.remote(self.trial_key, t, self.n_members, jobs, members,
                                                                  *chunks))
        if not self.asynchronous:
            return self._result(ref)
        self.outstanding.append((t, ref))
        return [{} for _ in range(self.n_members)]

    def _result(self, ref) -> list[dict]:
        rows = None if ref is None else self._guard(lambda: ray.get(ref))
        return rows if rows is not None else self._missing()

    def pending(self) -> list[int]:
        """Log steps whose evaluation has not been collected yet."""
        return [t for t, _ in self.outstanding]

    def collect(self, wait: bool = False) -> list[tuple[int, list[dict]]]:
        """[(log step, rows)] of the evaluations finished so far (all of them if ``wait``), in order."""
        out = []
        while self.outstanding:
            t, ref = self.outstanding[0]
            if not wait and ref is not None and not ray.wait([ref], timeout=0)[0]:
                break
            self.outstanding.pop(0)
            out.append((t, self._result(ref)))
        return out

    def close(self) -> None:
        self.collect(wait=True)
        self._guard(lambda: ray.get(self.reservoir.forget.remote(self.trial_key)))

    # the window lives in the object store (owned by this process), not in the trial's checkpoint: a
    # restored trial rebuilds it by replay (engine.replay)
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
