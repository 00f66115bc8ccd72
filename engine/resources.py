"""Resources of a grid's trials: parsing ``resources: {cpu, gpu, by}``, what each trial reserves, and
whether the trials fit a cluster. Per-node and memory checks: engine.plan."""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.grid_values import check_value, fmt, same
from trainables.member import BadValue, real, suggest

if TYPE_CHECKING:
    from engine.grid import Grid

RESOURCE_KEYS = ("cpu", "gpu")


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


def check_resources(grid: "Grid", cluster_resources: dict) -> list[str]:
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
                fix = f"lower resources.cpu (e.g. --set resources.cpu={fmt(have_cpu)})"
            else:
                fix = ("a trial on it needs a GPU instead (--set resources.gpu=...); on an autoscaling "
                       "cluster whose head has CPU: 0, give the node types (--cluster-yaml)")
            problems.append(f"resources.cpu: a trial needs {fmt(cpu)} CPU(s) but the cluster has "
                            f"{fmt(have_cpu)}; {fix}")
        if gpu > have_gpu:
            fix = ("set resources.gpu=0 to run on CPU" if have_gpu == 0 and cpu > 0 else
                   "set resources.gpu=0 and resources.cpu=1 to run on CPU" if have_gpu == 0 else
                   f"lower resources.gpu to ≤ {fmt(have_gpu)}")
            problems.append(f"resources.gpu: a trial needs {fmt(gpu)} GPU(s) but the cluster has "
                            f"{fmt(have_gpu)}; {fix}")
    return list(dict.fromkeys(problems))


def _distinct_trial_resources(grid: "Grid") -> list[dict]:
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
            problems.append(f"{loc}.{key}: unknown key{suggest(key, allowed)}; valid: {', '.join(allowed)}")
            continue
        try:
            out[key] = real(f"{key} per trial", ge=0)(value)
        except BadValue as e:
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
            problems.append(f"{loc}: '{axis}' is not an axis{suggest(axis, list(axes))}; "
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
            value = check_value(axis, raw_value, here, problems)
            if value is None:
                continue
            if not isinstance(entry, dict) or not entry:
                problems.append(f"{here}: must be a mapping such as {{gpu: 1}}, got {entry!r}")
                continue
            res = _resource_values(entry, here, problems)
            if not any(same(value, v) for v in axes[axis]):
                warnings.append(f"{here}: {fmt(value)} is not a value of axis {axis} "
                                f"({', '.join(fmt(v) for v in axes[axis])}); it applies to no trial")
            out[axis].append((value, res))
    return out


def trial_resources(grid: "Grid", trial: dict) -> dict:
    """The cpu/gpu one trial reserves: the grid's resources, with its ``by`` entries applied."""
    res = {"cpu": grid.resources["cpu"], "gpu": grid.resources["gpu"]}
    cfg = trial["members"][0][1]
    for axis, entries in grid.resources.get("by", {}).items():
        for value, override in entries:
            if same(cfg[axis], value):
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
                if same(cfg[axis], value):
                    for key, v in override.items():
                        setters.setdefault(key, []).append((f"{axis}={fmt(value)}", v))
        for key, found in setters.items():
            if len({v for _, v in found}) > 1:
                problems.append(f"resources.by: trial {trial['trial_id']} gets {key} from "
                                f"{' and '.join(f'{w} ({fmt(v)})' for w, v in found)}; give it one value")
                return
        res = trial_resources(grid, trial)
        if res["cpu"] == 0 and res["gpu"] == 0:
            problems.append(f"resources: trial {trial['trial_id']} reserves no cpu and no gpu; Ray would "
                            f"start every such trial at once")
            return


