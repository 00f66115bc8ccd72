"""The MLflow layout of a sweep: every name and encoding that the writer and the reader share.

``engine.tracking`` writes a sweep this way and ``analysis.load`` reads it back; neither spells a tag
name, a metric prefix or a param encoding itself. Plain constants and functions only: no Ray, no MLflow
(the analysis imports this module on machines that have neither running).

- Experiment: the grid's ``experiment`` name, tagged ``EXPERIMENT_TAGS`` (MLflow 3's UI then shows the
  runs table).
- One parent run per sweep: ``TAG_ROLE = ROLE_SWEEP``, ``TAG_SWEEP_ID``, ``TAG_GRID`` (grid file name),
  ``TAG_SWEEP_STATUS`` (``running``, ``finished``, ``interrupted``), MLflow's ``mlflow.source.*`` tags
  and run note, params ``bundle``, ``axes``, ``resources`` …, artifact ``grid.yaml``.
- One child run per member: ``TAG_PARENT_RUN`` = the parent's run id, ``TAG_ROLE = ROLE_MEMBER``,
  ``TAG_MEMBER_ID``, ``TAG_SWEEP_ID``, ``TAG_STATUS`` (trainables.runner's statuses, ``pending`` before
  the trial starts), ``TAG_REGIME`` (converged / stationary / diverged / failed), ``TAG_ERROR`` (the end
  of a failed trial's error file); params = every member key (``encode_param``) plus ``D``.
- Metrics: every log metric under its own name with ``step = iteration``; running metrics under
  ``RUNNING_PREFIX + name`` (``running/radius_preproj``), also with ``step = iteration``.
"""
from __future__ import annotations

import json

# ---- tags ---------------------------------------------------------------------------------------
TAG_ROLE = "thermosweep.role"                 # ROLE_SWEEP on the parent run, ROLE_MEMBER on a child
TAG_SWEEP_ID = "thermosweep.sweep_id"         # on both: the sweep's id (the Tune experiment's name)
TAG_GRID = "thermosweep.grid"                 # parent: the grid file's name
TAG_SWEEP_STATUS = "thermosweep.sweep_status"  # parent: running / finished / interrupted
TAG_MEMBER_ID = "thermosweep.member_id"       # child: the member's id in the grid (m0000, …)
TAG_STATUS = "thermosweep.status"             # child: pending, running or one of the runner's statuses
TAG_REGIME = "thermosweep.regime"             # child: converged / stationary / diverged / failed
TAG_ERROR = "thermosweep.error"               # child of a failed trial: the end of its error file
TAG_PARENT_RUN = "mlflow.parentRunId"         # MLflow's own parent link (its UI nests the runs)
TAG_NOTE = "mlflow.note.content"              # MLflow's run note: the grid's description
SOURCE_TAG_PREFIX = "mlflow.source."          # MLflow's source tags, copied from the parent to every child
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_BRANCH = "mlflow.source.git.branch"
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}

ROLE_SWEEP, ROLE_MEMBER = "sweep", "member"

# ---- metrics ------------------------------------------------------------------------------------
RUNNING_PREFIX = "running/"


def running_metric(name: str) -> str:
    """The MLflow key of running metric ``name``."""
    return RUNNING_PREFIX + name


def is_running_metric(key: str) -> bool:
    return key.startswith(RUNNING_PREFIX)


# ---- run names and searches ---------------------------------------------------------------------
NAME_KEYS = ("model", "width", "protocol", "lr", "wd")     # the member keys a child run's name shows


def sweep_run_name(grid_name: str, sweep_id: str) -> str:
    return f"sweep {grid_name} {sweep_id}"


def member_run_name(member_id: str, config: dict) -> str:
    return f"{member_id} " + " ".join(f"{key}={config[key]}" for key in NAME_KEYS if key in config)


def tags_equal(tags: dict) -> str:
    """An MLflow ``search_runs`` filter string: every tag of ``tags`` has its value."""
    return " and ".join(f"tags.`{name}` = '{value}'" for name, value in tags.items())


# ---- params -------------------------------------------------------------------------------------
PARAM_MAX_CHARS = 6000          # MLflow's limit on a param value (longer values are cut)

# MLflow stores every param as text; decoding restores the member keys' types from the member schema
# (trainables/member.py, Key.kind)
PARAM_KINDS = {"D": int}     # params the tracker adds beside the member keys (whose types the schema owns)
_PYTHON_WORDS = {"None": None, "True": True, "False": False}


def encode_param(value) -> str:
    """A param value as MLflow stores it: lists, dicts and None as JSON, anything else as ``str``."""
    text = json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)
    return text[:PARAM_MAX_CHARS]


def _kind(key: str):
    """The type a param decodes to: the member schema's for a member key (imported on first use, so that
    importing this module stays free of torch), else PARAM_KINDS'."""
    if key in PARAM_KINDS:
        return PARAM_KINDS[key]
    from trainables import member
    known = member.keys().get(key)
    return known.kind if known is not None else None


def decode_param(key: str, text: str | None):
    """An MLflow param string back to its value: JSON (numbers, lists, dicts, null), Python's
    None/True/False, else the string. Known float/int keys are coerced (``lr`` = "1" → 1.0)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        value = _PYTHON_WORDS.get(text, text)
    if value is None or isinstance(value, bool):
        return value
    kind = _kind(key)
    try:
        if kind is float:
            return float(value)
        if kind is int:
            number = float(value)
            return int(number) if number.is_integer() else number
    except (TypeError, ValueError):
        pass
    return value
