"""The member schema: every key of one training run (docs/DESIGN.md, "Trial configuration"), once.

Each key has its name, default, check (raw value → normalised value, or `BadValue` naming the problem
and the fix), one-line meaning (the CLI's --help, the docs) and the models that use it. The grid loader
(engine/grid.py), the single-trial CLI (trainables/cli.py), the runners and the MLflow reader
(engine/layout.decode_param, through `Key.kind`) all read it. Names of models, protocols, datasets, losses and optimizers come from the
modules that own them; each toy (trainables/toys/*) registers its own keys and defaults.

    member_config({"model": "vmf", "lr": 0.1})     # a full member: defaults applied once, here
    KEYS["lr"].check("1e-3")                       # 0.001 (PyYAML leaves 1e-3 as text)

Numbers: text that parses as a number is accepted (PyYAML reads ``1e-3`` as a string); integral floats
are accepted for integer keys.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from trainables import data, entropy, models, optimizers, protocols, schedule
from trainables.stopping import check_spec as check_stop_spec

DEFAULT_KS = list(entropy.DEFAULT_KS)     # a member config holds lists (YAML, JSON)
TOY_MODULES = ("trainables.toys.vmf", "trainables.toys.sphere")   # each registers MODEL, KEYS, DEFAULTS
ABSENT = object()   # default of a key that stays out of a member unless it is set (e.g. dtype)


class BadValue(ValueError):
    """A value a key refuses. ``args[0]`` is the message, or a list of located messages (entropy)."""


def suggest(word, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind, word, options) -> str:
    return f"unknown {kind}{suggest(word, options)}; valid: {', '.join(sorted(options))}"


# ----------------------------------------------------------------------------- value checks

def as_number(v, what):
    if isinstance(v, bool) or v is None:
        raise BadValue(f"{what} must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v)  # PyYAML leaves 1e-3 as text
        except ValueError:
            raise BadValue(f"{what} must be a number, got text {v!r}") from None
    if not isinstance(v, (int, float, np.integer, np.floating)):
        raise BadValue(f"{what} must be a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(float(v)):
        raise BadValue(f"{what} must be finite, got {v!r}")
    return v


def whole(what, lo=None):
    def check(v):
        v = as_number(v, what)
        if isinstance(v, (float, np.floating)) and not float(v).is_integer():
            raise BadValue(f"{what} must be a whole number, got {v!r}")
        v = int(v)
        if lo is not None and v < lo:
            raise BadValue(f"{what} must be ≥ {lo}, got {v}")
        return v
    return check


def real(what, gt=None, ge=None):
    def check(v):
        v = float(as_number(v, what))
        if gt is not None and not v > gt:
            raise BadValue(f"{what} must be > {gt}, got {v:g}")
        if ge is not None and not v >= ge:
            raise BadValue(f"{what} must be ≥ {ge}, got {v:g}")
        return v
    return check


def choice(key, names: Callable[[], Any]):
    """One of ``names()`` (read when checking, so registries filled later count)."""
    def check(v):
        valid = set(names())
        if not isinstance(v, str):
            raise BadValue(f"{key} must be text, one of {', '.join(sorted(valid))}; got {v!r}")
        if v not in valid:
            raise BadValue(f"{key} '{v}': " + unknown(key, v, valid))
        return v
    return check


def text(what, empty_ok=False):
    def check(v):
        if not isinstance(v, str) or not (v or empty_ok):
            raise BadValue(f"{what} must be {'' if empty_ok else 'non-empty '}text, got {v!r}")
        return v
    return check


def flag(what):
    def check(v):
        if not isinstance(v, bool):
            raise BadValue(f"{what} must be true or false, got {v!r}")
        return v
    return check


def optional(inner):
    def check(v):
        return None if v is None else inner(v)
    return check


def _log_schedule(v):
    names = set(schedule.SCHEDULES)
    if not isinstance(v, str):
        raise BadValue(f"log_schedule must be text ({', '.join(sorted(names))}), got {v!r}")
    for kind in ("every", "log"):
        if v.startswith(kind + ":"):
            if not re.fullmatch(kind + r":[1-9][0-9]*", v):
                raise BadValue(f"log_schedule '{v}': write {kind}:N with a whole number N ≥ 1, e.g. {kind}:100")
            return v
    if v not in names - {"every:N", "log:N"}:
        raise BadValue(f"log_schedule '{v}': " + unknown("log_schedule", v, names))
    return v


def _device(v):
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", v):
        raise BadValue(f"device must be auto, cpu, cuda, cuda:N or mps; got {v!r}")
    return v


def stop_when(v):
    try:
        return check_stop_spec(v)
    except ValueError as e:
        raise BadValue(str(e)) from None


def _ks(v):
    if not isinstance(v, list) or not v:
        raise BadValue(f"ks must be a non-empty list of neighbour counts, got {v!r}")
    ks = [whole("k", 1)(k) for k in v]
    if len(set(ks)) != len(ks):
        raise BadValue(f"ks has repeated values: {v}")
    return ks


def _dtypes():
    from trainables.network import DTYPES   # the network runner owns its dtypes (imported late: no cycle)
    return DTYPES


# ----------------------------------------------------------------------------- entropy estimator specs

# each estimator's keys in member order, with their defaults (docs/DESIGN.md, entropy estimator specs)
ESTIMATORS = {
    "knn": {"window": 1000, "stride": 1, "ks": DEFAULT_KS, "evaluate_last": None, "evaluate_every": None},
    "kl": {"window": 4000, "stride": 25, "standardize": False, "evaluate_last": None, "evaluate_every": None},
}
SPEC_CHECKS = {"window": whole("entropy window", 2), "stride": whole("entropy stride", 1), "ks": _ks,
               "standardize": flag("standardize"), "evaluate_last": optional(whole("evaluate_last", 1)),
               "evaluate_every": optional(whole("evaluate_every", 1))}


@dataclass(frozen=True)
class EntropySpec:
    """One entropy estimator of a member: which, its window of ``window`` snapshots ``stride`` apart, and
    when it is evaluated. A member stores ``as_dict()`` (plain data: JSON, MLflow params, checkpoints)."""
    name: str
    window: int
    stride: int
    ks: tuple | None = None            # knn only
    standardize: bool | None = None    # kl only
    evaluate_last: int | None = None
    evaluate_every: int | None = None

    @classmethod
    def parse(cls, raw) -> "EntropySpec":
        """A checked spec from a mapping, its defaults filled; BadValue lists every problem (``.key: ...``)."""
        if not isinstance(raw, dict):
            raise BadValue([f": an estimator spec must be a mapping with a name, got {raw!r}"])
        name = raw.get("name")
        if not isinstance(name, str) or name not in ESTIMATORS:
            raise BadValue([f".name: estimator {name!r}: " + unknown("estimator", name, ESTIMATORS)])
        values, problems = dict(ESTIMATORS[name]), []
        for key, value in raw.items():
            if key == "name":
                continue
            if key not in values:
                problems.append(f".{key}: unknown key for estimator {name}{suggest(key, values)}; "
                                f"valid: {', '.join(sorted(values))}")
                continue
            try:
                values[key] = SPEC_CHECKS[key](value)
            except BadValue as e:
                problems.append(f".{key}: {e}")
        if problems:
            raise BadValue(problems)
        if "ks" in values:
            values["ks"] = tuple(values["ks"])
        return cls(name=name, **values)

    @classmethod
    def from_text(cls, spec: str, ks=None) -> "EntropySpec":
        """The CLI form ``knn:WINDOW[:STRIDE]`` or ``kl:WINDOW[:STRIDE][:std]``."""
        parts = spec.split(":")
        if parts[0] not in ESTIMATORS or len(parts) < 2:
            raise BadValue(f"entropy spec '{spec}': use knn:WINDOW[:STRIDE] or kl:WINDOW[:STRIDE][:std]")
        try:
            window = int(parts[1])
            stride = int(parts[2]) if len(parts) > 2 else 1
        except ValueError:
            raise BadValue(f"entropy spec '{spec}': WINDOW and STRIDE are integers") from None
        if window < 2 or stride < 1:
            raise BadValue(f"entropy spec '{spec}': need WINDOW ≥ 2 and STRIDE ≥ 1")
        raw = {"name": parts[0], "window": window, "stride": stride}
        if parts[0] == "kl":
            raw["standardize"] = len(parts) > 3 and parts[3] == "std"
        elif ks is not None:
            raw["ks"] = list(ks)
        return cls.parse(raw)

    def as_dict(self) -> dict:
        out = {"name": self.name}
        for key in ESTIMATORS[self.name]:
            value = getattr(self, key)
            out[key] = list(value) if key == "ks" else value
        return out


def entropy_specs(v) -> list[dict]:
    """Check a member's list of estimator specs; → their full dicts. BadValue lists every problem."""
    if not isinstance(v, list):
        raise BadValue(f"entropy must be a list of estimator specs such as [{{name: knn, window: 1000}}], got {v!r}")
    problems, out, seen = [], [], set()
    for i, raw in enumerate(v):
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and name in ESTIMATORS:
            if name in seen:
                problems.append(f"[{i}]: a second '{name}' spec; its metric names would collide with the first")
            seen.add(name)
        try:
            out.append(EntropySpec.parse(raw).as_dict())
        except BadValue as e:
            problems += [f"[{i}]{p}" for p in e.args[0]]
    if problems:
        raise BadValue(problems)
    return out


def parsed_entropy(cfg: dict) -> list[EntropySpec]:
    """A member's estimator specs as `EntropySpec` objects."""
    return [EntropySpec.parse(s) for s in cfg.get("entropy") or []]


# ----------------------------------------------------------------------------- the keys

@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    check: Callable[[Any], Any]
    meaning: str
    kind: type = str                       # what an MLflow param string decodes to (engine/layout.decode_param)
    models: tuple = ()                     # models that use it; () = every model
    extra: dict = field(default_factory=dict)


NETWORKS = tuple(models.MODELS)
_NET = NETWORKS
STOP_MODELS = NETWORKS + ("vmf",)     # the runners that call trainables.stopping

COMMON = (
    Key("model", "convnet", choice("model", lambda: model_names()),
        "network (" + ", ".join(NETWORKS) + ") or toy model"),
    Key("width", 8, whole("width", 1), "ConvNet c / ResNet-18 k", int, _NET),
    Key("dataset", "digits", choice("dataset", lambda: data.DATASETS), "training data: " + ", ".join(data.DATASETS), str, _NET),
    Key("samples_per_label", None, optional(whole("samples_per_label", 1)),
        "per-class subset of the training split (none = all)", int, _NET),
    Key("loss", "ce", choice("loss", lambda: models.HEAD_NORMS), "ce or mse (head norm 10 or 1.5)", str, _NET),
    Key("protocol", "fixed_sphere", choice("protocol", lambda: protocols.PROTOCOLS),
        "training protocol: " + ", ".join(protocols.PROTOCOLS)),
    Key("lr", 0.01, real("learning rate", gt=0), "η_eff on fixed_sphere / fixed_elr, η on fixed_lr", float),
    Key("wd", 0.0, real("weight decay", ge=0), "weight decay λ (ignored on fixed_sphere)", float),
    Key("radius", 1.0, real("radius", gt=0), "r0: initial radius; the sphere's radius on fixed_sphere", float),
    Key("batch_size", 128, whole("batch_size", 1), "minibatch size B", int, _NET),
    Key("iterations", 20000, whole("iterations", 1), "number of SGD steps", int),
    Key("seed", 0, whole("seed", 0), "batch-sequence seed", int),
    Key("init_seed", 1, whole("init_seed", 0), "weight initialisation seed", int, _NET),
    Key("head_seed", 4, whole("head_seed", 0), "frozen head seed", int, _NET),
    Key("data_seed", 1, whole("data_seed", 0), "data split / subset seed", int, _NET),
    Key("log_schedule", "free_energy", _log_schedule,
        "log steps: " + ", ".join(schedule.SCHEDULES)),
    Key("running_every", 50, whole("running_every", 1), "running-metric interval (iterations)", int),
    Key("num_stoch_grads", 1000, whole("num_stoch_grads", 1),
        "M: stochastic gradients per log step", int, _NET),
    Key("stochastic_entropy", False, flag("stochastic_entropy"),
        "also log the k-NN entropy of the M one-step displacements", bool, _NET),
    Key("entropy", [EntropySpec.parse({"name": "knn"}).as_dict()], entropy_specs,
        "entropy estimator specs", list),
    Key("data_dir", None, optional(text("data_dir")), "where CIFAR lives / is downloaded", str, _NET),
    Key("device", "auto", _device, "auto (cuda if available), cpu, cuda, cuda:1 ..."),
    Key("dtype", ABSENT, choice("dtype", _dtypes), "float32 (unset) or float64", str, _NET),
    Key("optimizer", "sgd", choice("optimizer", lambda: optimizers.OPTIMIZERS),
        "update rule kept on the protocol: " + ", ".join(optimizers.OPTIMIZERS), str, _NET),
    Key("momentum", None, optional(real("momentum", ge=0)), "β of momentum (none: 0.9)", float, _NET),
    Key("beta1", None, optional(real("beta1", ge=0)), "Adam β1 (none: 0.9)", float, _NET),
    Key("beta2", None, optional(real("beta2", ge=0)), "Adam β2 (none: 0.999)", float, _NET),
    Key("adam_eps", None, optional(real("adam_eps", gt=0)), "Adam ε (none: 1e-8)", float, _NET),
    Key("compile", ABSENT, flag("compile"),
        "torch.compile the one-member training step (opt-in; same numbers to rounding, docs/DESIGN.md)",
        bool, _NET),
    Key("cuda_graph", ABSENT, flag("cuda_graph"),
        "record the one-member step once as a CUDA graph and replay it (opt-in, CUDA only)", bool, _NET),
    Key("stop_when", None, stop_when, "stop a member once its U and S (and r) are known (trainables.stopping)",
        dict, STOP_MODELS),
)
MEMBER_DEFAULTS = {k.name: k.default for k in COMMON if k.default is not ABSENT}


@lru_cache(maxsize=None)
def toys() -> dict:
    """Toy model name → its module (which holds ``MODEL``, ``KEYS``, ``DEFAULTS`` and ``Runner``)."""
    found = {}
    for path in TOY_MODULES:
        module = importlib.import_module(path)
        found[module.MODEL] = module
    return found


def model_names() -> tuple:
    return NETWORKS + tuple(toys())


@lru_cache(maxsize=None)
def keys() -> dict:
    """Every member key by name: the common ones, then each toy's own (``models`` = that toy)."""
    out = {k.name: k for k in COMMON}
    for model, module in toys().items():
        for k in module.KEYS:
            out[k.name] = Key(k.name, k.default, k.check, k.meaning, k.kind, (model,), k.extra)
    return out


def toy_keys() -> dict:
    """Key name → the toy model that owns it (keys only that toy understands)."""
    return {name: k.models[0] for name, k in keys().items() if name not in MEMBER_DEFAULTS
            and k.models and k.models[0] in toys()}


def defaults(model: str) -> dict:
    """A fresh full member of ``model`` with every default: the common ones ← the toy's own."""
    cfg = copy.deepcopy(MEMBER_DEFAULTS)
    cfg["model"] = model
    toy = toys().get(model)
    if toy is not None:
        cfg.update({k.name: copy.deepcopy(k.default) for k in toy.KEYS})
        cfg.update(copy.deepcopy(toy.DEFAULTS))
    return cfg


def member_config(chosen: dict) -> dict:
    """The full member for the chosen values (the one place defaults are applied). A key that belongs to
    another model's toy is left out; any other key given is kept."""
    model = chosen.get("model", MEMBER_DEFAULTS["model"])
    owner = toy_keys()
    cfg = defaults(model)
    for key, value in chosen.items():
        if owner.get(key, model) == model:
            cfg[key] = copy.deepcopy(value)
    return cfg


def check(key: str, value):
    """The normalised value of ``key`` (BadValue if refused, KeyError if no such key)."""
    return keys()[key].check(value)
