"""The local Ray that ``engine.sweep`` starts when no ``--address`` is given, and what a killed driver
left of one.

A driver killed with SIGKILL leaves its local Ray's agents running. Each driver therefore marks its Ray
session directory with ``DRIVER_MARK`` (its pid); the next start stops every process of a marked
session whose driver is gone (``reap_killed_drivers``), and touches nothing else.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

DRIVER_MARK = "thermosweep_driver.json"           # in the session directory of a local Ray we started
START_ATTEMPTS = 3      # Ray gives its raylet 30 s to register: on an overloaded machine that can fail once


class LocalRayError(RuntimeError):
    """The local Ray could not be started (nothing of the sweep ran)."""


def start_local_ray(num_cpus: int | None, num_gpus: int | None, attempts: int = START_ATTEMPTS) -> None:
    """A fresh Ray of our own ("local": never one that a crashed earlier ``ray start`` left behind),
    after stopping what killed drivers left; its session is marked as ours. A start that fails (Ray's
    "timed out during startup" on a busy machine) is tried again; after ``attempts`` failures
    :class:`LocalRayError` says what happened and what to do."""
    import ray
    reap_killed_drivers()
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
            break
        except Exception as e:      # Ray raises bare Exception / OSError / RuntimeError here
            ray.shutdown()          # whatever the failed start left running
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if attempt == attempts:
                raise LocalRayError(
                    f"the local Ray did not start ({attempts} attempts; the last said: {why}). Nothing of the "
                    "sweep ran and nothing was written to MLflow. On a busy machine, run again when the load "
                    "is lower (Ray gives its processes 30 s to start) or give the sweep fewer CPUs "
                    "(--num-cpus); otherwise start a Ray yourself (ray start --head) and pass "
                    "--address 127.0.0.1:6379, whose start-up messages say more") from e
            print(f"note: the local Ray did not start ({why}); trying again ({attempt + 1}/{attempts})",
                  file=sys.stderr)
    mark_session()


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def processes_of(session_dir: str) -> list[int]:
    """Processes whose command line names ``session_dir`` (every process of that local Ray does)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(session_dir + end in text + " " for end in ("/", " ", "=")):
            out.append(int(cmdline.parent.name))
    return [pid for pid in out if pid != os.getpid()]


def reap_killed_drivers() -> list[int]:
    """Stop the processes of local Rays whose sweep driver was killed (SIGKILL leaves Ray's agents
    running). Only sessions marked by a driver of ours whose process is gone are touched."""
    from ray._common.utils import get_default_ray_temp_dir
    reaped = []
    for mark in Path(get_default_ray_temp_dir()).glob(f"session_*/{DRIVER_MARK}"):
        if mark.parent.is_symlink():          # session_latest
            continue
        try:
            owner = json.loads(mark.read_text()).get("pid")
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        pids = processes_of(str(mark.parent))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        mark.unlink(missing_ok=True)
        reaped += pids
        if pids:
            print(f"cleaned up {len(pids)} process(es) of the local Ray left by a killed driver (pid {owner}, "
                  f"{mark.parent.name})", file=sys.stderr)
    return reaped


def mark_session() -> None:
    """Mark the running local Ray's session directory with this driver's pid."""
    import ray._private.worker as worker
    node = worker._global_node
    if node is not None:
        Path(node.get_session_dir_path(), DRIVER_MARK).write_text(json.dumps({"pid": os.getpid()}))
