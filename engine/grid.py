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
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.analysis_block import analysis_block_problems  # the report's `analysis:` block
from engine.axes import AXIS_SPECS, expand_axis
from engine.grid_values import check_value, fmt, same
from engine.member_checks import check_members
from engine.resources import (RESOURCE_KEYS, _check_trial_resources, _cluster, _override_resource_everywhere,
                              _parse_resources, check_resources, trials_at_once)
from trainables import member
from trainables.member import BadValue, optional, suggest, whole

TOP_KEYS = ("experiment", "description", "fixed", "axes", "bundle", "resources", "max_concurrent",
            "tracking_uri", "storage_path", "checkpoint_every", "max_failures", "analysis")


class GridError(ValueError):
    """A grid that cannot run. ``problems`` lists every problem found, each starting with its location."""

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        self.source = source
        where = f"grid {source}" if source else "grid"
        lines = [f"{where} has {len(self.problems)} problem(s):"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))



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
        elif len(parts) == 1 and key in member.keys():
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
            options = list(member.keys()) + list(TOP_KEYS) + [f"resources.{r}" for r in RESOURCE_KEYS]
            problems.append(f"{where}: unknown key '{key}'{suggest(key, options)}; use a member key "
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
        """Every grid point as (member_id, full config): the schema's defaults (trainables.member, toy
        defaults included) ← fixed ← axes.

        Order: itertools.product over the axes in file order (the last axis varies fastest).
        """
        names = list(self.axes)
        combos = list(itertools.product(*(self.axes[n] for n in names)))
        width = max(4, len(str(len(combos) - 1)))
        out = []
        for i, combo in enumerate(combos):
            cfg = member.member_config({**self.fixed, **dict(zip(names, combo))})
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
                rows.append([t["trial_id"], mid] + [fmt(cfg[n]) for n in names])
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
                 f"each reserves cpu {fmt(cpu)}, gpu {fmt(gpu)}"]
        if 0 < gpu < 1:
            lines.append(f"{round(1 / gpu)} trials share one GPU")
        for axis, entries in self.resources.get("by", {}).items():
            lines += [f"trials with {axis} {fmt(v)} reserve instead "
                      + ", ".join(f"{k} {fmt(x)}" for k, x in res.items()) for v, res in entries]
        if self.max_concurrent:
            lines.append(f"max_concurrent {self.max_concurrent}")
        if cluster is not None:
            have_cpu, have_gpu = _cluster(cluster)
            problems = check_resources(self, cluster)
            if problems:
                lines += [f"cannot run: {p}" for p in problems]
            else:
                n = trials_at_once(self.resources, cluster, self.max_concurrent, len(trials))
                lines.append(f"cluster cpu {fmt(have_cpu)}, gpu {fmt(have_gpu)}: {n} trial(s) at once, "
                             f"{math.ceil(len(trials) / n)} wave(s)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The effective grid (overrides applied, axes expanded), e.g. to log next to ``source_text``."""
        return {"experiment": self.experiment, "description": self.description, "fixed": self.fixed,
                "axes": self.axes, "bundle": self.bundle, "resources": self.resources,
                "max_concurrent": self.max_concurrent, "tracking_uri": self.tracking_uri,
                "storage_path": self.storage_path, "checkpoint_every": self.checkpoint_every,
                "max_failures": self.max_failures}



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
    top = _top_level(raw, problems)
    problems += analysis_block_problems(raw.get("analysis"))
    fixed, raw_fixed = _parse_fixed(raw, problems)
    axes, raw_axes = _parse_axes(raw, raw_fixed, problems)
    bundle = _parse_bundle(raw, raw_axes, problems)
    resources = _parse_resources(raw.get("resources"), axes, bundle, problems, warnings)
    if problems:
        raise GridError(problems, path)

    grid = Grid(**top, fixed=fixed, axes=axes, bundle=bundle, resources=resources, source_text=text, path=path,
                overrides=list(overrides), warnings=warnings)
    check_members(grid, problems, warnings)
    _check_trial_resources(grid, problems)
    if problems:
        raise GridError(problems, path)
    return grid


def _top_level(raw: dict, problems: list) -> dict:
    """The grid's own settings (everything but fixed, axes, bundle, resources), checked."""
    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"{key}: unknown top-level key{suggest(key, TOP_KEYS)}; valid: {', '.join(TOP_KEYS)}")

    def top(key, check, default):
        if key not in raw:
            return default
        try:
            return check(raw[key])
        except BadValue as e:
            problems.append(f"{key}: {e}")
            return default

    out = {"experiment": top("experiment", member.text("experiment (the MLflow experiment name)"), None)}
    if "experiment" not in raw:
        problems.append("experiment: missing; every grid names its MLflow experiment, e.g. experiment: demo")
    out["description"] = top("description", optional(member.text("description", empty_ok=True)), "") or ""
    out["max_concurrent"] = top("max_concurrent", optional(whole("max_concurrent", 1)), None)
    out["tracking_uri"] = top("tracking_uri", optional(member.text("tracking_uri")), None)
    out["storage_path"] = top("storage_path", optional(member.text("storage_path")), None)
    out["checkpoint_every"] = top("checkpoint_every", whole("checkpoint_every", 0), 0)
    out["max_failures"] = top("max_failures", whole("max_failures (-1 = retry forever)", -1), 2)
    return out


def _unknown_member_key(key, loc) -> str:
    return f"{loc}: unknown key{suggest(key, tuple(member.keys()))}; member keys are listed in docs/DESIGN.md"


def _member_mapping(raw: dict, section: str, shape: str, problems: list) -> dict:
    """The grid's ``section`` (``fixed`` / ``axes``) as a mapping; a problem and {} if it is not one."""
    found = raw.get(section) or {}
    if not isinstance(found, dict):
        problems.append(f"{section}: must be a mapping of {shape}, got {found!r}")
        return {}
    return found


def _parse_fixed(raw: dict, problems: list) -> tuple[dict, dict]:
    """→ (checked fixed values, the raw ``fixed`` mapping)."""
    fixed = {}
    raw_fixed = _member_mapping(raw, "fixed", "member keys", problems)
    for key, value in raw_fixed.items():
        if key not in member.keys():
            problems.append(_unknown_member_key(key, f"fixed.{key}"))
            continue
        v = check_value(key, value, f"fixed.{key}", problems)
        if v is not None or value is None:
            fixed[key] = v
    return fixed, raw_fixed


def _parse_axes(raw: dict, raw_fixed: dict, problems: list) -> tuple[dict, dict]:
    """→ (member key → checked values in file order, the raw ``axes`` mapping)."""
    axes = {}
    raw_axes = _member_mapping(raw, "axes", "member key → values", problems)
    for key, spec in raw_axes.items():
        loc = f"axes.{key}"
        if key not in member.keys():
            problems.append(_unknown_member_key(key, loc))
            continue
        if key in raw_fixed:
            problems.append(f"{loc}: '{key}' is both fixed and an axis; remove it from one of them")
        try:
            values = expand_axis(spec, loc)
        except BadValue as e:
            problems.append(str(e))
            continue
        if not values:
            problems.append(f"{loc}: empty axis; give at least one value")
            continue
        checked = [check_value(key, v, f"{loc}[{i}]", problems) for i, v in enumerate(values)]
        for i in range(1, len(checked)):
            if checked[i] is not None and any(same(checked[i], c) for c in checked[:i]):
                problems.append(f"{loc}[{i}]: value {fmt(checked[i])} repeats; each axis value must be distinct")
        axes[key] = checked
    return axes, raw_axes


def _parse_bundle(raw: dict, raw_axes: dict, problems: list) -> list:
    bundle = raw.get("bundle") or []
    if not isinstance(bundle, list) or not all(isinstance(b, str) for b in bundle):
        problems.append(f"bundle: must be a list of axis names, e.g. [lr], got {bundle!r}")
        bundle = []
    for i, b in enumerate(bundle):
        if b not in raw_axes:
            problems.append(f"bundle[{i}]: '{b}' is not an axis{suggest(b, list(raw_axes))}; "
                            f"axes: {', '.join(raw_axes) or 'none'}")
        elif b in bundle[:i]:
            problems.append(f"bundle[{i}]: '{b}' is listed twice")
    return [b for i, b in enumerate(bundle) if b in raw_axes and b not in bundle[:i]]
