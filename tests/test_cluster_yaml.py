"""cluster.yaml: the Ray cluster launcher config (`ray up cluster.yaml`), checked offline.

The validation is Ray's own: `prepare_config` merges the AWS defaults exactly as `ray up` does, then
`validate_config` checks the result against ray/autoscaler/ray-schema.json plus Ray's cross-field
rules. Deliberately broken copies show that this validator rejects what it should. No network, no
AWS credentials: nothing here talks to a cloud.
"""
import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def text():
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(text):
    return yaml.safe_load(text)


def ray_validate(cfg):
    """What `ray up` does to a config before touching the cloud: merge defaults, then validate."""
    validate_config(prepare_config(copy.deepcopy(cfg)))


def all_commands(cfg):
    keys = ["initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    return [c for k in keys for c in cfg.get(k, [])]


def worker_types(cfg):
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


# --- Ray's validator ---------------------------------------------------------------------------

def test_ray_accepts_cluster_yaml(config):
    ray_validate(config)  # raises jsonschema.ValidationError / ValueError on a malformed config


def _typo_top_level_key(c):
    c["max_worker"] = c.pop("max_workers")


def _fractional_node_gpu(c):
    # a per-trial fraction written where the node's whole-GPU count belongs
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _resources_missing(c):
    del c["available_node_types"]["gpu_worker"]["resources"]


def _command_not_a_list(c):
    c["worker_start_ray_commands"] = "ray start --address=$RAY_HEAD_IP:6379"


def _timeout_as_text(c):
    c["idle_timeout_minutes"] = "5 minutes"


def _unknown_head_type(c):
    c["head_node_type"] = "head_gpu"


def _min_workers_over_global_max(c):
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("breakage, error", [
    (_typo_top_level_key, jsonschema.ValidationError),
    (_fractional_node_gpu, jsonschema.ValidationError),
    (_resources_missing, jsonschema.ValidationError),
    (_command_not_a_list, jsonschema.ValidationError),
    (_timeout_as_text, jsonschema.ValidationError),
    (_unknown_head_type, ValueError),
    (_min_workers_over_global_max, ValueError),
])
def test_ray_rejects_broken_copies(config, breakage, error):
    broken = copy.deepcopy(config)
    breakage(broken)
    with pytest.raises(error):
        ray_validate(broken)


# --- network exposure --------------------------------------------------------------------------

def test_nothing_binds_all_interfaces(text, config):
    assert "0.0.0.0" not in text
    # Ray's AWS defaults start the head with a dashboard on every interface; the merged config
    # (what `ray up` would run) must not bring that back.
    merged = prepare_config(copy.deepcopy(config))
    assert not any("0.0.0.0" in c for c in all_commands(merged))


def _option(tokens, name):
    """Value of `--name value` or `--name=value` in a token list (None if absent)."""
    for i, tok in enumerate(tokens):
        if tok == name and i + 1 < len(tokens):
            return tokens[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def test_mlflow_server_on_head_loopback_with_sqlite(config):
    servers = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(servers) == 1, "exactly one command should start the MLflow server on the head"
    tokens = shlex.split(servers[0].replace("(", " ").replace(")", " "))
    assert _option(tokens, "--host") == "127.0.0.1"
    assert _option(tokens, "--port") == "5000"
    store = _option(tokens, "--backend-store-uri")
    assert store.startswith("sqlite:////"), "SQLite needs an absolute path: four slashes"
    assert _option(tokens, "--artifacts-destination")
    assert "nohup" in tokens and servers[0].rstrip().endswith("&)"), "must run in the background"
    # the driver on the head defaults to that server
    uris = [m.group(1) for c in config["head_setup_commands"]
            for m in re.finditer(r"export MLFLOW_TRACKING_URI=([^\s']+)", c)]
    assert uris == [f"http://{_option(tokens, '--host')}:{_option(tokens, '--port')}"]
    # workers never start an MLflow server (one writer: the driver, on the head)
    assert not any("mlflow server" in c for c in config["worker_start_ray_commands"]
                   + config.get("worker_setup_commands", []) + config["setup_commands"])


def test_ray_dashboard_on_loopback(config):
    head_start = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(head_start) == 1
    tokens = shlex.split(head_start[0])
    assert "--head" in tokens
    assert _option(tokens, "--dashboard-host") == "127.0.0.1"


# --- node types --------------------------------------------------------------------------------

GPU_FAMILIES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p5.")


def test_head_is_cpu_only(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(GPU_FAMILIES)


def test_gpu_workers_declare_gpus_and_autoscale_on_spot(config):
    workers = worker_types(config)
    assert workers, "at least one worker node type"
    for name, node in workers.items():
        assert node["resources"]["GPU"] >= 1, name
        assert node["resources"]["CPU"] >= 1, name
        assert node["node_config"]["InstanceType"].startswith(GPU_FAMILIES), name
        assert node.get("min_workers", 0) == 0, f"{name}: idle cluster should cost nothing"
        assert 1 <= node["max_workers"] <= config["max_workers"], name
        assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name


def test_all_nodes_share_one_image(config):
    # Ray needs the same Python on every node; one AMI for all node types guarantees it.
    images = {n["node_config"].get("ImageId") for n in config["available_node_types"].values()}
    assert len(images) == 1 and None not in images


# --- software and data on the nodes ------------------------------------------------------------

def test_checkout_is_mounted_and_installed_on_every_node(config):
    mounts = config["file_mounts"]
    assert mounts.get("~/thermosweep") == "."
    pyproject = (ROOT / mounts["~/thermosweep"] / "pyproject.toml").read_text()
    assert re.search(r'^name\s*=\s*"thermosweep"', pyproject, re.M)
    # setup_commands run on head and workers alike: the checkout, editable, under the constraints
    installs = [shlex.split(c) for c in config["setup_commands"] if " install " in c and "-e" in c]
    assert len(installs) == 1
    tokens = installs[0]
    assert tokens[tokens.index("-e") + 1] == "~/thermosweep"
    assert _option(tokens, "-c") == "~/thermosweep/requirements/cluster.txt"
    excluded = config.get("rsync_exclude", [])
    assert "**/.git" in excluded and "**/.venv" in excluded


def test_cluster_ray_version_matches_installed_ray(config):
    pins = [m.group(1) for c in config["setup_commands"]
            for m in re.finditer(r"ray\[[^\]]*\]==([0-9][\w.]*)", c)]
    assert pins == [ray.__version__], f"setup_commands pin {pins}, laptop has {ray.__version__}"


CONSTRAINTS = ROOT / "requirements" / "cluster.txt"


def test_constraints_pin_what_this_environment_runs():
    # every line an exact pin, and the ones the engine depends on equal to what is installed here
    from importlib.metadata import version
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, ver = line.partition("==")
            assert sep and ver, f"not an exact pin: {line!r}"
            pins[name.lower().replace("_", "-")] = ver
    for name in ("torch", "torchvision", "ray", "mlflow", "numpy", "scipy", "scikit-learn", "pyyaml"):
        assert pins.get(name) == version(name), f"{name}: cluster.txt {pins.get(name)}, here {version(name)}"


def test_data_fetched_once_on_the_head_into_the_shared_directory(config, monkeypatch):
    exported = [m.group(1) for c in config["setup_commands"]
                for m in re.finditer(r"export THERMOSWEEP_DATA=(\S+?)'?(?:\s|$)", c)]
    assert len(exported) == 1 and exported[0].startswith(_shared_dir(config) + "/")
    # trainables.data must read that variable when a trial leaves data_dir unset
    from trainables.data import default_data_dir
    monkeypatch.setenv("THERMOSWEEP_DATA", exported[0])
    assert str(default_data_dir()) == exported[0]
    downloads = [c for c in config["head_setup_commands"] if "load_dataset" in c]
    assert len(downloads) == 1
    assert "'cifar10'" in downloads[0] and shlex.split(downloads[0])[:2] == ["python", "-c"]
    assert f"data_dir='{exported[0]}'" in downloads[0]
    assert not any("load_dataset" in c for c in config.get("worker_setup_commands", []))


def _shared_dir(config):
    exports = [m.group(1) for c in config["head_setup_commands"]
               for m in re.finditer(r"echo '(/\S+) \S+' \| sudo tee -a /etc/exports", c)]
    assert len(exports) == 1
    return exports[0]


def test_shared_directory_mounted_at_one_path_and_holds_the_default_storage(config):
    # Tune persists checkpoints from the worker that runs a trial and refuses a storage path only
    # the head can see: the head must export a directory that every worker mounts at that path.
    shared = _shared_dir(config)
    mounts = [shlex.split(m.group(0)) for c in config["worker_setup_commands"]
              for m in re.finditer(r"sudo mount -t nfs \S+ [^\s)]+", c)]
    assert len(mounts) == 1
    source, target = mounts[0][-2:]
    assert source == "$RAY_HEAD_IP:" + shared
    assert target == shared
    # the driver on the head defaults to a sweep directory inside the share
    storage = [m.group(1) for c in config["head_setup_commands"]
               for m in re.finditer(r"export THERMOSWEEP_STORAGE=([^\s']+)", c)]
    assert len(storage) == 1 and storage[0].startswith(shared + "/")


# --- security ----------------------------------------------------------------------------------

def test_nfs_export_limited_to_a_private_network(config):
    line = [m.group(0) for c in config["head_setup_commands"]
            for m in re.finditer(r"echo '/\S+ (\S+)'", c)][0]
    clients = line.split()[-1].rstrip("'")
    network = clients.split("(")[0]
    import ipaddress
    net = ipaddress.ip_network(network)          # a CIDR, not "*" or a host name pattern
    assert net.is_private and net.prefixlen >= 8, network
    assert "root_squash" in clients and "no_root_squash" not in clients


def test_ssh_only_from_the_operator_cidr(config):
    import ipaddress
    group = config["provider"]["security_group"]
    assert group["GroupName"]
    rules = group["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in rules] == [(22, 22, "tcp")]
    for r in rules:
        for cidr in r["IpRanges"]:
            net = ipaddress.ip_network(cidr["CidrIp"])
            assert net.num_addresses <= 256, f"SSH open to {net}"
        assert not r.get("Ipv6Ranges")


def test_head_has_its_own_instance_profile_and_workers_none(config):
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"]["Arn"].endswith(":instance-profile/thermosweep-head")
    for name, node in worker_types(config).items():
        assert "IamInstanceProfile" not in node["node_config"], name
    # the policy the profile must carry is documented next to the cluster instructions
    import json
    doc = (ROOT / "docs" / "cluster.md").read_text()
    assert "thermosweep-head" in doc
    policy = json.loads(doc.split("```json\n", 1)[1].split("```", 1)[0])
    actions = [a for st in policy["Statement"] for a in st["Action"]]
    assert "ec2:RunInstances" in actions and "ec2:TerminateInstances" in actions
    assert not [a for a in actions if a.endswith("*") or not a.startswith("ec2:")], actions
    for st in policy["Statement"]:
        if "ec2:TerminateInstances" in st["Action"]:
            tag = st["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"]
            assert tag == config["cluster_name"]


def test_ray_token_authentication_on_every_node(config):
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    for c in starts:
        assert "export RAY_AUTH_MODE=token;" in c.split("ray start")[0], c
    assert any("'export RAY_AUTH_MODE=token'" in c for c in config["setup_commands"])


# --- memory per node type ----------------------------------------------------------------------

def test_worker_memory_split_fits_the_instance_ram(config):
    from engine.plan import GiB, table
    for name, node in worker_types(config).items():
        res = node["resources"]
        ram = table()["instances"][node["node_config"]["InstanceType"]]["ram_gib"] * GiB
        reserved = res["memory"] + res["object_store_memory"]
        assert reserved <= ram - 2 * GiB, f"{name}: {reserved / GiB:.1f} GiB of {ram / GiB:.0f} GiB"
        assert res["object_store_memory"] >= GiB, name
