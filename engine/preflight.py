"""Input checks that run before anything starts (also under ``--dry-run``).

Every path-like or URI-like input of a sweep is looked at here: the experiment name (it becomes a
directory under the storage path), the storage path, the MLflow tracking URI, the Ray address and the
datasets the grid reads. Each check returns a list of problems, each naming what is wrong and how to
fix it; ``engine.sweep`` prints them and exits 2 without starting Ray or writing anything. The checks
only look: nothing is created, no data is downloaded, a server is asked at most one bounded request.
"""
from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

STORAGE_ENV = "THERMOSWEEP_STORAGE"     # set on a cluster's head by cluster.yaml: the shared sweep storage
CONNECT_TIMEOUT_S = 10.0        # bound on any one network probe (tracking server, Ray, data source)
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
STORAGE_URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")   # handed to Tune/pyarrow as they are
# schemes MLflow can reach from here but that we cannot probe without credentials or drivers
UNPROBED_TRACKING_SCHEMES = ("databricks", "databricks-uc", "uc", "postgresql", "mysql", "mssql")


# ---------------------------------------------------------------------------------------- names

def check_experiment(name: str) -> list[str]:
    """The experiment name names Tune's sweep directory, so it must stay one plain path component."""
    if SAFE_NAME.fullmatch(name or "") and ".." not in name:
        return []
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "").replace("..", "_").strip("._-") or "sweep"
    return [f"experiment: {name!r} is not a safe name (it names the sweep's directory under the storage "
            "path): use letters, digits, '.', '_' and '-' only, no '..' and no '/', starting with a "
            f"letter or digit, at most 200 characters, e.g. --set experiment={safe}"]


# ---------------------------------------------------------------------------------------- storage

def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_dir_problem(what: str, path: Path, fix: str) -> list[str]:
    """[] if ``path`` is a writable directory or could be created as one (nothing is created here)."""
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return [f"{what}: {existing} is a file, not a directory, so {path} cannot be used; {fix}"]
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "is" if existing == path else f"cannot be created: {existing}"
        return [f"{what}: {path} {verb} not writable by this user; {fix}"]
    return []


def check_storage(where: str) -> list[str]:
    text = str(where)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme == "file":
            text = text[len("file://"):]
        elif scheme in STORAGE_URI_SCHEMES:
            return []
        else:
            return [f"storage path: unknown scheme '{scheme}://' in {where}; use a directory (local or on a "
                    f"shared filesystem) or one of {', '.join(s + '://' for s in STORAGE_URI_SCHEMES)}"]
    return _writable_dir_problem("storage path", Path(text).expanduser().resolve(),
                                 "pass --storage-path DIR (or storage_path: in the grid) with a writable directory")


def check_storage_on_nodes(storage: Path, timeout: float = 120.0) -> list[str]:
    """On a running multi-node Ray: every alive node must see the storage directory. A marker written
    here is looked for by one tiny task pinned to each node (a path only the head sees would fail the
    trials at their first checkpoint). The marker is removed again."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = storage / f".thermosweep-visible-{uuid.uuid4().hex}"
    marker.write_text(marker.name)

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str, text: str) -> bool:
        try:
            return open(path).read() == text
        except OSError:
            return False

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), marker.name) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        blind = [n["NodeManagerAddress"] for n, r in zip(nodes, refs) if r not in ready or not ray.get(r)]
    finally:
        marker.unlink(missing_ok=True)
    if not blind:
        return []
    return [f"storage path: {storage} is not visible on node(s) {', '.join(blind)} (trials there could not save "
            f"checkpoints); use a directory on the cluster's shared filesystem: --storage-path, storage_path: "
            f"in the grid, or ${STORAGE_ENV} on the head (cluster.yaml sets it)"]


# ---------------------------------------------------------------------------------------- tracking

def _known_tracking_schemes() -> list[str]:
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    return sorted(s for s in _tracking_store_registry._registry if s)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), else None."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix):]).expanduser().resolve()


def check_tracking_uri(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> list[str]:
    scheme = uri.split(":", 1)[0].lower() if ":" in uri and not re.match(r"[A-Za-z]:[\\/]", uri) else ""
    fix = "pass --tracking-uri (or tracking_uri: in the grid), e.g. sqlite:///mlflow.db or http://127.0.0.1:5000"
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            return [f"tracking URI {uri}: name the database file, e.g. sqlite:///mlflow.db; {fix}"]
        if path.is_dir():
            return [f"tracking URI {uri}: {path} is a directory, not a database file; {fix}"]
        if path.exists():
            return [] if os.access(path, os.W_OK) else [f"tracking URI {uri}: {path} is not writable; {fix}"]
        if not path.parent.is_dir():
            return [f"tracking URI {uri}: the directory {path.parent} does not exist (SQLite does not create "
                    f"it); create it or {fix}"]
        return _writable_dir_problem(f"tracking URI {uri}", path.parent, fix)
    if scheme in ("http", "https"):
        return _probe_tracking_server(uri, timeout)
    if scheme in ("", "file"):
        return _writable_dir_problem(f"tracking URI {uri}", Path(uri.removeprefix("file://")).expanduser().resolve(),
                                     fix)
    if scheme not in _known_tracking_schemes():
        return [f"tracking URI {uri}: unknown scheme '{scheme}:' (MLflow knows "
                f"{', '.join(_known_tracking_schemes())}); {fix}"]
    return []           # UNPROBED_TRACKING_SCHEMES: MLflow itself reports them when the sweep opens its store


def _probe_tracking_server(uri: str, timeout: float) -> list[str]:
    """One bounded request to the MLflow server's health endpoint (it answers ``OK``)."""
    url = uri.rstrip("/") + "/health"
    try:            # through the same proxies (environment) that MLflow's client will use
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read(64).decode(errors="replace").strip()
        if body == "OK":
            return []
        reason = f"it answered {body[:40]!r} instead of OK"
    except urllib.error.HTTPError as e:
        reason = f"it answered HTTP {e.code} (is this an MLflow server?)"
    except (OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    return [f"tracking URI {uri}: the MLflow server did not answer {url} within {timeout:.0f} s ({reason}); "
            "start it (mlflow server --host 127.0.0.1 --port PORT --backend-store-uri sqlite:///mlflow.db), "
            "open the tunnel to it, or pass another --tracking-uri"]


# ---------------------------------------------------------------------------------------- Ray

def ray_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that must accept a connection for ``address``; None for 'local'/'auto'."""
    if address in ("local", "auto"):
        return None
    text = address.split("://", 1)[1] if "://" in address else address
    host, _, port = text.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(address)
    return host.strip("[]"), int(port)


# Ray's longest socket path below its temp dir: /ray/session_<date>_<time>_<µs>_<pid>/sockets/plasma_store
RAY_SOCKET_SUFFIX = len("/ray/session_2026-12-03_16-57-43_469413_4194304/sockets/plasma_store")
UNIX_SOCKET_PATH_MAX = 107


def check_local_ray_dir() -> list[str]:
    """A local Ray puts its sockets under its temp dir ($RAY_TMPDIR, else the system's): a path too long
    for a Unix socket makes it fail at start, after the grid was accepted."""
    from ray._common.utils import get_default_ray_temp_dir
    base = Path(get_default_ray_temp_dir()).parent           # the dir that holds ray/ (ours: $RAY_TMPDIR)
    if len(str(base)) + RAY_SOCKET_SUFFIX <= UNIX_SOCKET_PATH_MAX:
        return []
    return [f"Ray temp dir: a local Ray's socket paths under {base} would be longer than the "
            f"{UNIX_SOCKET_PATH_MAX} bytes a Unix socket allows, so it cannot start; set RAY_TMPDIR to a directory "
            f"whose path has at most {UNIX_SOCKET_PATH_MAX - RAY_SOCKET_SUFFIX} characters (e.g. RAY_TMPDIR=/tmp/r)"]


def check_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> list[str]:
    if not address:
        return check_local_ray_dir()
    try:
        endpoint = ray_endpoint(address)
    except ValueError:
        return [f"Ray address {address!r} is not HOST:PORT (or ray://HOST:PORT); pass --address HOST:PORT of "
                "the cluster's head, or no --address (and no $RAY_ADDRESS) for a local Ray"]
    if endpoint is None:
        return []
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError as e:
        return [f"Ray address {address}: nothing answers at {endpoint[0]}:{endpoint[1]} within {timeout:.0f} s "
                f"({e.strerror or e}); start the cluster (ray up cluster.yaml / ray start --head), open the "
                "tunnel to its head, fix --address / $RAY_ADDRESS, or leave both unset for a local Ray"]
    return []


# ---------------------------------------------------------------------------------------- data

def _cifar_datasets(grid) -> dict[tuple[str, str], None]:
    from trainables.data import CIFAR_LAYOUT
    out: dict = {}
    for _, cfg in grid.members():
        if cfg.get("dataset") in CIFAR_LAYOUT:
            out[(cfg["dataset"], cfg.get("data_dir") or "")] = None
    return out


def _source_reachable(url: str, timeout: float) -> str | None:
    """None if the download source answers a HEAD request in time, else why not (nothing is downloaded)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def check_datasets(grid, on_cluster: bool, timeout: float = CONNECT_TIMEOUT_S) -> tuple[list[str], list[str]]:
    """(problems, notes). On this machine a CIFAR dataset that is neither on disk nor downloadable is a
    problem (every trial would fail on it); on a cluster the trials read it on their own nodes, so the
    note says where."""
    from trainables.data import DatasetUnavailable, _ensure_cifar, default_data_dir
    problems, notes = [], []
    for name, data_dir in _cifar_datasets(grid):
        folder = Path(data_dir).expanduser() if data_dir else default_data_dir()
        if on_cluster:
            where = data_dir or "$THERMOSWEEP_DATA (else ~/.cache/thermosweep/data)"
            notes.append(f"{name} is read on each worker node from {where}/ (or downloaded there if missing); "
                         "put it on the shared filesystem and set THERMOSWEEP_DATA on the nodes")
            continue
        try:
            _ensure_cifar(name, folder, download=False)
            continue
        except DatasetUnavailable as e:
            missing = str(e)
        import torchvision
        url = (torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100).url
        why = _source_reachable(url, timeout)
        if why is None:
            notes.append(f"{name} is not in {folder}; the first trial downloads it from {url}")
        else:
            problems.append(f"dataset {name}: {missing} Its download source {url} cannot be reached ({why}), "
                            "so every trial would fail.")
    return problems, notes
