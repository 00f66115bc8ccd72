"""The driver's ordered queue of MLflow writes, which lets a tracking outage delay a sweep, not stop it.

Every write of the tracker goes through one ``Outbox``: while the store does not answer, writes wait in
memory (at most ``THERMOSWEEP_TRACKING_BUFFER`` operations), the driver says so once and keeps running,
and when the store answers again everything is written in order. MLflow's own HTTP retries (minutes) are
bounded for the driver, so a retry never freezes Tune. If the buffer fills, or the store is still down
when the sweep ends, the writes go to a JSON-lines file next to the sweep's state, and ``replay``
(``python -m engine.tracking replay FILE``) writes them once the store is back.

A write is a JSON-able dict: ``op`` (an MlflowClient method), ``run_id`` and that method's arguments.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

# the driver's MLflow HTTP client: no retry loop of its own (the queue retries), bounded requests
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
RETRY_EVERY_S = 2.0             # while the store is down, try again at most this often
BUFFER_OPS = int(os.environ.get("THERMOSWEEP_TRACKING_BUFFER", "200000"))
# MLflow error codes that mean "this write is wrong", not "the store is away": such a write is dropped
# with a warning instead of holding up the queue
REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
            "INVALID_STATE"}
SIMPLE_OPS = ("set_tag", "log_param", "set_terminated", "update_run")   # client.<op>(run_id, **arguments)


def mlflow_client(tracking_uri: str):
    """An MlflowClient with the driver's bounded HTTP behaviour (``HTTP_ENV``, unless set already)."""
    for name, value in HTTP_ENV.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri)


class Outbox:
    """Ordered MLflow writes to one store, buffered through outages and saved to ``spill_path`` when the
    store stays away. Holds a client and a queue: not picklable state (the tracker rebuilds it)."""

    def __init__(self, tracking_uri: str, spill_path: Path):
        self.tracking_uri, self.spill_path = tracking_uri, spill_path
        self._client = None
        self._queue: collections.deque = collections.deque()
        self._down_since: float | None = None
        self._next_try = 0.0
        self.spilled = False            # every write now goes to spill_path

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def write(self, op: str, run_id: str, **arguments) -> None:
        """Queue one write (``op`` names an MlflowClient method) and send what the store takes now."""
        self._queue.append({"op": op, "run_id": run_id, **arguments})
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send queued writes in order; True when the queue is empty. While the store is down this
        tries at most every RETRY_EVERY_S (or now, with ``force``)."""
        if self.spilled:
            self._spill_queue()
            return False
        if self._down_since is not None and not force and time.monotonic() < self._next_try:
            return self._check_bound()
        while self._queue:
            try:
                apply_op(self.client, self._queue[0])
            except Exception as error:      # noqa: BLE001 - an outage is whatever the client raises
                if not rejected(error):
                    self._outage(error)
                    return self._check_bound()
                print(f"tracking: MLflow refused {self._queue[0]['op']} for run {self._queue[0]['run_id']} "
                      f"({short_error(error)}); skipped", file=sys.stderr)
            self._queue.popleft()
        if self._down_since is not None:
            print(f"tracking: the MLflow store at {self.tracking_uri} answers again after "
                  f"{time.monotonic() - self._down_since:.0f} s; every buffered result is written", file=sys.stderr)
            self._down_since = None
        return True

    def _outage(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            print(f"tracking: the MLflow store at {self.tracking_uri} does not answer ({short_error(error)}). "
                  f"The sweep keeps running; results wait in memory (up to {BUFFER_OPS} writes) and are "
                  f"written in order when the store answers again (tried every {RETRY_EVERY_S:.0f} s).",
                  file=sys.stderr)
        self._next_try = time.monotonic() + RETRY_EVERY_S

    def _check_bound(self) -> bool:
        if len(self._queue) > BUFFER_OPS:
            self.give_up(f"more than {BUFFER_OPS} writes waited")
        return False

    def give_up(self, why: str) -> None:
        """Move the queue (and every later write) to the file that ``replay`` sends to the store."""
        self.spilled = True
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self._spill_queue()
        print(f"tracking: the MLflow store at {self.tracking_uri} is still unreachable ({why}); its writes "
              f"are saved in {self.spill_path}. The sweep goes on. When the store is back, write them with:\n"
              f"  {replay_command(self.spill_path, self.tracking_uri)}", file=sys.stderr)

    def _spill_queue(self) -> None:
        with open(self.spill_path, "a") as f:
            while self._queue:
                f.write(json.dumps(self._queue.popleft()) + "\n")

    def drain(self, wait_s: float) -> None:
        """At the end of a sweep: keep trying for up to ``wait_s`` seconds, then save what is left."""
        deadline = time.monotonic() + wait_s
        while not self.flush(force=True) and not self.spilled and time.monotonic() < deadline:
            time.sleep(min(RETRY_EVERY_S, max(0.0, deadline - time.monotonic())))   # retry pacing
        if self._queue and not self.spilled:
            self.give_up(f"still down {wait_s:.0f} s after the sweep ended")
        elif self.spilled:
            print(f"tracking: writes of this sweep wait in {self.spill_path}; when the store is back run\n"
                  f"  {replay_command(self.spill_path, self.tracking_uri)}", file=sys.stderr)


def apply_op(client, op: dict) -> None:
    """Send one queued write (a JSON-able dict, see ``Outbox.write``) with ``client``."""
    arguments = {k: v for k, v in op.items() if k not in ("op", "run_id")}
    if op["op"] == "log_batch":
        from mlflow.entities import Metric
        client.log_batch(op["run_id"], metrics=[Metric(*m) for m in arguments["metrics"]])
    elif op["op"] in SIMPLE_OPS:
        getattr(client, op["op"])(op["run_id"], **arguments)
    else:
        raise ValueError(f"unknown tracking operation {op['op']!r}")


def rejected(error: Exception) -> bool:
    return getattr(error, "error_code", None) in REJECTED


def short_error(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


def replay_command(path, tracking_uri) -> str:
    return f"python -m engine.tracking replay {path} --tracking-uri {tracking_uri}"


def replay(path, tracking_uri: str) -> int:
    """Write a saved buffer to the store, in order. What could not be written stays in the file (so the
    command can simply be run again); returns the number of writes sent."""
    client = mlflow_client(tracking_uri)
    path = Path(path)
    ops = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    sent = 0
    try:
        for op in ops:
            try:
                apply_op(client, op)
            except Exception as error:      # noqa: BLE001
                if not rejected(error):
                    raise
                print(f"MLflow refused {op['op']} for run {op['run_id']} ({short_error(error)}); skipped",
                      file=sys.stderr)
            sent += 1
    finally:
        rest = ops[sent:]
        if rest:
            path.write_text("".join(json.dumps(op) + "\n" for op in rest))
        else:
            path.unlink()
    return sent
