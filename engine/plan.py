"""Memory per trial, which node a trial fits, and the launch plan of ``--dry-run``.

Memory of one trial (`trial_memory`), every figure in bytes:

- **object store**: the windows the node's reservoir keeps, per estimator ``members × D × (window +
  chunk) × 4`` (float32 snapshots, chunks of `chunk_snapshots` as `engine.reservoir.ReservoirSink`
  ships them). Ray does not schedule by object-store space, so the node check below does.
- **reservoir**: the working memory of the node's reservoir while it evaluates this trial's window
  (`RESERVOIR_EVAL_COPIES` full copies of the window plus the window × window distances).
- **host**: the trial's process: Python with torch and Ray, a CUDA context on a GPU, the dataset as it
  is read and normalised on the host, the chunk being shipped, and everything of the device column
  when the trial runs on the CPU.
- **device**: model, gradients and activations (the largest of batch and the 1024-image metric
  chunk), the dataset on the device, the snapshot chunk buffer and, with ``stochastic_entropy``, the
  ``M × D`` displacements.

A trial asks Ray for ``memory = host + reservoir`` (the reservoir runs on the trial's node, outside any
reservation of its own). A node type *fits* a trial group when the trials Ray would pack onto one node
by CPU and GPU (``1/gpu`` per GPU: a fractional GPU is a promise that that many share it) also fit
its ``memory`` and object store and the GPU's memory. The constants below are estimates, stated as
such; `benchmarks/` measures the reservoir's and the trainer's real figures.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.grid_values import fmt as _fmt
from engine.resources import trial_resources
from trainables import member
from trainables.data import SHAPES as DATASET_SHAPES   # train, test, channels, side, classes

GiB = 2 ** 30
ROOT = Path(__file__).resolve().parents[1]
TABLE = Path(__file__).with_name("throughput.yaml")
CLUSTER_YAML = ROOT / "cluster.yaml"
AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml").expanduser()   # what `ray up` leaves on the head

PROCESS_BYTES = int(0.75 * GiB)    # a worker with torch, Ray and trainables imported: 543 MiB max RSS (measured)
CUDA_HOST_BYTES = 1 * GiB          # host memory of a CUDA context and its libraries (assumed)
CUDA_DEVICE_BYTES = int(0.5 * GiB)  # device memory of a CUDA context, cuDNN/cuBLAS workspaces (assumed)
RESERVOIR_EVAL_COPIES = 1          # Reservoir.evaluate np.stacks one full copy of the window today
RAY_OBJECT_STORE_SHARE = 0.3       # Ray's default object store: 30 % of the node's RAM
RAY_MEMORY_SHARE = 0.65            # ... and the `memory` resource roughly the rest, minus the system's
GPU_SPLITS = (1, 0.5, 0.25, 0.2)   # GPU shares the fix suggestions try

def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def exact(n: float) -> str:
    return f"{n / GiB:.2f} GiB ({int(n):,} bytes)"


# ----------------------------------------------------------------------------- model sizes

@functools.lru_cache(maxsize=None)
def network_shape(model: str, width: int, dataset: str) -> tuple[int, int]:
    """(D, activation floats per image) of a network, built on the meta device (no memory, no time)."""
    import torch

    from trainables.models import MODELS

    _, _, channels, side, classes = DATASET_SHAPES[dataset]
    with torch.device("meta"):
        net = MODELS[model](width, classes, channels)
        outputs = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
                 for m in net.modules() if not list(m.children()) and not isinstance(m, torch.nn.ReLU)]
        net(torch.empty(1, channels, side, side))
    for h in hooks:
        h.remove()
    D = sum(p.numel() for name, p in net.named_parameters() if not name.startswith("head."))
    return D, sum(outputs)


def dimension(cfg: dict) -> int:
    """D of a member: the trainable scale-invariant weights (the head is frozen), or a toy's dim."""
    if cfg["model"] in member.toys():
        return member.toys()[cfg["model"]].dimension(cfg)
    return network_shape(cfg["model"], int(cfg["width"]), cfg["dataset"])[0]


def chunk_snapshots(members: int, D: int) -> int:
    """Snapshots per shipped chunk: the rule of engine.reservoir.ReservoirSink."""
    from engine.reservoir import CHUNK_BYTES, CHUNK_SNAPSHOTS
    return max(1, min(CHUNK_SNAPSHOTS, CHUNK_BYTES // max(1, members * D * 4)))


# ----------------------------------------------------------------------------- memory per trial

@dataclass(frozen=True)
class TrialMemory:
    D: int
    members: int
    object_store: int
    reservoir: int
    host: int
    device: int

    @property
    def request(self) -> int:
        """What the trial asks Ray for as its `memory` resource."""
        return self.host + self.reservoir


def trial_memory(cfgs: list[dict], on_gpu: bool) -> TrialMemory:
    """Memory of one trial running the members ``cfgs`` (one bundle), on a GPU or on the CPU."""
    cfg, m = cfgs[0], len(cfgs)
    D = dimension(cfg)
    chunk = chunk_snapshots(m, D)
    snapshot = m * D * 4
    specs = cfg.get("entropy") or []
    object_store = sum(snapshot * (int(s["window"]) + chunk) for s in specs)
    reservoir = max((RESERVOIR_EVAL_COPIES * snapshot * int(s["window"]) + m * int(s["window"]) ** 2 * 4
                     for s in specs), default=0)
    host, device = PROCESS_BYTES + (2 * chunk * snapshot if specs else 0), 0
    if cfg["model"] not in member.toys():
        n_train, n_test, channels, side, _ = DATASET_SHAPES[cfg["dataset"]]
        image = channels * side * side
        per_label = cfg.get("samples_per_label")
        kept = n_train if per_label is None else min(n_train, per_label * DATASET_SHAPES[cfg["dataset"]][4])
        host += (n_train + n_test) * image * 5            # read as uint8, normalised as float32
        _, acts = network_shape(cfg["model"], int(cfg["width"]), cfg["dataset"])
        batch = max(int(cfg["batch_size"]), 1024)          # trainables.metrics evaluates 1024 at a time
        device = (m * D * 4 * 4                            # θ, gradient, update and spare copies
                  + m * batch * acts * 4 * 2               # activations kept for backward, and their grads
                  + (kept + n_test) * (image * 4 + 8)      # the dataset on the device
                  + (chunk * snapshot if specs else 0))
        if cfg.get("stochastic_entropy"):
            device += m * int(cfg["num_stoch_grads"]) * D * 4
    if on_gpu:
        host += CUDA_HOST_BYTES
        device += CUDA_DEVICE_BYTES
    else:
        host, device = host + device, 0
    return TrialMemory(D, m, object_store, reservoir, host, device)


def ray_resources(grid, on_gpu: bool | None = None) -> dict[str, dict]:
    """trial_id → what the trial asks Ray for: cpu, gpu and memory (bytes)."""
    out = {}
    for trial in grid.trials():
        res = trial_resources(grid, trial)
        gpu = res["gpu"] > 0 if on_gpu is None else on_gpu
        mem = trial_memory([cfg for _, cfg in trial["members"]], gpu)
        out[trial["trial_id"]] = {"cpu": res["cpu"], "gpu": res["gpu"], "memory": mem.request}
    return out


# ----------------------------------------------------------------------------- nodes

@dataclass(frozen=True)
class Node:
    name: str
    cpu: float
    gpu: float
    memory: float              # Ray's `memory` resource, bytes
    object_store: float        # bytes
    gpu_memory: float | None = None
    max_workers: int = 1
    instance: str | None = None
    usd_per_hour: float | None = None
    gpu_model: str | None = None
    head: bool = False


@functools.lru_cache(maxsize=None)
def table(path: str = str(TABLE)) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _instance(name: str | None) -> dict:
    return table()["instances"].get(name or "", {})


def nodes_from_cluster_yaml(path=CLUSTER_YAML) -> list[Node]:
    """The node types a `ray up` of this file can start (the head first), with their resources."""
    cfg = yaml.safe_load(Path(path).read_text())
    out = []
    for name, t in cfg["available_node_types"].items():
        res, inst_type = t.get("resources", {}), t.get("node_config", {}).get("InstanceType")
        inst = _instance(inst_type)
        ram = inst.get("ram_gib", 0) * GiB
        gpu_model = inst.get("gpu")
        head = name == cfg.get("head_node_type")
        out.append(Node(
            name=name, cpu=float(res.get("CPU", inst.get("vcpus", 0))), gpu=float(res.get("GPU", inst.get("gpus", 0))),
            memory=float(res.get("memory", RAY_MEMORY_SHARE * ram)),
            object_store=float(res.get("object_store_memory", RAY_OBJECT_STORE_SHARE * ram)),
            gpu_memory=table()["gpus"].get(gpu_model, {}).get("memory_gib", 0) * GiB or None,
            max_workers=1 if head else int(t.get("max_workers", cfg.get("max_workers", 1))),
            instance=inst_type, usd_per_hour=inst.get("usd_per_hour"), gpu_model=gpu_model, head=head))
    return sorted(out, key=lambda n: not n.head)


def nodes_from_ray() -> list[Node]:
    """The alive nodes of the connected Ray cluster, with what each offers."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        r = n.get("Resources", {})
        acc = next((k.split(":", 1)[1] for k in r if k.startswith("accelerator_type:")), None)
        out.append(Node(name=f"node {n['NodeID'][:8]}", cpu=r.get("CPU", 0), gpu=r.get("GPU", 0),
                        memory=r.get("memory", 0), object_store=r.get("object_store_memory", 0),
                        gpu_memory=table()["gpus"].get(acc, {}).get("memory_gib", 0) * GiB or None,
                        gpu_model=acc))
    return out


def local_node(num_cpus: int | None = None, num_gpus: int | None = None) -> Node:
    """This machine as a local Ray would see it (Ray's default shares of RAM)."""
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cuda = torch.cuda.is_available()
    return Node(name="this machine", cpu=float(num_cpus or os.cpu_count() or 1),
                gpu=float(num_gpus if num_gpus is not None else torch.cuda.device_count()),
                memory=RAY_MEMORY_SHARE * ram, object_store=RAY_OBJECT_STORE_SHARE * ram,
                gpu_memory=torch.cuda.get_device_properties(0).total_memory if cuda else None)


def cluster_nodes(cluster_yaml=None) -> list[Node]:
    """What a sweep on the connected cluster can run on: its alive nodes plus the node types its
    autoscaler can add (the config `ray up` left on the head, or ``cluster_yaml``)."""
    nodes = nodes_from_ray()
    for path in (cluster_yaml, AUTOSCALER_CONFIG if AUTOSCALER_CONFIG.exists() else None):
        if path:
            nodes += [n for n in nodes_from_cluster_yaml(path) if not n.head]
    return nodes


# ----------------------------------------------------------------------------- fitting

def per_node(res: dict, mem: TrialMemory, node: Node) -> tuple[int, str | None]:
    """(trials of this kind one node runs at once, None) or (0, why none fits)."""
    cpu, gpu = res["cpu"], res["gpu"]
    if gpu > 0 and node.gpu < max(gpu, 1 if gpu < 1 else gpu):
        return 0, f"has {_fmt(node.gpu)} GPU(s), a trial needs {_fmt(gpu)}"
    if cpu > node.cpu:
        return 0, f"has {_fmt(node.cpu)} CPU(s), a trial needs {_fmt(cpu)}"
    limits = [int(node.gpu / gpu + 1e-9)] if gpu > 0 else []
    if cpu > 0:
        limits.append(int(node.cpu / cpu + 1e-9))
    k = min(limits)
    if gpu == 0:                                 # CPU trials: Ray packs them by `memory` too
        k = min(k, int(node.memory // max(mem.request, 1)))
        if k == 0:
            return 0, f"offers {gib(node.memory)} of Ray memory, a trial needs {exact(mem.request)}"
    packed = f"{k} trial(s) per node (by {'GPU share ' + _fmt(gpu) if gpu else 'CPU'})"
    if k * mem.request > node.memory:
        return 0, (f"{packed} need {k} × {gib(mem.request)} = {exact(k * mem.request)} of Ray memory; "
                   f"it offers {gib(node.memory)}")
    if k * mem.object_store > node.object_store:
        return 0, (f"{packed} need {k} × {gib(mem.object_store)} = {exact(k * mem.object_store)} of object "
                   f"store for their windows; it has {gib(node.object_store)}")
    if gpu > 0 and node.gpu_memory and mem.device:
        share = min(gpu, 1.0)
        if mem.device > share * node.gpu_memory:
            return 0, (f"a trial needs {exact(mem.device)} of GPU memory, its {_fmt(share)} GPU share "
                       f"has {gib(share * node.gpu_memory)}")
    return k, None


def trial_groups(grid) -> list[dict]:
    """Trials that need the same: same resources, model, size, data and entropy (in order)."""
    groups: dict = {}
    for trial in grid.trials():
        cfgs = [cfg for _, cfg in trial["members"]]
        res = trial_resources(grid, trial)
        c = cfgs[0]
        key = repr((res, len(cfgs), c["model"], c.get("width"), c.get("dim"), c["dataset"],
                    c.get("samples_per_label"), c["batch_size"], c["iterations"], c.get("entropy"),
                    c.get("stochastic_entropy"), c.get("num_stoch_grads")))
        g = groups.setdefault(key, {"trials": [], "res": res, "cfgs": cfgs})
        g["trials"].append(trial["trial_id"])
    varying = [a for a in grid.axes if a not in grid.bundle and len(grid.axes[a]) > 1]
    for g in groups.values():
        same = [a for a in varying if len({repr(c[a]) for c in _group_cfgs(grid, g)}) == 1]
        g["label"] = ", ".join(f"{a}={_fmt(g['cfgs'][0][a])}" for a in same) or "all trials"
    return list(groups.values())


def _group_cfgs(grid, g):
    ids = set(g["trials"])
    return [t["members"][0][1] for t in grid.trials() if t["trial_id"] in ids]


def fit_group(g: dict, nodes: list[Node]) -> list[tuple[Node, int, str | None, TrialMemory]]:
    out = []
    for node in nodes:
        on_gpu = g["res"]["gpu"] > 0 and node.gpu_memory is not None
        mem = trial_memory(g["cfgs"], on_gpu)
        k, why = per_node(g["res"], mem, node)
        out.append((node, k, why, mem))
    return out


def _fix(g: dict, nodes: list[Node], grid) -> str:
    """A change that would make the group fit, in grid terms."""
    res = g["res"]
    if res["gpu"] > 0 and not any(n.gpu >= max(1.0, res["gpu"]) for n in nodes):
        return ("run it where there are GPUs (a cluster: --address, cluster.yaml) or on the CPU: "
                "--set resources.gpu=0 with resources.cpu ≥ 1")
    for share in GPU_SPLITS:
        if res["gpu"] > 0 and share > res["gpu"]:
            trial = dict(g["res"], gpu=share)
            if any(per_node(trial, trial_memory(g["cfgs"], n.gpu_memory is not None), n)[0] for n in nodes):
                axis = next((a for a in grid.axes if a not in grid.bundle and len(grid.axes[a]) > 1
                             and f"{a}=" in g["label"]), None)
                where = (f"resources: {{by: {{{axis}: {{{_fmt(g['cfgs'][0][axis])}: {{gpu: {_fmt(share)}}}}}}}}} "
                         f"in the grid" if axis else f"--set resources.gpu={_fmt(share)}")
                return f"give these trials a larger GPU share: {where}"
    mem = trial_memory(g["cfgs"], res["gpu"] > 0)
    return (f"add a node type with at least {gib(mem.request)} of Ray `memory` and {gib(mem.object_store)} "
            f"of object store per trial (cluster.yaml's resources: memory / object_store_memory), or "
            f"shrink the trial (smaller width or entropy window)")


def _shown_memory(g: dict, fits: list) -> TrialMemory:
    """The memory to quote for a group: as on a GPU node when it asks for a GPU and one exists."""
    gpu_nodes = [mem for node, _, _, mem in fits if node.gpu_memory is not None]
    if g["res"]["gpu"] > 0 and gpu_nodes:
        return gpu_nodes[0]
    return trial_memory(g["cfgs"], False)


def check_fit(grid, nodes: list[Node], where: str) -> list[str]:
    """One problem per trial group that fits none of ``nodes``, naming the bytes and a fix."""
    problems = []
    for g in trial_groups(grid):
        fits = fit_group(g, nodes)
        if any(k for _, k, _, _ in fits):
            continue
        mem = _shown_memory(g, fits)
        first, n = g["trials"][0], len(g["trials"])
        why = "; ".join(f"{node.name}{f' ({node.instance})' if node.instance else ''}: {reason}"
                        for node, _, reason, _ in fits) or "no nodes"
        kind = "memory" if any(r and ("memory" in r or "object store" in r) for _, _, r, _ in fits) \
            else "resources"
        problems.append(
            f"{kind}: trial {first} ({g['label']}; {n} trial(s) like it) fits no node of {where}. "
            f"Per trial: Ray memory {exact(mem.request)} (process {gib(mem.host)} + reservoir "
            f"{gib(mem.reservoir)}), object store {exact(mem.object_store)}, GPU memory {gib(mem.device)}, "
            f"with cpu {_fmt(g['res']['cpu'])}, gpu {_fmt(g['res']['gpu'])}. {why}. "
            f"Fix: {_fix(g, nodes, grid)}")
    return problems


# ----------------------------------------------------------------------------- time and cost

def iterations_per_second(cfg: dict, gpu_model: str | None) -> tuple[float, str] | None:
    """Estimated it/s of one trial alone on ``gpu_model`` and the source, from engine/throughput.yaml."""
    rows = [r for r in table()["models"] if r["model"] == cfg["model"]]
    speed = table()["gpus"].get(gpu_model or "", {}).get("speed")
    if not rows or speed is None or cfg["model"] in member.toys():
        return None
    D = dimension(cfg)
    pts = sorted((network_shape(r["model"], r["width"], r["dataset"])[0], r) for r in rows)
    lo = max((p for p in pts if p[0] <= D), default=pts[0], key=lambda p: p[0])
    hi = min((p for p in pts if p[0] >= D), default=pts[-1], key=lambda p: p[0])
    if lo[0] == hi[0]:
        base = lo[1]["it_per_s"] * (min(1.0, lo[0] / D))   # beyond the table: slower in proportion to D
    else:
        f = (math.log(D) - math.log(lo[0])) / (math.log(hi[0]) - math.log(lo[0]))
        base = math.exp((1 - f) * math.log(lo[1]["it_per_s"]) + f * math.log(hi[1]["it_per_s"]))
    ref = table()["gpus"][lo[1]["gpu"]]["speed"]
    src = "; ".join(dict.fromkeys(p[1]["source"] for p in (lo, hi)))
    return base * speed / ref, src


def launch_plan(grid, nodes: list[Node], where: str, tracking_uri: str, storage: str,
                max_concurrent: int | None = None) -> str:
    """The plan printed by ``--dry-run``: per trial group, memory, packing, waves, GPU-hours and dollars."""
    t = table()
    lines = [f"launch plan on {where} (speeds and prices: {TABLE.relative_to(ROOT)}; prices "
             f"{t['prices_as_of']}, spot assumed {t['spot_fraction']:.0%} of on-demand)"]
    total_gpu_h = total_usd = total_spot = total_wall = 0.0
    head = next((n for n in nodes if n.head), None)
    limit = max_concurrent or grid.max_concurrent
    for g in trial_groups(grid):
        n = len(g["trials"])
        fits = fit_group(g, [x for x in nodes if not x.head] or nodes)
        ok = [(node, k, mem) for node, k, _, mem in fits if k]
        mem = ok[0][2] if ok else _shown_memory(g, fits)
        lines += [f"- {n} trial(s) {g['trials'][0]}..{g['trials'][-1]} ({g['label']}): {g['cfgs'][0]['model']} "
                  f"D = {mem.D:,}, {mem.members} member(s) per trial, cpu {_fmt(g['res']['cpu'])}, "
                  f"gpu {_fmt(g['res']['gpu'])}",
                  f"    memory per trial: Ray memory {gib(mem.request)} (process {gib(mem.host)} + reservoir "
                  f"{gib(mem.reservoir)}), object store {gib(mem.object_store)}, GPU {gib(mem.device)}"]
        for node, k, why, _ in fits:
            per_gpu = f", {_fmt(min(1 / g['res']['gpu'], k))} per GPU" if g["res"]["gpu"] and k else ""
            lines.append(f"    {node.name}{f' ({node.instance})' if node.instance else ''}: "
                         + (f"{k} per node{per_gpu}" if k else f"does not fit: {why}"))
        if not ok:
            lines.append("    NOT PLANNED: fits no node type")
            continue
        price = lambda x: (x[0].usd_per_hour or float("inf")) / x[1]
        node, k, _ = min(ok, key=price)
        at_once = min(n, k * node.max_workers, limit or n)
        waves = math.ceil(n / at_once)
        lines.append(f"    planned onto {node.name}: {at_once} at once on up to "
                     f"{math.ceil(at_once / k)} node(s), {waves} wave(s)")
        speed = iterations_per_second(g["cfgs"][0], node.gpu_model) if g["res"]["gpu"] else None
        if speed is None:
            lines.append("    time: no estimate (no throughput row for this model/GPU; "
                         "python benchmarks/bench_throughput.py --write adds one)")
            continue
        its, src = speed
        hours = g["cfgs"][0]["iterations"] / its / 3600
        gpu_h = n * hours * max(1.0, g["res"]["gpu"])
        node_h = gpu_h / max(node.gpu, 1)
        busy = min(n, at_once) * min(g["res"]["gpu"], 1.0) * max(1.0, g["res"]["gpu"])
        wall = gpu_h / busy
        usd = node_h * (node.usd_per_hour or 0)
        total_gpu_h, total_usd, total_wall = total_gpu_h + gpu_h, total_usd + usd, total_wall + wall
        total_spot += usd * t["spot_fraction"]
        lines.append(f"    time: {its:.1f} it/s alone on one {node.gpu_model} -> {hours:.1f} h per trial; "
                     f"{gpu_h:,.0f} GPU-hours, about {wall:.0f} h wall; ${usd:,.0f} on-demand, "
                     f"${usd * t['spot_fraction']:,.0f} spot (source: {src})")
    if total_gpu_h:
        head_usd = total_wall * (head.usd_per_hour or 0) if head else 0.0
        lines.append(f"total: {total_gpu_h:,.0f} GPU-hours, ~{total_wall:.0f} h wall if the groups run one "
                     f"after another; ${total_usd + head_usd:,.0f} on-demand, ${total_spot + head_usd:,.0f} "
                     f"with spot workers (head included). Packed trials are assumed to share one GPU's "
                     f"speed (no gain from packing).")
    lines += [f"results: MLflow {tracking_uri}", f"sweep state and checkpoints: {storage}"]
    return "\n".join(lines)
