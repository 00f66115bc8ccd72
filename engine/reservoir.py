"""The entropy reservoir: a Ray actor per node that owns the trials' snapshot windows.

A trial never keeps a window of weights. Its ``ReservoirSink`` gathers snapshots into chunks (on the
trial's device, no host synchronisation), moves a full chunk to the host once and ``ray.put``s it into
the node's object store, then hands the ``ObjectRef`` to the reservoir of the *same node*. The reservoir
remembers, per trial and estimator, which chunk holds which iteration, drops a chunk as soon as none of
its snapshots can still fall in a window, and at a log step reads the window back from the local object
store and computes the entropy with ``trainables.sinks.window_entropy`` — the same function the
single-process ``LocalSink`` uses, so both give identical values for the same window.

Memory bound per trial (object store): for each estimator, at most ``(window + chunk − 1)`` snapshots of
``n_members × D × 4`` bytes (float32), e.g. (1000 + 32) × 1 × 24,408 × 4 ≈ 0.10 GB for ConvNet-8 with the k-NN window and
≈ 6.4 GB for ConvNet-64.

Failure semantics: the actor restarts on failure (``max_restarts=-1``) but its state is gone, and so are
the objects of a trial process that died. A window with any snapshot missing is never evaluated: that
member's row gets ``entropy_missing = 1`` and the window refills from the next snapshots on. Every
call from the trial is guarded, so a reservoir problem never fails a trial.
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


class Reservoir:
    """Per-node window keeper (wrapped as a Ray actor by :func:`get_reservoir`)."""

    def __init__(self):
        # trial_key -> {"specs": [...], "index": [dict it -> (chunk_id, row)], "chunks": {id: (ref, its)}}
        self.trials: dict[str, dict] = {}
        self.evaluations = 0
        # Ray gives a 0-CPU actor one thread; the trial that asked waits idle while its entropy is
        # computed, so use the node's cores like the single-process run does (at most 4)
        import os
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
        # several trials share a node's reservoir and the actor serves them on a few threads: the
        # bookkeeping is done under this lock, the entropy computation outside it
        self.lock = threading.Lock()

    def register(self, trial_key: str, specs: list[dict]) -> None:
        with self.lock:
            self.trials[trial_key] = {"specs": [dict(s) for s in specs], "index": [dict() for _ in specs],
                                      "chunks": {}, "next_id": 0}

    def add(self, trial_key: str, iterations: list[int], refs: list) -> None:
        """Take a chunk of snapshots (shape (k, n_members, D)) holding ``iterations``."""
        with self.lock:
            self._add(trial_key, iterations, refs)

    def _add(self, trial_key: str, iterations: list[int], refs: list) -> None:
        st = self.trials.get(trial_key)
        if st is None:              # reservoir restarted: its windows are gone, start afresh
            return
        cid = st["next_id"]
        st["next_id"] += 1
        st["chunks"][cid] = (refs[0], list(iterations))
        for k, spec in enumerate(st["specs"]):
            stride, n = int(spec.get("stride", 1)), int(spec["window"])
            idx = st["index"][k]
            for row, it in enumerate(iterations):
                if it % stride == 0:
                    idx[it] = (cid, row)
            # keep only the n most recent stride-aligned snapshots: older ones are in no future window
            if len(idx) > n:
                for old in sorted(idx)[:-n]:
                    del idx[old]
        self._release(st)

    def _release(self, st: dict) -> None:
        alive = {cid for idx in st["index"] for cid, _ in idx.values()}
        for cid in [c for c in st["chunks"] if c not in alive]:
            del st["chunks"][cid]

    def evaluate(self, trial_key: str, t: int, n_members: int,
                 spec_ids: list[int] | None = None) -> list[dict] | None:
        """Entropy rows at log step t, or None if this reservoir does not know the trial (restarted)."""
        with self.lock:
            st = self.trials.get(trial_key)
            if st is None:
                return None
            jobs = []      # (spec, [(chunk_id, row) or None per window iteration], {chunk_id: ref})
            for k, spec in enumerate(st["specs"]):
                if spec_ids is not None and k not in spec_ids:
                    continue
                n, stride = int(spec["window"]), int(spec.get("stride", 1))
                if not window_complete(t, n, stride):
                    continue
                where = [st["index"][k].get(i) for i in window_iterations(t, n, stride)]
                refs = {w[0]: st["chunks"][w[0]][0] for w in where if w is not None}
                jobs.append((spec, where, refs))
        rows: list[dict] = [{} for _ in range(n_members)]
        cache: dict[int, np.ndarray] = {}
        for spec, where, refs in jobs:
            if any(w is None for w in where):
                for r in rows:
                    r["entropy_missing"] = 1.0
                continue
            try:
                for cid, _ in where:
                    if cid not in cache:
                        cache[cid] = ray.get(refs[cid])
            except Exception as e:  # objects lost with a dead trial process
                log.warning("reservoir: window of %s at %d lost (%s)", trial_key, t, e)
                for r in rows:
                    r["entropy_missing"] = 1.0
                continue
            window = torch.from_numpy(np.stack([cache[cid][row] for cid, row in where], axis=1))
            for m in range(n_members):
                add_window_entropy(rows[m], window_entropy(window[m], spec))
        self.evaluations += 1
        return rows

    def forget(self, trial_key: str) -> None:
        with self.lock:
            self.trials.pop(trial_key, None)

    def stats(self) -> dict:
        return {key: {"chunks": len(st["chunks"]), "snapshots": [len(i) for i in st["index"]]}
                for key, st in self.trials.items()} | {"_evaluations": self.evaluations}

    def pid(self) -> int:
        import os
        return os.getpid()


def reservoir_name(node_id: str) -> str:
    return NAME_PREFIX + node_id


def get_reservoir(node_id: str | None = None):
    """The reservoir of a node (this worker's node by default), created on first use and pinned there."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = node_id or ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(Reservoir)
    return actor_cls.options(
        name=reservoir_name(node_id), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4,
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


class ReservoirSink:
    """The trial's side: chunk snapshots on the device, ship them, ask for entropy at log steps."""

    def __init__(self, trial_key: str, specs: list[dict], n_members: int, D: int, device,
                 reservoir=None, chunk_snapshots: int | None = None):
        self.trial_key, self.specs, self.n_members, self.D = trial_key, [dict(s) for s in specs], n_members, D
        per_snapshot = max(1, n_members * D * 4)
        self.chunk = max(1, min(chunk_snapshots or CHUNK_SNAPSHOTS, CHUNK_BYTES // per_snapshot))
        self.buffer = torch.empty(self.chunk, n_members, D, device=device, dtype=torch.float32)
        self.buffered: list[int] = []
        # the reservoir serves calls on several threads, so our adds may land in any order: wait for
        # all of them (not just the last) before asking for entropy
        self.pending_adds: list = []
        self.reservoir = reservoir if reservoir is not None else get_reservoir()
        self._guard(lambda: ray.get(self.reservoir.register.remote(trial_key, self.specs)))

    def _guard(self, fn, default=None):
        try:
            return fn()
        except Exception as e:  # a reservoir failure must never fail the trial
            log.warning("reservoir call failed for %s: %s", self.trial_key, e)
            return default

    def put(self, it: int, theta: torch.Tensor) -> None:
        self.buffer[len(self.buffered)].copy_(theta, non_blocking=True)
        self.buffered.append(it)
        if len(self.buffered) == self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        k = len(self.buffered)
        ref = ray.put(self.buffer[:k].cpu().numpy().copy())
        its, self.buffered = self.buffered, []
        ref_add = self._guard(lambda: self.reservoir.add.remote(self.trial_key, its, [ref]))
        if ref_add is not None:
            self.pending_adds.append(ref_add)

    def evaluate(self, t: int, spec_ids: list[int] | None = None) -> list[dict]:
        self.flush()
        missing = [{"entropy_missing": 1.0} for _ in range(self.n_members)]
        if self.pending_adds:
            self._guard(lambda: ray.get(self.pending_adds))
            self.pending_adds = []
        rows = self._guard(lambda: ray.get(
            self.reservoir.evaluate.remote(self.trial_key, t, self.n_members, spec_ids)))
        if rows is None:
            # the reservoir restarted (or failed) and lost this trial: register again so that the
            # windows refill from the next snapshots on; this step's entropy is missing
            self._guard(lambda: ray.get(self.reservoir.register.remote(self.trial_key, self.specs)))
            return missing
        return rows

    def close(self) -> None:
        self._guard(lambda: ray.get(self.reservoir.forget.remote(self.trial_key)))

    # the window lives in the reservoir, not in the trial's checkpoint
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
