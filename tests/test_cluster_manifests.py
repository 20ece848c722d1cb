"""The cluster manifests in cluster/ are complete and agree with each other and with the project: every Ray
image carries the Ray and Python versions pyproject.toml pins, every pod mounts the shared volume at the
same path, the RayJob runs a shipped job file with a config that validates, GPU workers ask for the GPUs
Ray is told about, token auth stays on, and secrets only come from Kubernetes Secrets. Files only: no
cluster, no network."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from orchestrator.config import ScalingSection, load_config
from orchestrator.tracking import SECRET_ENV_VARS
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))
SHARED_CLAIM = "orchestrator-shared"
# A Ray image tag names the Ray release and the Python version: rayproject/ray:2.60.0-py311-gpu. An image
# of your own must keep both in its tag (e.g. orchestrator:0.1.0-ray2.60.0-py311-gpu).
RAY_IMAGE_TAG = re.compile(r"(?P<ray>\d+\.\d+\.\d+)-py(?P<major>\d)(?P<minor>\d+)")
# Environment variables that must never carry a literal value in a manifest or runtime env.
SECRET_WORD = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD)(_|$)")


def _is_secret(name: str) -> bool:
    """WANDB_API_KEY, RAY_AUTH_TOKEN, HF_TOKEN, ... but not TOKENIZERS_PARALLELISM or RAY_AUTH_TOKEN_PATH."""
    return name in SECRET_ENV_VARS or (bool(SECRET_WORD.search(name)) and not name.endswith(("_PATH", "_FILE")))


def _docs(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc is not None]


def _one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(name) if d.get("kind") == kind]
    return doc


def _raycluster() -> dict[str, Any]:
    return _one("kuberay-raycluster.yaml", "RayCluster")


def _rayjob() -> dict[str, Any]:
    return _one("kuberay-rayjob.yaml", "RayJob")


def _launcher() -> dict[str, Any]:
    (doc,) = _docs("ray-cluster-gpu.yaml")
    return doc


def _pvc() -> dict[str, Any]:
    return _one("kuberay-shared-pvc.yaml", "PersistentVolumeClaim")


def _cronjob_pod() -> dict[str, Any]:
    return _one("retrain-cronjob.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


# The two KubeRay cluster specs: the long-lived RayCluster and the one each RayJob starts.
KUBERAY_SPECS = {
    "RayCluster": lambda: _raycluster()["spec"],
    "RayJob.rayClusterSpec": lambda: _rayjob()["spec"]["rayClusterSpec"],
}


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group) for the head group and every worker group of a KubeRay cluster spec."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod spec that mounts the shared volume, by where it comes from."""
    pods = {}
    for label, spec in KUBERAY_SPECS.items():
        for name, group in _groups(spec()):
            pods[f"{label} {name}"] = group["template"]["spec"]
    pods["RayJob submitter"] = _rayjob()["spec"]["submitterPodTemplate"]["spec"]
    pods["retrain CronJob"] = _cronjob_pod()
    return pods


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env") or []}


def _rayjob_runtime_env() -> dict[str, Any]:
    return yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])


def _ray_images() -> dict[str, str]:
    """Every image that runs Ray, by where it is set."""
    images = {}
    for label, spec in KUBERAY_SPECS.items():
        for name, group in _groups(spec()):
            images[f"{label} {name}"] = _ray_container(group)["image"]
    images["RayJob submitter"] = _rayjob()["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"]
    launcher = _launcher()
    for key in ("image", "head_image", "worker_image"):
        if key in launcher["docker"]:
            images[f"cluster launcher docker.{key}"] = launcher["docker"][key]
    for node_type, node in launcher["available_node_types"].items():
        if "worker_image" in node.get("docker", {}):
            images[f"cluster launcher {node_type}"] = node["docker"]["worker_image"]
    return images


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pinned_ray() -> SpecifierSet:
    (ray,) = [Requirement(d) for d in _pyproject()["project"]["dependencies"] if Requirement(d).name == "ray"]
    assert str(ray.specifier), "pyproject.toml pins ray to a release series"
    return ray.specifier


def _walk(node: Any):
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


# ---------------------------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_parses_and_starts_with_how_to_use_it(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(doc, dict) for doc in docs if doc is not None)
    assert path.read_text().startswith("# "), "a manifest starts with a comment saying how to apply it"


def test_the_cluster_folder_has_every_manifest():
    names = {p.name for p in MANIFESTS}
    assert {"ray-cluster-gpu.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml",
            "kuberay-shared-pvc.yaml", "runtime_env.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_kubernetes_objects_have_kind_api_version_and_name(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or "kind" not in doc:
            continue  # the cluster launcher config and the runtime env are not Kubernetes objects
        assert doc.get("apiVersion"), f"{path.name}: {doc['kind']} has no apiVersion"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} has no metadata.name"
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1"


# --------------------------------------------------------------------------------------- KubeRay clusters


@pytest.mark.parametrize("label", KUBERAY_SPECS)
def test_kuberay_cluster_has_a_cpu_head_and_a_gpu_worker_group_on_gpu_nodes(label):
    spec = KUBERAY_SPECS[label]()
    head = _ray_container(spec["headGroupSpec"])
    assert _gpus(head) == 0, "the head schedules no training worker, so it needs no GPU"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpus(_ray_container(g)) > 0]
    assert gpu_groups, f"{label}: no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        assert pod.get("nodeSelector"), f"{group['groupName']}: no nodeSelector for GPU nodes"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), "no GPU toleration"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        shm = [m for m in _ray_container(group)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", "NCCL needs a real /dev/shm"


@pytest.mark.parametrize("label", KUBERAY_SPECS)
def test_ray_start_params_match_the_container_resources(label):
    for name, group in _groups(KUBERAY_SPECS[label]()):
        container = _ray_container(group)
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], f"{name}: requests differ from limits"
        params = group["rayStartParams"]
        # Ray would otherwise believe in GPUs or CPUs the pod does not have (or leave some unused).
        assert int(params.get("num-gpus", "0")) == _gpus(container), f"{label} {name}: num-gpus != GPU limit"
        cpus = int(params["num-cpus"])
        limit = int(resources["limits"]["cpu"])
        assert cpus == limit if name != "head" else cpus <= limit, f"{label} {name}: num-cpus {cpus} vs {limit}"


@pytest.mark.parametrize("label", KUBERAY_SPECS)
def test_minimum_gpu_workers_hold_the_default_number_of_training_workers(label):
    """The launcher checks the GPUs present before asking for workers, so the minimum must already fit."""
    default = ScalingSection.model_fields["num_workers"].default
    spec = KUBERAY_SPECS[label]()
    gpus = sum(g["minReplicas"] * _gpus(_ray_container(g)) for g in spec["workerGroupSpecs"])
    assert gpus >= default


def test_raycluster_head_service_is_the_one_the_retrain_cronjob_submits_to():
    address = _env(_cronjob_pod()["containers"][0])["RAY_ADDRESS"]["value"]
    assert address == f"http://{_raycluster()['metadata']['name']}-head-svc:8265"


def test_shared_volume_is_one_rwx_claim_mounted_at_the_same_path_in_every_pod():
    pvc = _pvc()
    assert pvc["metadata"]["name"] == SHARED_CLAIM
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "head and workers write checkpoints at once"
    paths = {}
    for where, pod in _pod_specs().items():
        claims = {
            v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == SHARED_CLAIM
        }
        assert claims, f"{where}: does not mount the claim {SHARED_CLAIM}"
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in claims]
        assert mounts, f"{where}: the claim is a volume but no container mounts it"
        paths[where] = set(mounts)
    assert len(set().union(*paths.values())) == 1, f"the shared volume is mounted at different paths: {paths}"


def test_cluster_launcher_mounts_the_shared_storage_at_the_kubernetes_path():
    shared = _pvc_mount_path()
    launcher = _launcher()
    assert f"--volume={shared}:{shared}" in launcher["docker"]["run_options"]
    assert any(f" {shared}" in command for command in launcher["initialization_commands"] if "mount" in command)


def _pvc_mount_path() -> str:
    head = _ray_container(_raycluster()["spec"]["headGroupSpec"])
    (path,) = [m["mountPath"] for m in head["volumeMounts"] if m["name"] == "shared"]
    return path


# ----------------------------------------------------------------------------------------------- RayJob


def test_rayjob_entrypoint_runs_a_shipped_job_with_a_config_that_validates_on_the_cluster(monkeypatch):
    spec = _rayjob()["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python"
    script, config_file = Path(argv[1]), Path(argv[2])
    assert script.parent == Path("jobs") and (REPO / script).is_file(), f"{script} is not a job in jobs/"
    assert config_file.parent == Path("configs") and (REPO / config_file).is_file(), f"{config_file} not in configs/"
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg in ("--set", "-s")]
    # The config is read on the cluster, where the runtime env sets these.
    for name, value in _rayjob_runtime_env()["env_vars"].items():
        monkeypatch.setenv(name, str(value))
    config = load_config(REPO / config_file, overrides)
    shared = _pvc_mount_path()
    assert config.output.dir.startswith(shared + "/"), "outputs and checkpoints must land on the shared volume"
    assert config.data.train.path.startswith(shared + "/"), "the data must be read from the shared volume"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["minReplicas"] * _gpus(_ray_container(g)) for g in workers)
    assert gpus >= config.scaling.num_workers * config.scaling.gpus_per_worker, "the job's workers do not fit"


def test_rayjob_runtime_env_is_the_cluster_runtime_env_plus_the_shared_paths():
    reference = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    runtime_env = _rayjob_runtime_env()
    assert runtime_env["pip"]["packages"] == reference["pip"]["packages"], "keep the pins of cluster/runtime_env.yaml"
    assert set(reference["excludes"]) <= set(runtime_env["excludes"])
    assert reference["env_vars"].items() <= runtime_env["env_vars"].items()
    shared = _pvc_mount_path()
    assert runtime_env["working_dir"].startswith(shared + "/"), "the submitter uploads the code from the volume"
    for name in ("DATA_DIR", "OUTPUT_DIR"):
        assert runtime_env["env_vars"][name].startswith(shared + "/")


def test_rayjob_cleans_up_after_itself():
    spec = _rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "GPU pods must not outlive the job"
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert spec["activeDeadlineSeconds"] > 0
    assert "--resume" in shlex.split(spec["entrypoint"]), "a retried RayJob must continue, not be refused"


# ------------------------------------------------------------------------------------------ version pins


def test_every_ray_image_is_the_ray_and_python_release_the_project_pins():
    pinned = _pinned_ray()
    python = SpecifierSet(_pyproject()["project"]["requires-python"])
    tags = {}
    for where, image in _ray_images().items():
        assert ":" in image and not image.endswith(":latest"), f"{where}: image {image} is not pinned"
        match = RAY_IMAGE_TAG.search(image.rsplit(":", 1)[1])
        assert match, f"{where}: tag of {image} names no Ray release and Python version (like 2.60.0-py311)"
        tags[where] = (match["ray"], f"{match['major']}.{match['minor']}")
    ray_versions = {ray for ray, _ in tags.values()}
    python_versions = {py for _, py in tags.values()}
    assert len(ray_versions) == 1, f"Ray releases differ between images: {tags}"
    assert len(python_versions) == 1, f"Python versions differ between images (Ray refuses to connect): {tags}"
    (ray_version,) = ray_versions
    (python_version,) = python_versions
    assert Version(ray_version) in pinned, f"images run Ray {ray_version}, pyproject.toml pins ray{pinned}"
    assert Version(python_version) in python, f"images run Python {python_version}, project needs {python}"
    for label, spec in KUBERAY_SPECS.items():
        assert spec()["rayVersion"] == ray_version, f"{label}: rayVersion differs from the image tags"


def test_runtime_envs_do_not_reinstall_a_different_ray():
    image_rays = {Version(RAY_IMAGE_TAG.search(image)["ray"]) for image in _ray_images().values()}
    runtime_envs = {
        "cluster/runtime_env.yaml": yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()),
        "RayJob runtimeEnvYAML": _rayjob_runtime_env(),
    }
    for where, runtime_env in runtime_envs.items():
        for line in runtime_env.get("pip", {}).get("packages", []):
            requirement = Requirement(line)
            if requirement.name == "ray":
                assert all(v in requirement.specifier for v in image_rays), f"{where}: {line} replaces the image's Ray"


# ---------------------------------------------------------------------------------------- auth and secrets


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_no_literal_secrets_only_secret_key_refs(path):
    text = path.read_text()
    for doc in yaml.safe_load_all(text):
        for mapping in _walk(doc):
            name = mapping.get("name")
            if isinstance(name, str) and _is_secret(name) and ("value" in mapping or "valueFrom" in mapping):
                assert "value" not in mapping, f"{path.name}: {name} has a literal value"
                assert "secretKeyRef" in mapping["valueFrom"], f"{path.name}: {name} is not from a Secret"
            # Runtime envs (files, runtimeEnvYAML) and docker --env options carry no secret either.
            env_vars = mapping.get("env_vars") or {}
            assert not [k for k in env_vars if _is_secret(k)], f"{path.name}: secret in env_vars"
            for option in (v for v in mapping.values() if isinstance(v, list)):
                names = [m[1] for o in option if isinstance(o, str) and (m := re.match(r"--env[= ](\w+)=", o))]
                assert not [n for n in names if _is_secret(n)], f"{path.name}: secret in docker --env"
        for runtime_env in (yaml.safe_load(m["runtimeEnvYAML"]) for m in _walk(doc) if "runtimeEnvYAML" in m):
            assert not [k for k in runtime_env.get("env_vars", {}) if _is_secret(k)], f"{path.name}: runtimeEnvYAML"
    assert not re.search(r"(WANDB_API_KEY|RAY_AUTH_TOKEN)=[^$\s]", text), f"{path.name}: a secret set inline"


def test_wandb_key_comes_from_a_secret_in_every_ray_pod():
    for label, spec in KUBERAY_SPECS.items():
        for name, group in _groups(spec()):
            ref = _env(_ray_container(group))["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref.get("optional") is True, f"{label} {name}: W&B must stay optional (offline without it)"


def test_token_auth_is_on_in_every_ray_process_and_uses_the_cronjobs_secret():
    cronjob_ref = _env(_cronjob_pod()["containers"][0])["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    containers = {
        f"{label} {name}": _ray_container(group)
        for label, spec in KUBERAY_SPECS.items() for name, group in _groups(spec())
    }
    containers["RayJob submitter"] = _rayjob()["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    containers["RayCluster autoscaler"] = _raycluster()["spec"]["autoscalerOptions"]
    for where, container in containers.items():
        env = _env(container)
        assert env["RAY_AUTH_MODE"].get("value") == "token", f"{where}: token auth is not on"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == cronjob_ref, f"{where}: another token Secret"
    launcher = _launcher()
    assert "--env=RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert launcher["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for path in MANIFESTS:
        assert not re.search(r"RAY_AUTH_MODE\W+disabled", path.read_text()), f"{path.name} turns auth off"


# --------------------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_config_is_valid_for_ray_up():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    launcher = _launcher()
    jsonschema.validate(launcher, schema)  # the schema `ray up` validates against
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    assert isinstance(launcher["max_workers"], int)
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) > 0 for t in workers.values()), "worker types have GPUs"
    assert types[launcher["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= launcher["max_workers"]
    assert all(t["max_workers"] <= launcher["max_workers"] for t in workers.values())
    default = ScalingSection.model_fields["num_workers"].default
    assert sum(t.get("min_workers", 0) * t["resources"]["GPU"] for t in workers.values()) >= default


def test_cluster_launcher_installs_the_synced_working_dir_on_every_node():
    launcher = _launcher()
    (remote,) = [remote for remote, local in launcher["file_mounts"].items() if local == "."]
    assert any(f"pip install -e \"{remote}" in c or f"pip install -e {remote}" in c for c in launcher["setup_commands"])
    assert ".venv" in launcher["rsync_exclude"], "never upload the local virtualenv"
    run_options = launcher["docker"]["run_options"]
    shared = _pvc_mount_path()
    for name in ("DATA_DIR", "OUTPUT_DIR"):
        (option,) = [o for o in run_options if o.startswith(f"--env={name}=")]
        assert option.split("=", 2)[2].startswith(shared + "/")
