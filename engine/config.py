"""Grid files: load, check and expand one sweep.

A grid YAML holds fixed member settings and axes. Every point of the product of the axes is a *member*
(one training run, keys of docs/DESIGN.md); members that agree on every axis except the *bundled* ones
form one *trial* (one Ray Tune trial, one runner). The grids the papers used are in docs/theory.md §9.

    grid = load_grid("grids/demo.yaml", overrides=["iterations=1500"])
    for trial in grid.trials():
        trial["trial_id"], trial["members"]        # "t000", [("m0000", cfg), ...]

Everything is checked before anything runs: `load_grid` collects every problem, each prefixed by its
location (``axes.lr[2]: ...``), and raises one `GridError` listing them all.

Number parsing: PyYAML reads ``1e-3`` (no dot, no sign on the exponent) as a *string*; numeric keys
accept such strings, and integral floats (``1.6e+6``) for integer keys.

``checkpoint_every`` (our choice): runners report only at log steps, so Tune checkpoints can only be taken
there. ``0`` = checkpoint at every log step; ``N > 0`` = at the first log step at or after each multiple
of N iterations (see `Grid.checkpoint_due`).
"""
from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from engine.analysis_block import analysis_block_problems  # the report's `analysis:` block
from trainables import optimizers
from trainables.defaults import DEFAULT_KS, MEMBER_DEFAULTS  # one source of defaults
from trainables.runner import bundle_conflicts
from trainables.stopping import check_spec as check_stop_spec, network_s_key
from trainables.schedule import log_iterations, window_complete

# Extra keys that only the toys understand (DESIGN.md "Toy keys"); they override MEMBER_DEFAULTS.
MODEL_DEFAULTS = {
    "vmf": {"dim": 3, "noise": 1.0, "mu_seed": 44, "seed": 42},
    "sphere_toy": {"setting": "up"},
}
TOY_KEYS = {key: model for model, keys in MODEL_DEFAULTS.items() for key in keys if key not in MEMBER_DEFAULTS}

ENTROPY_DEFAULTS = {
    "knn": {"window": 1000, "stride": 1, "ks": list(DEFAULT_KS), "evaluate_last": None,
             "evaluate_every": None},
    "kl": {"window": 4000, "stride": 25, "standardize": False, "evaluate_last": None,
           "evaluate_every": None},
}

VALID = {
    "model": {"convnet", "resnet18", "vmf", "sphere_toy"},
    "dataset": {"digits", "cifar10", "cifar100", "synthetic"},
    "protocol": {"fixed_sphere", "fixed_elr", "fixed_lr"},
    "loss": {"ce", "mse"},
    "log_schedule": {"free_energy", "ideal_gas", "sphere_toy", "every:N", "log:N"},
    "setting": {"up", "op"},
    "dtype": {"float32", "float64"},
    "optimizer": set(optimizers.OPTIMIZERS),
    "entropy": set(ENTROPY_DEFAULTS),
}

IMAGES_PER_CLASS = {"cifar10": 5000, "cifar100": 500}  # training split, docs/theory.md §1
NETWORKS = {"convnet", "resnet18"}
STOP_MODELS = NETWORKS | {"vmf"}         # the runners that call trainables.stopping

TOP_KEYS = ("experiment", "description", "fixed", "axes", "bundle", "resources", "max_concurrent",
            "tracking_uri", "storage_path", "checkpoint_every", "max_failures", "analysis")
RESOURCE_KEYS = ("cpu", "gpu")
AXIS_SPECS = ("values", "logspace", "linspace", "geomspace", "segments")


class GridError(ValueError):
    """A grid that cannot run. ``problems`` lists every problem found, each starting with its location."""

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        self.source = source
        where = f"grid {source}" if source else "grid"
        lines = [f"{where} has {len(self.problems)} problem(s):"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class _Bad(Exception):
    """Raised by the value checkers below; the caller adds the location."""


def _suggest(word, options):
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown(kind, word, options):
    return f"unknown {kind}{_suggest(word, options)}; valid: {', '.join(sorted(options))}"


# ----------------------------------------------------------------------------- value checkers

def _as_number(v, what):
    if isinstance(v, bool) or v is None:
        raise _Bad(f"{what} must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v)  # PyYAML leaves 1e-3 as text
        except ValueError:
            raise _Bad(f"{what} must be a number, got text {v!r}") from None
    if not isinstance(v, (int, float, np.integer, np.floating)):
        raise _Bad(f"{what} must be a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(float(v)):
        raise _Bad(f"{what} must be finite, got {v!r}")
    return v


def _int(what, lo=None):
    def check(v):
        v = _as_number(v, what)
        if isinstance(v, (float, np.floating)):
            if not float(v).is_integer():
                raise _Bad(f"{what} must be a whole number, got {v!r}")
        v = int(v)
        if lo is not None and v < lo:
            raise _Bad(f"{what} must be ≥ {lo}, got {v}")
        return v
    return check


def _float(what, gt=None, ge=None):
    def check(v):
        v = float(_as_number(v, what))
        if gt is not None and not v > gt:
            raise _Bad(f"{what} must be > {gt}, got {v:g}")
        if ge is not None and not v >= ge:
            raise _Bad(f"{what} must be ≥ {ge}, got {v:g}")
        return v
    return check


def _choice(key):
    def check(v):
        if not isinstance(v, str):
            raise _Bad(f"{key} must be text, one of {', '.join(sorted(VALID[key]))}; got {v!r}")
        if v not in VALID[key]:
            raise _Bad(f"{key} '{v}': " + _unknown(key, v, VALID[key]))
        return v
    return check


def _text(what):
    def check(v):
        if not isinstance(v, str) or not v:
            raise _Bad(f"{what} must be non-empty text, got {v!r}")
        return v
    return check


def _str(what):
    def check(v):
        if not isinstance(v, str):
            raise _Bad(f"{what} must be text, got {v!r}")
        return v
    return check


def _optional(inner):
    def check(v):
        return None if v is None else inner(v)
    return check


def _log_schedule(v):
    names = VALID["log_schedule"]
    if not isinstance(v, str):
        raise _Bad(f"log_schedule must be text ({', '.join(sorted(names))}), got {v!r}")
    for kind in ("every", "log"):
        if v.startswith(kind + ":"):
            if not re.fullmatch(kind + r":[1-9][0-9]*", v):
                raise _Bad(f"log_schedule '{v}': write {kind}:N with a whole number N ≥ 1, e.g. {kind}:100")
            return v
    if v not in names - {"every:N", "log:N"}:
        raise _Bad(f"log_schedule '{v}': " + _unknown("log_schedule", v, names))
    return v


def _device(v):
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", v):
        raise _Bad(f"device must be auto, cpu, cuda, cuda:N or mps; got {v!r}")
    return v


def _entropy_specs(v):
    """Check a list of estimator specs and fill each one's defaults. Raises _Bad with all problems."""
    if not isinstance(v, list):
        raise _Bad(f"entropy must be a list of estimator specs such as [{{name: knn, window: 1000}}], got {v!r}")
    problems, out, seen = [], [], set()
    for i, spec in enumerate(v):
        here = f"[{i}]"
        if not isinstance(spec, dict):
            problems.append(f"{here}: an estimator spec must be a mapping with a name, got {spec!r}")
            continue
        name = spec.get("name")
        if name not in ENTROPY_DEFAULTS:
            problems.append(f"{here}.name: estimator {name!r}: " + _unknown("estimator", name, VALID["entropy"]))
            continue
        if name in seen:
            problems.append(f"{here}: a second '{name}' spec; its metric names would collide with the first")
        seen.add(name)
        full = {"name": name, **copy.deepcopy(ENTROPY_DEFAULTS[name])}
        checks = {"window": _int("entropy window", 2), "stride": _int("entropy stride", 1),
                  "ks": _ks, "standardize": _bool("standardize"),
                  "evaluate_last": _optional(_int("evaluate_last", 1)),
                  "evaluate_every": _optional(_int("evaluate_every", 1))}
        for key, value in spec.items():
            if key == "name":
                continue
            if key not in full:
                problems.append(f"{here}.{key}: unknown key for estimator {name}{_suggest(key, full)}; "
                                f"valid: {', '.join(sorted(full))}")
                continue
            try:
                full[key] = checks[key](value)
            except _Bad as e:
                problems.append(f"{here}.{key}: {e}")
        out.append(full)
    if problems:
        raise _Bad(problems)
    return out


def _ks(v):
    if not isinstance(v, list) or not v:
        raise _Bad(f"ks must be a non-empty list of neighbour counts, got {v!r}")
    ks = [_int("k", 1)(k) for k in v]
    if len(set(ks)) != len(ks):
        raise _Bad(f"ks has repeated values: {v}")
    return ks


def _bool(what):
    def check(v):
        if not isinstance(v, bool):
            raise _Bad(f"{what} must be true or false, got {v!r}")
        return v
    return check


def _stop_when(v):
    try:
        return check_stop_spec(v)
    except ValueError as e:
        raise _Bad(str(e)) from None


KEY_CHECKS = {
    "model": _choice("model"),
    "width": _int("width", 1),
    "dataset": _choice("dataset"),
    "samples_per_label": _optional(_int("samples_per_label", 1)),
    "loss": _choice("loss"),
    "protocol": _choice("protocol"),
    "lr": _float("learning rate", gt=0),
    "wd": _float("weight decay", ge=0),
    "radius": _float("radius", gt=0),
    "batch_size": _int("batch_size", 1),
    "iterations": _int("iterations", 1),
    "seed": _int("seed", 0),
    "init_seed": _int("init_seed", 0),
    "head_seed": _int("head_seed", 0),
    "data_seed": _int("data_seed", 0),
    "log_schedule": _log_schedule,
    "running_every": _int("running_every", 1),
    "num_stoch_grads": _int("num_stoch_grads", 1),
    "stochastic_entropy": _bool("stochastic_entropy"),
    "entropy": _entropy_specs,
    "data_dir": _text("data_dir"),
    "device": _device,
    "dtype": _choice("dtype"),
    "optimizer": _choice("optimizer"),
    "momentum": _optional(_float("momentum", ge=0)),
    "beta1": _optional(_float("beta1", ge=0)),
    "beta2": _optional(_float("beta2", ge=0)),
    "adam_eps": _optional(_float("adam_eps", gt=0)),
    "dim": _int("dim", 2),
    "noise": _float("noise", ge=0),
    "mu_seed": _int("mu_seed", 0),
    "setting": _choice("setting"),
    "stop_when": _stop_when,
}
MEMBER_KEYS = tuple(KEY_CHECKS)


def _check_value(key, value, loc, problems):
    """Normalise one member value; on failure append located problems and return None."""
    try:
        return KEY_CHECKS[key](value)
    except _Bad as e:
        msgs = e.args[0] if isinstance(e.args[0], list) else [e.args[0]]
        for m in msgs:
            problems.append(f"{loc}{m}" if m.startswith("[") else f"{loc}: {m}")
        return None


# ----------------------------------------------------------------------------- axes

def _spaced(kind, args, loc):
    if not isinstance(args, list) or len(args) != 3:
        raise _Bad(f"{loc}.{kind}: write [start, stop, num], got {args!r}")
    try:
        start = float(_as_number(args[0], "start"))
        stop = float(_as_number(args[1], "stop"))
        num = _int("num", 1)(args[2])
    except _Bad as e:
        raise _Bad(f"{loc}.{kind}: {e}") from None
    fn = {"logspace": np.logspace, "linspace": np.linspace, "geomspace": np.geomspace}[kind]
    if kind == "geomspace" and (start <= 0 or stop <= 0):
        raise _Bad(f"{loc}.geomspace: start and stop must be > 0 (they are values, not exponents)")
    return [float(x) for x in fn(start, stop, num)]


def _expand_axis(spec, loc):
    """An axis spec → list of raw values. Raises _Bad with the problem (location included)."""
    if isinstance(spec, list):
        return list(spec)
    if not isinstance(spec, dict):
        raise _Bad(f"{loc}: an axis is a list of values or a mapping such as {{logspace: [-3, -1, 17]}}, "
                   f"got {spec!r}")
    kinds = [k for k in spec if k in AXIS_SPECS]
    extra = [k for k in spec if k not in AXIS_SPECS and k != "drop_last"]
    if extra:
        raise _Bad(f"{loc}.{extra[0]}: unknown axis spec{_suggest(extra[0], AXIS_SPECS + ('drop_last',))}; "
                   f"use one of {', '.join(AXIS_SPECS)} (+ drop_last)")
    if len(kinds) != 1:
        raise _Bad(f"{loc}: give exactly one of {', '.join(AXIS_SPECS)}, got {sorted(spec)}")
    kind = kinds[0]
    drop_last = spec.get("drop_last", False)
    if not isinstance(drop_last, bool):
        raise _Bad(f"{loc}.drop_last: must be true or false, got {drop_last!r}")
    if kind == "values":
        if not isinstance(spec["values"], list):
            raise _Bad(f"{loc}.values: must be a list, got {spec['values']!r}")
        values = list(spec["values"])
    elif kind == "segments":
        segs = spec["segments"]
        if not isinstance(segs, list) or not segs:
            raise _Bad(f"{loc}.segments: must be a non-empty list of axis specs")
        pieces = [x for i, s in enumerate(segs) for x in _expand_axis(s, f"{loc}.segments[{i}]")]
        values = _sorted_union(pieces, f"{loc}.segments")
    else:
        values = _spaced(kind, spec[kind], loc)
    return values[:-1] if drop_last else values


def _sorted_union(values, loc):
    try:
        nums = sorted(float(_as_number(v, "a segment value")) for v in values)
    except _Bad as e:
        raise _Bad(f"{loc}: {e}") from None
    out = []
    for x in nums:
        if not out or not math.isclose(x, out[-1], rel_tol=1e-12, abs_tol=0.0):
            out.append(x)
    return out


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


# ----------------------------------------------------------------------------- overrides

def _apply_overrides(raw, overrides, problems):
    """Apply ``key=value`` overrides to the raw grid mapping (before validation).

    - ``lr=[0.1, 0.2]`` / ``wd={logspace: [-3, -1, 5]}``: a member key on an axis gets a new axis (a scalar
      gives a one-value axis); a member key not on an axis goes to ``fixed``, unless the value is a list or
      an axis spec (and the key is not ``entropy``), which makes it a new axis.
    - ``fixed.lr=0.1`` pins lr: it leaves the axes (and the bundle). ``axes.width=[8, 64]`` makes an axis.
    - ``resources.gpu=0.5``, ``max_concurrent=2``, ``experiment=x``: top-level keys. A ``resources.cpu``
      or ``resources.gpu`` override applies to every trial: it replaces that key in ``resources.by``.
    """
    for item in overrides:
        where = f"--set {item}"
        if not isinstance(item, str) or "=" not in item:
            problems.append(f"{where}: write key=value, e.g. iterations=1500 or resources.gpu=0.5")
            continue
        key, text = (s.strip() for s in item.split("=", 1))
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            problems.append(f"{where}: the value is not valid YAML ({str(e).splitlines()[0]})")
            continue
        parts = key.split(".")
        for section in ("fixed", "axes", "resources"):
            if raw.get(section) is None:  # missing, or an empty `fixed:` line
                raw[section] = {}
        fixed = raw["fixed"] if isinstance(raw["fixed"], dict) else None
        axes = raw["axes"] if isinstance(raw["axes"], dict) else None
        if len(parts) == 2 and parts[0] in ("fixed", "axes", "resources"):
            section, sub = parts
            target = raw[section]
            if not isinstance(target, dict):
                problems.append(f"{where}: '{section}' is not a mapping in the grid")
                continue
            target[sub] = value
            if section == "resources":
                _override_resource_everywhere(target, sub)
            if section == "fixed" and axes is not None and sub in axes:
                del axes[sub]
                if isinstance(raw.get("bundle"), list) and sub in raw["bundle"]:
                    raw["bundle"] = [b for b in raw["bundle"] if b != sub]
            if section == "axes" and fixed is not None:
                fixed.pop(sub, None)
        elif len(parts) == 1 and key in KEY_CHECKS:
            if fixed is None or axes is None:
                problems.append(f"{where}: 'fixed' and 'axes' must be mappings to take an override")
                continue
            axis_like = isinstance(value, list) or (isinstance(value, dict)
                                                    and any(k in value for k in AXIS_SPECS))
            if key in axes:
                axes[key] = value if axis_like else [value]
            elif axis_like and key != "entropy":
                fixed.pop(key, None)
                axes[key] = value
            else:
                fixed[key] = value
        elif len(parts) == 1 and key in TOP_KEYS:
            raw[key] = value
        else:
            options = list(KEY_CHECKS) + list(TOP_KEYS) + [f"resources.{r}" for r in RESOURCE_KEYS]
            problems.append(f"{where}: unknown key '{key}'{_suggest(key, options)}; use a member key "
                            f"(docs/DESIGN.md), a top-level key, fixed.KEY, axes.KEY or resources.cpu/gpu")


# ----------------------------------------------------------------------------- the grid

def checkpoint_due(every: int, last_checkpoint: int | None, iteration: int) -> bool:
    """The ``checkpoint_every`` rule: at every log step when 0 (or before the first checkpoint),
    else at the first log step at or after each multiple of ``every`` iterations."""
    if last_checkpoint is None or every <= 0:
        return True
    return iteration // every > last_checkpoint // every


@dataclass
class Grid:
    experiment: str
    description: str
    fixed: dict
    axes: dict  # member key → list of normalised values, in file order
    bundle: list
    resources: dict
    max_concurrent: int | None
    tracking_uri: str | None
    storage_path: str | None
    checkpoint_every: int
    max_failures: int
    source_text: str
    path: str | None
    overrides: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def members(self) -> list[tuple[str, dict]]:
        """Every grid point as (member_id, full config): MEMBER_DEFAULTS ← toy defaults ← fixed ← axes.

        Order: itertools.product over the axes in file order (the last axis varies fastest).
        """
        names = list(self.axes)
        combos = list(itertools.product(*(self.axes[n] for n in names)))
        width = max(4, len(str(len(combos) - 1)))
        out = []
        for i, combo in enumerate(combos):
            chosen = {**self.fixed, **dict(zip(names, combo))}
            model = chosen.get("model", MEMBER_DEFAULTS["model"])
            cfg = copy.deepcopy(MEMBER_DEFAULTS)
            cfg.update(copy.deepcopy(MODEL_DEFAULTS.get(model, {})))
            for key, value in chosen.items():
                if TOY_KEYS.get(key, model) == model:
                    cfg[key] = copy.deepcopy(value)
            out.append((f"m{i:0{width}d}", cfg))
        return out

    def trials(self) -> list[dict]:
        """Members grouped by their values on every non-bundled axis, in order of first appearance."""
        members = self.members()
        keys = [n for n in self.axes if n not in self.bundle]
        groups: dict = {}
        for mid, cfg in members:
            groups.setdefault(repr([cfg[k] for k in keys]), []).append((mid, cfg))
        width = max(3, len(str(len(groups) - 1)))
        return [{"trial_id": f"t{j:0{width}d}", "members": ms} for j, ms in enumerate(groups.values())]

    def checkpoint_due(self, last_checkpoint: int | None, iteration: int) -> bool:
        """Whether to checkpoint at this log step (``last_checkpoint`` = iteration of the previous one)."""
        return checkpoint_due(self.checkpoint_every, last_checkpoint, iteration)

    def table(self) -> str:
        """Trials and members with their axis values, one member a line."""
        names = list(self.axes)
        rows = [["trial", "member"] + names]
        for t in self.trials():
            for mid, cfg in t["members"]:
                rows.append([t["trial_id"], mid] + [_fmt(cfg[n]) for n in names])
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        n_members = len(rows) - 1
        head = (f"{self.experiment}: {n_members} member(s) in {len(self.trials())} trial(s); "
                f"axes {', '.join(f'{n}({len(v)})' for n, v in self.axes.items()) or 'none'}; "
                f"bundle [{', '.join(self.bundle)}]")
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)

    def resource_plan(self, cluster: dict | None = None) -> str:
        """How the trials use the cluster: per-trial reservation and how many can run at once."""
        trials = self.trials()
        cpu, gpu = self.resources["cpu"], self.resources["gpu"]
        sizes = sorted({len(t["members"]) for t in trials})
        lines = [f"{len(trials)} trial(s) of {'/'.join(map(str, sizes))} member(s); "
                 f"each reserves cpu {_fmt(cpu)}, gpu {_fmt(gpu)}"]
        if 0 < gpu < 1:
            lines.append(f"{round(1 / gpu)} trials share one GPU")
        for axis, entries in self.resources.get("by", {}).items():
            lines += [f"trials with {axis} {_fmt(v)} reserve instead "
                      + ", ".join(f"{k} {_fmt(x)}" for k, x in res.items()) for v, res in entries]
        if self.max_concurrent:
            lines.append(f"max_concurrent {self.max_concurrent}")
        if cluster is not None:
            have_cpu, have_gpu = _cluster(cluster)
            problems = check_resources(self, cluster)
            if problems:
                lines += [f"cannot run: {p}" for p in problems]
            else:
                n = trials_at_once(self.resources, cluster, self.max_concurrent, len(trials))
                lines.append(f"cluster cpu {_fmt(have_cpu)}, gpu {_fmt(have_gpu)}: {n} trial(s) at once, "
                             f"{math.ceil(len(trials) / n)} wave(s)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The effective grid (overrides applied, axes expanded), e.g. to log next to ``source_text``."""
        return {"experiment": self.experiment, "description": self.description, "fixed": self.fixed,
                "axes": self.axes, "bundle": self.bundle, "resources": self.resources,
                "max_concurrent": self.max_concurrent, "tracking_uri": self.tracking_uri,
                "storage_path": self.storage_path, "checkpoint_every": self.checkpoint_every,
                "max_failures": self.max_failures}


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cluster(cluster):
    cpu = cluster.get("cpu", cluster.get("CPU", 0))
    gpu = cluster.get("gpu", cluster.get("GPU", 0))
    return float(cpu), float(gpu)


def trials_at_once(resources: dict, cluster: dict, max_concurrent: int | None = None,
                   n_trials: int | None = None) -> int:
    """How many trials fit on the cluster at the same time (0 if none fits)."""
    have_cpu, have_gpu = _cluster(cluster)
    limits = []
    if resources["cpu"] > 0:
        limits.append(int(have_cpu / resources["cpu"] + 1e-9))
    if resources["gpu"] > 0:
        limits.append(int(have_gpu / resources["gpu"] + 1e-9))
    for extra in (max_concurrent, n_trials):
        if extra:
            limits.append(extra)
    return min(limits) if limits else 0


def check_resources(grid: Grid, cluster_resources: dict) -> list[str]:
    """Problems that would stop a trial from being scheduled on a cluster of these *total* CPUs/GPUs.

    ``cluster_resources``: ``{"cpu": N, "gpu": M}`` or Ray's ``ray.cluster_resources()`` (``CPU``/``GPU``).
    Every distinct per-trial reservation (``resources.by``) is judged. The advice it gives always passes
    the grid check (never cpu 0 together with gpu 0). Per-node and memory checks: engine.plan.
    """
    have_cpu, have_gpu = _cluster(cluster_resources)
    problems = []
    for res in _distinct_trial_resources(grid):
        cpu, gpu = res["cpu"], res["gpu"]
        if cpu > have_cpu:
            if have_cpu > 0 or gpu > 0:
                fix = f"lower resources.cpu (e.g. --set resources.cpu={_fmt(have_cpu)})"
            else:
                fix = ("a trial on it needs a GPU instead (--set resources.gpu=...); on an autoscaling "
                       "cluster whose head has CPU: 0, give the node types (--cluster-yaml)")
            problems.append(f"resources.cpu: a trial needs {_fmt(cpu)} CPU(s) but the cluster has "
                            f"{_fmt(have_cpu)}; {fix}")
        if gpu > have_gpu:
            fix = ("set resources.gpu=0 to run on CPU" if have_gpu == 0 and cpu > 0 else
                   "set resources.gpu=0 and resources.cpu=1 to run on CPU" if have_gpu == 0 else
                   f"lower resources.gpu to ≤ {_fmt(have_gpu)}")
            problems.append(f"resources.gpu: a trial needs {_fmt(gpu)} GPU(s) but the cluster has "
                            f"{_fmt(have_gpu)}; {fix}")
    return list(dict.fromkeys(problems))


def _distinct_trial_resources(grid: Grid) -> list[dict]:
    found = []
    for trial in grid.trials():
        res = trial_resources(grid, trial)
        if res not in found:
            found.append(res)
    return found


# ----------------------------------------------------------------------------- resources per trial

RESOURCES_BY_HELP = "resources.by: {width: {64: {gpu: 1}}} (axis → axis value → cpu/gpu for those trials)"


def _override_resource_everywhere(res: dict, key: str) -> None:
    """``--set resources.gpu=X`` means every trial: it also replaces that key in the per-axis entries."""
    by = res.get("by")
    if key not in RESOURCE_KEYS or not isinstance(by, dict):
        return
    for axis, values in list(by.items()):
        if isinstance(values, dict):
            for value, entry in list(values.items()):
                if isinstance(entry, dict):
                    entry.pop(key, None)
                    if not entry:
                        del values[value]
            if not values:
                del by[axis]
    if not by:
        del res["by"]


def _resource_values(raw: dict, loc: str, problems: list, allowed=RESOURCE_KEYS) -> dict:
    """cpu/gpu of one resources mapping, checked (each problem located at ``loc.key``)."""
    out = {}
    for key, value in raw.items():
        if key not in allowed:
            problems.append(f"{loc}.{key}: unknown key{_suggest(key, allowed)}; valid: {', '.join(allowed)}")
            continue
        try:
            out[key] = _float(f"{key} per trial", ge=0)(value)
        except _Bad as e:
            problems.append(f"{loc}.{key}: {e}")
    gpu = out.get("gpu", 0.0)
    if 0 < gpu < 1 and abs(1 / gpu - round(1 / gpu)) > 1e-9:
        problems.append(f"{loc}.gpu: {gpu:g} does not split one GPU evenly (1/gpu = {1 / gpu:.4g}); "
                        f"use 1/n, e.g. 0.5, 0.25 or 0.2")
    if gpu > 1 and not float(gpu).is_integer():
        problems.append(f"{loc}.gpu: {gpu:g} GPUs; above 1 a trial must take whole GPUs (2, 3, ...)")
    return out


def _parse_resources(raw_res, axes: dict, bundle: list, problems: list, warnings: list) -> dict:
    """``resources: {cpu, gpu, by}``; ``by`` gives other cpu/gpu to the trials of some axis values."""
    raw_res = {} if raw_res is None else raw_res
    if not isinstance(raw_res, dict):
        problems.append(f"resources: must be a mapping such as {{cpu: 1, gpu: 0.25}}, got {raw_res!r}")
        raw_res = {}
    base = {k: v for k, v in raw_res.items() if k != "by"}
    resources = {"cpu": 1.0, "gpu": 0.0, **_resource_values(base, "resources", problems,
                                                            RESOURCE_KEYS + ("by",))}
    by = _parse_resources_by(raw_res.get("by"), axes, bundle, problems, warnings)
    if by:
        resources["by"] = by
    if resources["cpu"] == 0 and resources["gpu"] == 0 and not by:
        problems.append("resources: a trial must reserve some cpu or gpu, otherwise Ray starts every trial at once")
    return resources


def _parse_resources_by(raw_by, axes: dict, bundle: list, problems: list, warnings: list) -> dict:
    if raw_by is None:
        return {}
    if not isinstance(raw_by, dict):
        problems.append(f"resources.by: must be a mapping, e.g. {RESOURCES_BY_HELP}; got {raw_by!r}")
        return {}
    out = {}
    for axis, entries in raw_by.items():
        loc = f"resources.by.{axis}"
        if axis not in axes:
            problems.append(f"{loc}: '{axis}' is not an axis{_suggest(axis, list(axes))}; "
                            f"axes: {', '.join(axes) or 'none'}")
            continue
        if axis in bundle:
            problems.append(f"{loc}: '{axis}' is bundled, so its values share one trial and one reservation; "
                            f"give resources by a non-bundled axis")
            continue
        if not isinstance(entries, dict):
            problems.append(f"{loc}: must map axis values to {{cpu, gpu}}, e.g. {RESOURCES_BY_HELP}")
            continue
        out[axis] = []
        for raw_value, entry in entries.items():
            here = f"{loc}.{raw_value}"
            value = _check_value(axis, raw_value, here, problems)
            if value is None:
                continue
            if not isinstance(entry, dict) or not entry:
                problems.append(f"{here}: must be a mapping such as {{gpu: 1}}, got {entry!r}")
                continue
            res = _resource_values(entry, here, problems)
            if not any(_same(value, v) for v in axes[axis]):
                warnings.append(f"{here}: {_fmt(value)} is not a value of axis {axis} "
                                f"({', '.join(_fmt(v) for v in axes[axis])}); it applies to no trial")
            out[axis].append((value, res))
    return out


def trial_resources(grid: "Grid", trial: dict) -> dict:
    """The cpu/gpu one trial reserves: the grid's resources, with its ``by`` entries applied."""
    res = {"cpu": grid.resources["cpu"], "gpu": grid.resources["gpu"]}
    cfg = trial["members"][0][1]
    for axis, entries in grid.resources.get("by", {}).items():
        for value, override in entries:
            if _same(cfg[axis], value):
                res.update(override)
    return res


def _check_trial_resources(grid: "Grid", problems: list) -> None:
    """Per-trial rules once ``by`` is applied: no two axes disagree; every trial reserves something."""
    by = grid.resources.get("by", {})
    if not by:
        return
    for trial in grid.trials():
        cfg, setters = trial["members"][0][1], {}
        for axis, entries in by.items():
            for value, override in entries:
                if _same(cfg[axis], value):
                    for key, v in override.items():
                        setters.setdefault(key, []).append((f"{axis}={_fmt(value)}", v))
        for key, found in setters.items():
            if len({v for _, v in found}) > 1:
                problems.append(f"resources.by: trial {trial['trial_id']} gets {key} from "
                                f"{' and '.join(f'{w} ({_fmt(v)})' for w, v in found)}; give it one value")
                return
        res = trial_resources(grid, trial)
        if res["cpu"] == 0 and res["gpu"] == 0:
            problems.append(f"resources: trial {trial['trial_id']} reserves no cpu and no gpu; Ray would "
                            f"start every such trial at once")
            return


# ----------------------------------------------------------------------------- loading

def _read(path_or_dict):
    """→ (raw mapping or None, source text, path, problems)."""
    if isinstance(path_or_dict, dict):
        raw = copy.deepcopy(path_or_dict)
        try:
            text = yaml.safe_dump(raw, sort_keys=False)
        except yaml.YAMLError:  # e.g. tuples or numpy scalars: keep a readable record anyway
            text = repr(raw)
        return raw, text, None, []
    path = str(path_or_dict)
    try:
        text = Path(path).read_text()
    except OSError as e:
        return None, "", path, [f"{path}: cannot read the grid file ({e.strerror})"]
    try:
        raw = yaml.safe_load(text)
        problems = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())
        if getattr(e, "context", None) and ctx is not None:
            why += f" ({e.context} started at line {ctx.line + 1}, column {ctx.column + 1})"
        return None, text, path, [f"{path}: {at}invalid YAML: {why}"]
    return raw, text, path, problems


def _duplicate_keys(node, path):
    """PyYAML keeps the last of two equal keys silently; report them instead."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                if k.value in seen:
                    problems.append(f"{path}: line {k.start_mark.line + 1}: key '{k.value}' repeats line "
                                    f"{seen[k.value]}; keep one")
                seen.setdefault(k.value, k.start_mark.line + 1)
            problems += _duplicate_keys(v, path)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            problems += _duplicate_keys(v, path)
    return problems


def load_grid(path_or_dict, overrides=()) -> Grid:
    """Read, override, check and normalise a grid; raise one GridError listing every problem."""
    raw, text, path, problems = _read(path_or_dict)
    if raw is None and not problems:
        problems.append(f"{path or 'grid'}: the file is empty; a grid needs at least 'experiment'")
    if problems:
        raise GridError(problems, path)
    if not isinstance(raw, dict):
        raise GridError([f"{path or 'grid'}: the top level must be a mapping (experiment:, fixed:, axes:, ...), "
                         f"got {type(raw).__name__}"], path)
    _apply_overrides(raw, list(overrides), problems)
    warnings: list[str] = []

    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"{key}: unknown top-level key{_suggest(key, TOP_KEYS)}; valid: {', '.join(TOP_KEYS)}")

    def top(key, check, default):
        if key not in raw:
            return default
        try:
            return check(raw[key])
        except _Bad as e:
            problems.append(f"{key}: {e}")
            return default

    experiment = top("experiment", _text("experiment (the MLflow experiment name)"), None)
    if "experiment" not in raw:
        problems.append("experiment: missing; every grid names its MLflow experiment, e.g. experiment: demo")
    description = top("description", _optional(_str("description")), "") or ""
    max_concurrent = top("max_concurrent", _optional(_int("max_concurrent", 1)), None)
    tracking_uri = top("tracking_uri", _optional(_text("tracking_uri")), None)
    storage_path = top("storage_path", _optional(_text("storage_path")), None)
    checkpoint_every = top("checkpoint_every", _int("checkpoint_every", 0), 0)
    max_failures = top("max_failures", _int("max_failures (-1 = retry forever)", -1), 2)

    problems += analysis_block_problems(raw.get("analysis"))

    # fixed
    fixed = {}
    raw_fixed = raw.get("fixed") or {}
    if not isinstance(raw_fixed, dict):
        problems.append(f"fixed: must be a mapping of member keys, got {raw_fixed!r}")
        raw_fixed = {}
    for key, value in raw_fixed.items():
        if key not in KEY_CHECKS:
            problems.append(f"fixed.{key}: unknown key{_suggest(key, MEMBER_KEYS)}; "
                            f"member keys are listed in docs/DESIGN.md")
            continue
        v = _check_value(key, value, f"fixed.{key}", problems)
        if v is not None or value is None:
            fixed[key] = v

    # axes
    axes = {}
    raw_axes = raw.get("axes") or {}
    if not isinstance(raw_axes, dict):
        problems.append(f"axes: must be a mapping of member key → values, got {raw_axes!r}")
        raw_axes = {}
    for key, spec in raw_axes.items():
        loc = f"axes.{key}"
        if key not in KEY_CHECKS:
            problems.append(f"{loc}: unknown key{_suggest(key, MEMBER_KEYS)}; member keys are listed in docs/DESIGN.md")
            continue
        if key in raw_fixed:
            problems.append(f"{loc}: '{key}' is both fixed and an axis; remove it from one of them")
        try:
            values = _expand_axis(spec, loc)
        except _Bad as e:
            problems.append(str(e))
            continue
        if not values:
            problems.append(f"{loc}: empty axis; give at least one value")
            continue
        checked = [_check_value(key, v, f"{loc}[{i}]", problems) for i, v in enumerate(values)]
        for i in range(1, len(checked)):
            if checked[i] is not None and any(_same(checked[i], c) for c in checked[:i]):
                problems.append(f"{loc}[{i}]: value {_fmt(checked[i])} repeats; each axis value must be distinct")
        axes[key] = checked

    # bundle
    bundle = raw.get("bundle") or []
    if not isinstance(bundle, list) or not all(isinstance(b, str) for b in bundle):
        problems.append(f"bundle: must be a list of axis names, e.g. [lr], got {bundle!r}")
        bundle = []
    for i, b in enumerate(bundle):
        if b not in raw_axes:
            problems.append(f"bundle[{i}]: '{b}' is not an axis{_suggest(b, list(raw_axes))}; "
                            f"axes: {', '.join(raw_axes) or 'none'}")
        elif b in bundle[:i]:
            problems.append(f"bundle[{i}]: '{b}' is listed twice")
    bundle = [b for i, b in enumerate(bundle) if b in raw_axes and b not in bundle[:i]]

    # resources
    resources = _parse_resources(raw.get("resources"), axes, bundle, problems, warnings)

    if problems:
        raise GridError(problems, path)

    grid = Grid(experiment=experiment, description=description, fixed=fixed, axes=axes, bundle=bundle,
                resources=resources, max_concurrent=max_concurrent, tracking_uri=tracking_uri,
                storage_path=storage_path, checkpoint_every=checkpoint_every, max_failures=max_failures,
                source_text=text, path=path, overrides=list(overrides), warnings=warnings)
    _check_members(grid, problems, warnings)
    _check_trial_resources(grid, problems)
    if problems:
        raise GridError(problems, path)
    return grid


def _check_evaluate_every(cfg, spec, warn):
    """``evaluate_every: M`` keeps the log steps that are multiples of M: say when that leaves none, or
    fewer than ``evaluate_last`` (a log-spaced schedule rarely lands on multiples of M)."""
    n, s, every = spec["window"], spec["stride"], spec["evaluate_every"]
    try:
        steps = [t for t in log_iterations(cfg["log_schedule"], cfg["iterations"])
                 if window_complete(t, n, s) and t % every == 0]
    except ValueError:
        return                       # a bad schedule is reported by its own check
    fix = f"use log_schedule every:N with N dividing {every}, or drop evaluate_every"
    if not steps:
        warn(f"entropy {spec['name']} evaluate_every {every}: no log step of {cfg['log_schedule']} is a "
             f"multiple of {every}; no entropy will be logged ({fix})")
    elif spec.get("evaluate_last") and len(steps) < spec["evaluate_last"]:
        warn(f"entropy {spec['name']} evaluate_every {every}: only {len(steps)} log step(s) of "
             f"{cfg['log_schedule']} are multiples of {every}, fewer than evaluate_last "
             f"{spec['evaluate_last']} ({fix})")


def _check_members(grid, problems, warnings):
    """Checks that depend on several keys at once, run on every member (each message reported once)."""
    found: dict = {}  # (is_problem, message) → member ids

    def note(bucket, msg, mid):
        found.setdefault((bucket is problems, msg), []).append(mid)

    models = set()
    for mid, cfg in grid.members():
        model = cfg["model"]
        models.add(model)
        cap = IMAGES_PER_CLASS.get(cfg["dataset"])
        if model in NETWORKS and cap and cfg["samples_per_label"] and cfg["samples_per_label"] > cap:
            note(problems, f"samples_per_label {cfg['samples_per_label']} exceeds the {cap} training images "
                           f"per class of {cfg['dataset']}", mid)
        if cfg["device"].startswith("cuda") and grid.resources["gpu"] == 0:
            note(problems, f"device {cfg['device']} but resources.gpu is 0: Ray hides the GPUs from such "
                           f"trials; set resources.gpu or device: auto", mid)
        try:
            optimizers.optimizer_config(cfg)
        except ValueError as e:
            note(problems, str(e), mid)
        if model not in NETWORKS and (cfg.get("optimizer") or "sgd") != "sgd":
            note(problems, f"optimizer {cfg['optimizer']}: the toy {model} runs plain SGD only; "
                           "remove optimizer from the grid or use a network model", mid)
        ignored = optimizers.ignored_keys(cfg)
        if ignored:
            note(warnings, f"{', '.join(ignored)} not used by optimizer {cfg.get('optimizer') or 'sgd'}", mid)
        if cfg["protocol"] == "fixed_sphere" and cfg["wd"] > 0:
            note(warnings, f"wd {cfg['wd']:g} is ignored on the fixed sphere", mid)
        if model in NETWORKS and cfg["stop_when"]:
            try:
                network_s_key(cfg["stop_when"], cfg["entropy"], DEFAULT_KS)
            except ValueError as e:
                note(problems, str(e), mid)
        if cfg.get("stochastic_entropy") and model not in NETWORKS:
            note(warnings, f"stochastic_entropy is computed for network models only; {model} ignores it", mid)
        for spec in cfg["entropy"]:
            if (spec["window"] - 1) * spec["stride"] > cfg["iterations"]:
                note(warnings, f"entropy {spec['name']} window {spec['window']}×{spec['stride']} never fills "
                               f"within {cfg['iterations']} iterations; no entropy will be logged", mid)
            elif spec.get("evaluate_every"):
                _check_evaluate_every(cfg, spec, lambda msg: note(warnings, msg, mid))
    if ("stop_when" in grid.fixed or "stop_when" in grid.axes) and models - STOP_MODELS:
        problems.append(f"stop_when: members stop early only for models {', '.join(sorted(STOP_MODELS))}; "
                        f"this grid runs {', '.join(sorted(models - STOP_MODELS))}: remove stop_when")
    for key, model in TOY_KEYS.items():
        if (key in grid.fixed or key in grid.axes) and model not in models:
            where = "fixed" if key in grid.fixed else "axes"
            problems.append(f"{where}.{key}: applies only to model {model}; this grid runs "
                            f"{', '.join(sorted(models))}")
    if grid.bundle and models & NETWORKS:
        refused: dict = {}      # message → trial ids: network members that cannot share one model
        for trial in grid.trials():
            cfgs = [cfg for _, cfg in trial["members"]]
            if cfgs[0]["model"] in NETWORKS:
                for msg in bundle_conflicts(cfgs):
                    refused.setdefault(msg, []).append(trial["trial_id"])
        for msg, tids in refused.items():
            problems.append(f"bundle: trials ({len(tids)}: {', '.join(tids[:3])}{', ...' if len(tids) > 3 else ''}): {msg}")
    for (is_problem, msg), mids in found.items():
        ids = ", ".join(mids[:3]) + (", ..." if len(mids) > 3 else "")
        (problems if is_problem else warnings).append(f"members ({len(mids)}: {ids}): {msg}")
