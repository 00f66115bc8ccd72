"""The Ray Tune function trainable: one trial = one runner over a bundle of members.

It builds the runner on the device Ray gave it (CUDA when a GPU was assigned and exists, else CPU),
restores the runner from Tune's checkpoint after a failure (rebuilding its entropy windows by replay
from the checkpoint's anchor, engine.replay), streams snapshots to the node's reservoir, which
evaluates the windows while the trial trains on (``Reports``), and reports the log steps to Tune in
order, in batches (at most every ``REPORT_EVERY_S`` seconds, and always
with a checkpoint and at the end). A result carries, for each log step since the previous result,
every member's row and running rows; the driver-side MLflow callback (engine.tracking) is the only
thing that writes them anywhere. A checkpoint is only taken together with a report, so a resumed
trial never repeats a log step that was not reported, and never skips one.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time

import ray
import torch
from ray import tune

from engine.grid import checkpoint_due
from engine.replay import AnchorKeeper, AnchorPlan, read_anchor, rebuild_windows
from engine.reservoir import ReservoirSink
from trainables.metrics import variance_terms
from trainables.runner import make_runner

CHECKPOINT_FILE = "runner.pt"
HOLD_S = 300.0          # tests only: how long a trial held by the "hold" fault waits to be killed
HELD_PREFIX = "thermosweep-held-"   # a checkpoint written but not yet handed to Tune: <tmp>/<prefix><trial key>-*
REPORT_EVERY_S = 5.0    # log steps are reported to Tune (and so to MLflow) at most this often, batched
                        # (0.1 s per member for bundles of more than 50 members)


def trial_device(members: list[dict]) -> torch.device:
    wanted = members[0].get("device", "auto")
    if wanted not in (None, "auto"):
        return torch.device(wanted)
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def train_bundle(config: dict) -> None:
    trial = config["trial"]
    member_ids = [mid for mid, _ in trial["members"]]
    members = [dict(cfg) for _, cfg in trial["members"]]
    # as many threads as CPUs Ray gave this trial (resources.by may give it more than the grid's base)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    device = trial_device(members)
    for m in members:
        m["device"] = str(device)
    runner = make_runner(members, device)
    specs = runner.members[0].get("entropy") or []
    key = f"{config.get('sweep_id', 'sweep')}/{trial['trial_id']}"
    clear_held(key)         # what an earlier attempt of this trial held when it was killed
    # entropy is evaluated while the trial trains on, unless the runner itself reads it at the log
    # step (stop_when's rule watches the entropy's standard error): then the trial waits for it
    asynchronous = not any(m.get("stop_when") for m in runner.members)
    sink = ReservoirSink(key, specs, len(members), runner.D, device, asynchronous=asynchronous) if specs else None
    every = int(config.get("checkpoint_every", 0))
    keeper = AnchorKeeper(AnchorPlan(runner.members[0], every)) if specs else None

    restored = _restore(runner, sink, keeper)

    faults = _faults(config.get("_fault_kill_at"))  # tests only: real SIGKILLs of this worker / the reservoir
    # every result costs the driver one MLflow transaction per member: big bundles report less often
    report_every = float(config.get("report_every_s", max(REPORT_EVERY_S, 0.1 * len(members))))
    reports = Reports(member_ids, runner.D, sink, key)
    last_checkpoint, last_report = runner.iteration, time.monotonic()

    for event in runner.run(sink):
        t = event["iteration"]
        if keeper is not None:
            keeper.observe(runner, t)
        reports.add(event, awaits_entropy=sink is not None and t in sink.pending())
        finished = all(s != "running" for s in runner.status)
        reported = []
        if finished or checkpoint_due(every, last_checkpoint, t):
            if reports.held is not None:            # the previous checkpoint still waits for entropy
                reported.append(reports.report(wait=True))
            reports.hold_checkpoint(runner, keeper, t)
            last_checkpoint = t
        elif reports.held is None and time.monotonic() - last_report < report_every:
            continue            # log steps come fast in short runs: hand them over in batches
        reported.append(reports.report(wait=finished))
        for step, with_checkpoint in filter(None, reported):
            last_report = time.monotonic()
            if not restored:
                _inject(faults, step, sink, with_checkpoint)
    if sink is not None:
        sink.close()


def _restore(runner, sink, keeper) -> bool:
    """Load Tune's checkpoint into the freshly built runner, after rebuilding its entropy windows from
    the checkpoint's anchor (they died with the old process); False when there is no checkpoint."""
    restored = tune.get_checkpoint()
    if restored is None:
        return False
    with restored.as_directory() as directory:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        anchor = read_anchor(directory) if sink is not None else None
    if anchor is not None:
        rebuild_windows(runner, sink, keeper, anchor, until=int(state["iteration"]), target=state)
    runner.load_state_dict(state)
    return True


class Reports:
    """The log steps not yet reported to Tune, and the checkpoint that goes with them.

    Entropy is evaluated asynchronously: an event whose entropy is still being computed is held back
    (training goes on) and reported, in order, with a later report once its rows are complete. A
    checkpoint taken at log step c is written at once but handed to Tune only with the report that
    ends at c, so a resumed trial never repeats a reported log step and never skips one."""

    def __init__(self, member_ids: list[str], D: int, sink, key: str = "sweep/trial"):
        self.member_ids, self.D, self.sink, self.key = member_ids, D, sink, key
        self.events: list[dict] = []
        self.awaiting: set[int] = set()
        self.held: tuple[int, str] | None = None        # (log step, checkpoint directory)

    def add(self, event: dict, awaits_entropy: bool) -> None:
        self.events.append(event)
        if awaits_entropy:
            self.awaiting.add(event["iteration"])

    def hold_checkpoint(self, runner, keeper, t: int) -> None:
        directory = tempfile.mkdtemp(prefix=held_prefix(self.key))
        torch.save(runner.state_dict(), os.path.join(directory, CHECKPOINT_FILE))
        if keeper is not None:
            keeper.write(directory, t)
        self.held = (t, directory)

    def _attach(self, wait: bool) -> None:
        if self.sink is None:
            return
        rows_at = dict(self.sink.collect(wait=wait))
        for event in self.events:
            if event["iteration"] in rows_at:
                for row, entropy in zip(event["rows"], rows_at[event["iteration"]]):
                    if row is not None:
                        attach_entropy(row, entropy, self.D)
                self.awaiting.discard(event["iteration"])

    def report(self, wait: bool = False) -> tuple[int, bool] | None:
        """Report the complete events (up to the held checkpoint's step, with it); returns (last
        reported log step, whether a checkpoint went with it) or None when nothing was ready."""
        self._attach(wait)
        n = 0
        while n < len(self.events) and self.events[n]["iteration"] not in self.awaiting:
            n += 1
        if self.held is not None:
            upto = sum(1 for event in self.events if event["iteration"] <= self.held[0])
            if n >= upto:
                n = upto
        if n == 0:
            return None
        batch, self.events = self.events[:n], self.events[n:]
        last = batch[-1]
        metrics = {"iteration": last["iteration"], "member_ids": self.member_ids,
                   "events": [{k: event[k] for k in ("iteration", "rows", "running")} for event in batch],
                   "status": list(last["status"]), "D": self.D,
                   "members_running": sum(s == "running" for s in last["status"])}
        if last.get("regime"):
            metrics["regime"] = list(last["regime"])      # the papers' "converged", per member
        first = next((r for r in last["rows"] if r), None)
        if first is not None and "train_loss" in first:
            metrics["train_loss"] = first["train_loss"]
        if self.held is not None and self.held[0] == last["iteration"]:
            directory = self.held[1]
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
            shutil.rmtree(directory, ignore_errors=True)
            self.held = None
            return last["iteration"], True
        tune.report(metrics)
        return last["iteration"], False


def held_prefix(key: str) -> str:
    """The temp-directory prefix of the checkpoints trial ``key`` (sweep id / trial id) holds."""
    return HELD_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", key) + "-"


def sweep_held_prefix(sweep_id: str) -> str:
    """The prefix shared by the held checkpoints of every trial of sweep ``sweep_id``."""
    return held_prefix(sweep_id + "/")[:-1]          # "<prefix><sweep>_": the key's "/" became "_"


def clear_held(key: str) -> int:
    """Remove the held checkpoints an earlier attempt of trial ``key`` left when it was killed (Tune
    restores from its own copy of each checkpoint it was handed; a held one never was). Returns how many."""
    return _remove_prefixed(held_prefix(key))


def clear_sweep_held(sweep_id: str) -> int:
    """The driver's share of the same cleaning, on its own machine, when a sweep ends or is interrupted:
    what trials of sweep ``sweep_id`` held when they were killed and were not started again (a trial that
    had finished, or a sweep never resumed). Returns how many directories went."""
    return _remove_prefixed(sweep_held_prefix(sweep_id))


def _remove_prefixed(prefix: str) -> int:
    stale = [d for d in os.listdir(tempfile.gettempdir()) if d.startswith(prefix)]
    for d in stale:
        shutil.rmtree(os.path.join(tempfile.gettempdir(), d), ignore_errors=True)
    return len(stale)


def attach_entropy(row: dict, entropy: dict, D: int) -> None:
    """Put a log step's late entropy into its row. σ² and the other variance terms use the window's
    mean radius when there is one (docs/theory.md §3), so rows that carry them are recomputed."""
    row.update(entropy)
    if "sigma2" in row and "window_radius" in entropy:
        row.update(variance_terms(row, entropy["window_radius"], D))


def _faults(spec) -> dict:
    """``_fault_kill_at``: an iteration (kill this worker there) or {"worker": it, "reservoir": it}."""
    if spec is None:
        return {}
    return dict(spec) if isinstance(spec, dict) else {"worker": int(spec)}


def _inject(faults: dict, t: int, sink, checkpoint: bool) -> None:
    """Tests only, first attempt only, at the first report at or after the given iteration: SIGKILL
    the node's reservoir process (once) or this worker; or ("hold": {"at": it, "marker": path}), at
    the first checkpoint there, write ``marker`` and stop there (so that a test can kill the driver
    while this trial is mid-run; the hold ends after HOLD_S if nobody does)."""
    if sink is not None and "reservoir" in faults and t >= faults["reservoir"]:
        del faults["reservoir"]
        os.kill(ray.get(sink.reservoir.pid.remote()), signal.SIGKILL)
    if "worker" in faults and t >= faults["worker"]:
        os.kill(os.getpid(), signal.SIGKILL)
    hold = faults.get("hold")
    if hold and checkpoint and t >= hold["at"]:
        del faults["hold"]
        with open(hold["marker"], "w") as f:
            f.write(str(t))
        end = time.monotonic() + HOLD_S
        while time.monotonic() < end:
            time.sleep(0.5)     # waiting to be killed with the driver, not synchronising anything
