"""``--resume``: find an interrupted sweep's saved Tune state and bring it in line with MLflow before
Tune restores it.

Tune saves its trial states on its own schedule; the tracker closes a member as soon as its last result
arrives. A driver stopped between the two leaves a finished trial that Tune would start again; the
trials whose members MLflow has all closed are marked finished in Tune's saved state first.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from trainables.runner import ENDED


def find_sweep_dir(storage: Path, experiment: str, wanted: str) -> Path:
    """The sweep directory ``--resume`` names, or with "latest" the newest sweep of ``experiment``."""
    if wanted != "latest":
        path = Path(wanted).resolve()
        if not (path / "tuner.pkl").exists():
            raise FileNotFoundError(f"--resume {wanted}: no Tune sweep state (tuner.pkl) in {path}")
        return path
    candidates = sorted((p for p in storage.glob(f"{experiment}_*") if (p / "tuner.pkl").exists()),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--resume: no earlier sweep of experiment '{experiment}' under {storage}; "
                                "run without --resume to start one")
    return candidates[-1]


def restore_tuner(storage: Path, grid, wanted: str, tracking_uri: str, trainable):
    """(Tuner, sweep id) of the interrupted sweep, with the trials MLflow has closed not run again."""
    from ray import tune

    from engine.tracking import member_statuses
    sweep_dir = find_sweep_dir(storage, grid.experiment, wanted)
    closed = {member for member, status in member_statuses(tracking_uri, grid.experiment, sweep_dir.name).items()
              if status in ENDED}
    skipped = skip_finished_trials(sweep_dir, closed)
    if skipped:
        print(f"resume: {len(skipped)} trial(s) whose members had all finished are not run again "
              f"({', '.join(skipped)})", file=sys.stderr)
    tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tuner, sweep_dir.name


def skip_finished_trials(sweep_dir: Path, closed: set[str]) -> list[str]:
    """Mark as TERMINATED, in Tune's newest saved state, every trial whose members MLflow has all closed.

    Runs before ``Tuner.restore``. The grid searcher's saved count of live trials is brought in line
    (else it would wait for the skipped trial forever). Returns our ids of the trials marked now."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))    # Tune restores the newest (max name)
    if not states:
        return []
    data = json.loads(states[-1].read_text())
    marked, ended = [], set()
    for entry in data["trial_data"]:
        state = json.loads(entry[0])
        trial = state["config"]["trial"]
        ids = [member for member, _ in trial["members"]]
        if state["status"] != "TERMINATED" and ids and all(member in closed for member in ids):
            state["status"] = "TERMINATED"
            entry[0] = json.dumps(state, indent=2)
            marked.append(trial["trial_id"])
        if state["status"] in ("TERMINATED", "ERROR"):
            ended.add(state["trial_id"])
    if marked:
        tmp = states[-1].with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, states[-1])
    _release_from_searcher(sweep_dir, ended)
    return marked


def _release_from_searcher(sweep_dir: Path, ended: set[str]) -> None:
    """Drop ended trials (Tune's ids) from the saved grid searcher's live set, which caps concurrency."""
    import ray.cloudpickle as cloudpickle
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.utils.util import _atomic_save
    files = sorted(sweep_dir.glob(BasicVariantGenerator.CKPT_FILE_TMPL.format("*")),
                   key=lambda p: p.stat().st_mtime)                 # Tune restores the newest file
    if not files:
        return
    state = cloudpickle.loads(files[-1].read_bytes())
    live = state.get("_live_trials") if isinstance(state, dict) else None
    if live and live & ended:
        live.difference_update(ended)
        _atomic_save(state, str(sweep_dir), files[-1].name, f"tmp-{files[-1].name}")
