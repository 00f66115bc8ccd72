"""Which code a sweep runs: the git commit, branch and uncommitted diff that its parent run records.

On a cluster the driver often runs from ``ray job submit --working-dir .``, whose upload has no .git;
``python -m engine.tracking record-source`` then writes the submitting checkout's state to
``SOURCE_FILE`` in the working directory, and ``source_info`` finds it there.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from engine import layout

SOURCE_FILE = "thermosweep_source.json"     # the submitting machine's git state, shipped in the working dir


def _git(path: Path, *args) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)
        return out.stdout if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def source_info(path: Path) -> dict:
    """{"commit", "branch", "diff"} of the code that runs: the checkout at ``path`` when it is a git
    work tree; else the file ``record_source`` wrote on the submitting machine (``ray job submit
    --working-dir .`` uploads no .git), found in the working directory; else $THERMOSWEEP_GIT_COMMIT."""
    commit = _git(path, "rev-parse", "HEAD").strip()
    if commit:
        branch = _git(path, "rev-parse", "--abbrev-ref", "HEAD").strip()
        return {"commit": commit, "branch": "" if branch == "HEAD" else branch, "diff": _git(path, "diff", "HEAD")}
    shipped = Path.cwd() / SOURCE_FILE
    if shipped.is_file():
        return json.loads(shipped.read_text())
    return {"commit": os.environ.get("THERMOSWEEP_GIT_COMMIT", "unknown"), "branch": "", "diff": ""}


def record_source(path: Path, out: Path) -> dict:
    """On the submitting machine: write the checkout's commit, branch and uncommitted diff to ``out``."""
    info = source_info(path)
    out.write_text(json.dumps(info))
    return info


def source_tags(info: dict, entry_point: str = "engine.sweep") -> dict:
    """MLflow's standard ``mlflow.source.*`` tags for a sweep of the code described by ``info``."""
    tags = {layout.TAG_SOURCE_NAME: entry_point, layout.TAG_SOURCE_TYPE: "LOCAL",
            layout.TAG_GIT_COMMIT: info["commit"]}
    if info.get("branch"):
        tags[layout.TAG_GIT_BRANCH] = info["branch"]
    return tags
