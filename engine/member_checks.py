"""Grid checks that depend on several member keys at once (run on every member of a loaded grid)."""
from __future__ import annotations

from trainables import member, optimizers
from trainables.runner import bundle_conflicts
from trainables.stopping import network_s_key
from trainables.schedule import log_iterations, window_complete

IMAGES_PER_CLASS = {"cifar10": 5000, "cifar100": 500}  # training split, docs/theory.md §1


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


def check_members(grid, problems, warnings):
    """Checks that depend on several keys at once, run on every member (each message reported once)."""
    found: dict = {}  # (is_problem, message) → member ids

    def note(bucket, msg, mid):
        found.setdefault((bucket is problems, msg), []).append(mid)

    models = set()
    for mid, cfg in grid.members():
        model = cfg["model"]
        models.add(model)
        cap = IMAGES_PER_CLASS.get(cfg["dataset"])
        if model in member.NETWORKS and cap and cfg["samples_per_label"] and cfg["samples_per_label"] > cap:
            note(problems, f"samples_per_label {cfg['samples_per_label']} exceeds the {cap} training images "
                           f"per class of {cfg['dataset']}", mid)
        if cfg["device"].startswith("cuda") and grid.resources["gpu"] == 0:
            note(problems, f"device {cfg['device']} but resources.gpu is 0: Ray hides the GPUs from such "
                           f"trials; set resources.gpu or device: auto", mid)
        try:
            optimizers.optimizer_config(cfg)
        except ValueError as e:
            note(problems, str(e), mid)
        if model not in member.NETWORKS and (cfg.get("optimizer") or "sgd") != "sgd":
            note(problems, f"optimizer {cfg['optimizer']}: the toy {model} runs plain SGD only; "
                           "remove optimizer from the grid or use a network model", mid)
        ignored = optimizers.ignored_keys(cfg)
        if ignored:
            note(warnings, f"{', '.join(ignored)} not used by optimizer {cfg.get('optimizer') or 'sgd'}", mid)
        if cfg["protocol"] == "fixed_sphere" and cfg["wd"] > 0:
            note(warnings, f"wd {cfg['wd']:g} is ignored on the fixed sphere", mid)
        if model in member.NETWORKS and cfg["stop_when"]:
            try:
                network_s_key(cfg["stop_when"], cfg["entropy"], member.DEFAULT_KS)
            except ValueError as e:
                note(problems, str(e), mid)
        if cfg.get("stochastic_entropy") and model not in member.NETWORKS:
            note(warnings, f"stochastic_entropy is computed for network models only; {model} ignores it", mid)
        for spec in cfg["entropy"]:
            if (spec["window"] - 1) * spec["stride"] > cfg["iterations"]:
                note(warnings, f"entropy {spec['name']} window {spec['window']}×{spec['stride']} never fills "
                               f"within {cfg['iterations']} iterations; no entropy will be logged", mid)
            elif spec.get("evaluate_every"):
                _check_evaluate_every(cfg, spec, lambda msg: note(warnings, msg, mid))
    _whole_grid_checks(grid, models, problems, warnings)
    for (is_problem, msg), mids in found.items():
        ids = ", ".join(mids[:3]) + (", ..." if len(mids) > 3 else "")
        (problems if is_problem else warnings).append(f"members ({len(mids)}: {ids}): {msg}")


def _whole_grid_checks(grid, models: set, problems: list, warnings: list) -> None:
    """Checks of the grid as a whole: keys that only some models take, and what may share a bundle."""
    stoppable = set(member.STOP_MODELS)
    if ("stop_when" in grid.fixed or "stop_when" in grid.axes) and models - stoppable:
        problems.append(f"stop_when: members stop early only for models {', '.join(sorted(stoppable))}; "
                        f"this grid runs {', '.join(sorted(models - stoppable))}: remove stop_when")
    for key, model in member.toy_keys().items():
        if (key in grid.fixed or key in grid.axes) and model not in models:
            where = "fixed" if key in grid.fixed else "axes"
            problems.append(f"{where}.{key}: applies only to model {model}; this grid runs "
                            f"{', '.join(sorted(models))}")
    if grid.bundle and models & set(member.NETWORKS):
        refused: dict = {}      # message → trial ids: network members that cannot share one model
        for trial in grid.trials():
            cfgs = [cfg for _, cfg in trial["members"]]
            if cfgs[0]["model"] in member.NETWORKS:
                for msg in bundle_conflicts(cfgs):
                    refused.setdefault(msg, []).append(trial["trial_id"])
        if any(cfg.get(key) for _, cfg in grid.members() for key in ("compile", "cuda_graph")):
            warnings.append("compile / cuda_graph speed up one-member trials only; bundled trials run "
                            "eagerly (set bundle: [] to use them)")
        for msg, tids in refused.items():
            problems.append(f"bundle: trials ({len(tids)}: {', '.join(tids[:3])}{', ...' if len(tids) > 3 else ''}): {msg}")
