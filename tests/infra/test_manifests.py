"""Static checks of the deployment files under infra/ (no cluster, no Docker daemon needed).

Design: the manifests are data, so these tests load them with the same parsers the tools use
(PyYAML multi-document, Ray's own cluster-launcher schema and RuntimeEnv validation) and check
the cross-file contracts that break silently in production: RayJob entrypoints naming real
`jobs/<module>.py` files and real `--config` files, GPU counts agreeing between k8s resources,
tolerations and `ray start` params, token auth on, MLflow auth on, loopback binding for local
servers. The cluster checker is itself run on planted errors so that it cannot pass silently.
Images, credentials and the README are checked in test_images_and_secrets.py. Budget: a few
seconds (Ray import included).
Why one module of this length: the checks are of contracts between the manifests (entrypoints, GPU
counts, auth settings), so they read the same parsed set of files.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
RAY_VERSION = "2.60.0"
IMAGE_WORKDIR = "/home/ray/hart"  # the Dockerfile's WORKDIR: where the code and jobs/configs/ live
TRAIN_STAGES = ("tokenizer", "ar", "diffusion", "joint")
KNOWN_KINDS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "PersistentVolume": "v1",
    "PersistentVolumeClaim": "v1",
}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume"}
# Read-only S3 prefix mounts (s3-volumes.yaml) every Ray pod carries: mount path -> claim name.
S3_MOUNTS = {"/mnt/s3/weights": "hart-s3-weights", "/mnt/s3/checkpoints": "hart-s3-checkpoints"}
EXPECTED_FILES = [
    "docker/Dockerfile",
    "kuberay/serviceaccount.yaml",
    "kuberay/s3-volumes.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob-precompute.yaml",
    *(f"kuberay/rayjob-train-{stage}.yaml" for stage in TRAIN_STAGES),
    "ray/cluster.yaml",
    "ray/runtime_env.yaml",
    "mlflow/mlflow.yaml",
    "mlflow/postgres.yaml",
    "mlflow/Dockerfile",
    "mlflow/local.sh",
    "README.md",
]


# --------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.lru_cache(maxsize=None)
def load_documents(path: Path) -> list[dict[str, Any]]:
    """Parsed once per session (the manifests are large); tests that mutate a document deep-copy it first."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc is not None]


def kubernetes_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for sub in ("kuberay", "mlflow") for path in sorted((INFRA / sub).glob("*.yaml")) for doc in load_documents(path)]


def documents_of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in kubernetes_documents() if doc.get("kind") == kind]


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """The RayCluster spec plus every RayJob's embedded rayClusterSpec."""
    specs = [(f"{p.name}:RayCluster", doc["spec"]) for p, doc in documents_of_kind("RayCluster")]
    specs += [(f"{p.name}:RayJob", doc["spec"]["rayClusterSpec"]) for p, doc in documents_of_kind("RayJob")]
    return specs


def ray_groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every pod spec inside a k8s object (Deployment/StatefulSet templates, Ray groups)."""
    spec = doc.get("spec", {})
    if doc.get("kind") in ("Deployment", "StatefulSet"):
        yield spec["template"]["spec"]
    elif doc.get("kind") == "RayCluster":
        for _, group in ray_groups(spec):
            yield group["template"]["spec"]
    elif doc.get("kind") == "RayJob":
        for _, group in ray_groups(spec["rayClusterSpec"]):
            yield group["template"]["spec"]


def parse_quantity(value: Any) -> float:
    """k8s quantity -> float (cpu cores or bytes): '500m', '8', '32Gi', '8G'."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match and match.group(2) in ("", *suffixes), f"unparsable quantity {value!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1.0)


def entrypoint_arguments(entrypoint: str) -> tuple[str, dict[str, str], list[str]]:
    """'python -m jobs.train --stage ar --config F --set a=1' -> ('train', {'--stage': 'ar', '--config': 'F'}, ['a=1'])."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "-m"] and words[2].startswith("jobs."), f"entrypoint must be `python -m jobs.<module> ...`: {entrypoint!r}"
    options: dict[str, str] = {}
    overrides: list[str] = []
    rest = words[3:]
    assert len(rest) % 2 == 0, f"flags must come as `--flag value` pairs: {entrypoint!r}"
    for flag, value in zip(rest[0::2], rest[1::2]):
        assert flag.startswith("--"), f"unexpected word {flag!r} in {entrypoint!r}"
        if flag == "--set":
            overrides.append(value)
        else:
            options[flag] = value
    return words[2].removeprefix("jobs."), options, overrides


# --------------------------------------------------------------------------------------
# Parsing and object kinds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", EXPECTED_FILES)
def test_expected_infra_file_exists(relative):
    assert (INFRA / relative).is_file(), f"infra/{relative} is missing"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses_to_mappings(path):
    documents = load_documents(path)
    assert documents, f"{path} has no YAML documents"
    assert all(isinstance(doc, dict) for doc in documents), f"{path}: every document must be a mapping"


def test_kubernetes_objects_have_expected_kinds_and_api_versions():
    documents = kubernetes_documents()
    assert documents
    for path, doc in documents:
        kind = doc.get("kind")
        assert kind in KNOWN_KINDS, f"{path.name}: unexpected kind {kind!r}"
        assert doc.get("apiVersion") == KNOWN_KINDS[kind], f"{path.name}: {kind} needs apiVersion {KNOWN_KINDS[kind]}, got {doc.get('apiVersion')}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {kind} without metadata.name"
        if kind not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") in ("hart", "hart-mlflow"), f"{path.name}: {kind} {doc['metadata']['name']} needs a namespace"
    assert len(documents_of_kind("RayCluster")) == 1


# --------------------------------------------------------------------------------------
# RayJobs: entry points, configs, lifecycle
# --------------------------------------------------------------------------------------


def test_one_rayjob_per_pipeline_step():
    steps = set()
    for _, doc in documents_of_kind("RayJob"):
        module, options, _ = entrypoint_arguments(doc["spec"]["entrypoint"])
        steps.add(module if module != "train" else f"train:{options.get('--stage')}")
    assert steps == {"precompute", *(f"train:{stage}" for stage in TRAIN_STAGES)}


@pytest.mark.parametrize("path", sorted((INFRA / "kuberay").glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_entrypoint_references_existing_module_and_config(path):
    (doc,) = load_documents(path)
    module, options, overrides = entrypoint_arguments(doc["spec"]["entrypoint"])
    assert (REPO / "jobs" / f"{module}.py").is_file(), f"{path.name}: jobs/{module}.py does not exist"
    assert "--config" in options, f"{path.name}: entrypoint has no --config"
    config_path = REPO / options["--config"]
    assert config_path.is_file(), f"{path.name}: config {options['--config']} does not exist"
    if module == "train":
        assert options.get("--stage") in TRAIN_STAGES, f"{path.name}: --stage must be one of {TRAIN_STAGES}"
        assert config_path.name == f"train_{options['--stage']}.yaml"
    else:
        assert options["--config"] == f"jobs/configs/{module}.yaml"
    for override in overrides:
        value = override.partition("=")[2]
        if value.startswith("/mnt/"):
            assert any(value.startswith(m + "/") for m in S3_MOUNTS), f"{path.name}: {value} is not under a mounted S3 prefix"
    # The job's own loader validates the file plus every --set override (unknown keys, types,
    # preset names), after the placeholders are filled as envsubst would.
    filled = [re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: f"example-{m.group(1).lower()}", o) for o in overrides]
    if module == "train":
        from trainer.config import load_train_config

        config = load_train_config(str(config_path), options["--stage"], filled)
        assert config.stage == options["--stage"]
        assert config.scaling.use_gpu, f"{path.name}: cluster training runs on the GPU group"
        # Ray Train's worker group must fit the RayJob's GPU pods exactly (no idle or missing GPUs).
        gpu_group = dict(ray_groups(doc["spec"]["rayClusterSpec"]))["gpu-a100"]
        gpus_per_pod = int(gpu_group["rayStartParams"]["num-gpus"])
        assert config.scaling.max_workers * config.scaling.gpus_per_worker == gpu_group["replicas"] * gpus_per_pod, (
            f"{path.name}: {config.scaling.max_workers} workers x {config.scaling.gpus_per_worker} GPUs != the GPU pods' total")
        if config.scaling.elastic:  # the autoscaler's range covers the elastic range, pod for pod
            assert gpu_group["maxReplicas"] == gpu_group["replicas"] and doc["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling")
            assert config.scaling.min_workers * config.scaling.gpus_per_worker == gpu_group["minReplicas"] * gpus_per_pod, (
                f"{path.name}: {config.scaling.min_workers} workers at least, the GPU group keeps {gpu_group['minReplicas']} pods")
            assert config.run.max_failures > 0, f"{path.name}: an elastic run restarts after each node loss: run.max_failures"
        workers_per_pod = gpus_per_pod / config.scaling.gpus_per_worker
        assert workers_per_pod * config.scaling.cpus_per_worker <= float(gpu_group["rayStartParams"]["num-cpus"]), (
            f"{path.name}: cpus_per_worker leaves no room on a GPU pod")
    else:
        from pipelines.config import load_precompute_config

        load_precompute_config(str(config_path), filled)


@pytest.mark.parametrize("path", sorted((INFRA / "kuberay").glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_lifecycle_and_runtime_env(path):
    from ray.runtime_env import RuntimeEnv

    (doc,) = load_documents(path)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["activeDeadlineSeconds"], int) and 3600 <= spec["activeDeadlineSeconds"] <= 14 * 86400
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    env_vars = runtime_env["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"].startswith("http://mlflow.hart-mlflow.svc.cluster.local:")
    for name in env_vars:
        assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", name), f"{path.name}: {name} must come from a k8s Secret, not runtimeEnvYAML"
    # The code ships from the image's checkout (Dockerfile WORKDIR); Ray checks paths exist, so
    # validate the rest of the runtime env against this checkout instead.
    assert runtime_env["working_dir"] == IMAGE_WORKDIR
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})


# --------------------------------------------------------------------------------------
# Ray cluster shape: resources, GPUs, auth, identity
# --------------------------------------------------------------------------------------


def ray_cluster_problems(name: str, spec: dict[str, Any]) -> list[str]:
    """Everything wrong with one Ray cluster spec (empty list = consistent)."""
    problems = []

    def check(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    check(spec.get("rayVersion") == RAY_VERSION, f"{name}: rayVersion must match the image's Ray {RAY_VERSION}")
    check(spec.get("authOptions", {}).get("mode") == "token", f"{name}: token auth must be on")
    check(spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: the head must not run tasks")
    groups = dict(ray_groups(spec))
    check({"head", "cpu-decode", "gpu-a100"} <= set(groups), f"{name}: expected head, cpu-decode and gpu-a100 groups")
    for group_name, group in groups.items():
        where = f"{name}/{group_name}"
        if group_name != "head":
            check(group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where}: replicas out of [min, max]")
        pod = group["template"]["spec"]
        check(pod.get("serviceAccountName") == "hart-ray", f"{where}: S3 access goes through the IRSA service account")
        (container,) = pod["containers"]
        check(container["image"] == "${HART_IMAGE}", f"{where}: all Ray pods run the project image")
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts_by_path = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        for mount_path, claim in S3_MOUNTS.items():
            mount = mounts_by_path.get(mount_path, {})
            check(claims.get(mount.get("name")) == claim and mount.get("readOnly") is True,
                  f"{where}: needs {claim} mounted read-only at {mount_path}")
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        for resource in ("cpu", "memory"):
            check(parse_quantity(requests[resource]) <= parse_quantity(limits[resource]), f"{where}: {resource} request > limit")
        params = group["rayStartParams"]
        if "num-cpus" in params:
            check(float(params["num-cpus"]) <= parse_quantity(limits["cpu"]), f"{where}: num-cpus above the CPU limit")
        gpus_requested, gpus_limited = requests.get("nvidia.com/gpu"), limits.get("nvidia.com/gpu")
        tolerations = {(t.get("key"), t.get("effect")) for t in pod.get("tolerations", [])}
        if gpus_requested or gpus_limited:
            check(str(gpus_requested) == str(gpus_limited), f"{where}: nvidia.com/gpu request {gpus_requested} != limit {gpus_limited}")
            check(params.get("num-gpus") == str(gpus_limited), f"{where}: rayStartParams num-gpus must equal nvidia.com/gpu")
            check(("nvidia.com/gpu", "NoSchedule") in tolerations, f"{where}: GPU pods need the nvidia.com/gpu toleration")
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            check("/dev/shm" in mounts, f"{where}: GPU pods need a memory-backed /dev/shm for the object store")
        else:
            check(params.get("num-gpus", "0") == "0", f"{where}: num-gpus without nvidia.com/gpu resources")
    return problems


@pytest.mark.parametrize("name,spec", ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_cluster_spec_is_consistent(name, spec):
    assert ray_cluster_problems(name, spec) == []


def gpu_container(spec: dict[str, Any]) -> dict[str, Any]:
    return dict(ray_groups(spec))["gpu-a100"]["template"]["spec"]["containers"][0]


PLANTED_CLUSTER_ERRORS = {
    "gpu request != limit": lambda spec: gpu_container(spec)["resources"]["requests"].update({"nvidia.com/gpu": "4"}),
    "num-gpus mismatch": lambda spec: dict(ray_groups(spec))["gpu-a100"]["rayStartParams"].update({"num-gpus": "4"}),
    "no GPU toleration": lambda spec: dict(ray_groups(spec))["gpu-a100"]["template"]["spec"].pop("tolerations"),
    "cpu request > limit": lambda spec: gpu_container(spec)["resources"]["requests"].update({"cpu": "200"}),
    "memory request > limit": lambda spec: gpu_container(spec)["resources"]["requests"].update({"memory": "2Ti"}),
    "auth off": lambda spec: spec["authOptions"].update({"mode": "disabled"}),
    "num-gpus on CPU group": lambda spec: dict(ray_groups(spec))["cpu-decode"]["rayStartParams"].update({"num-gpus": "1"}),
    "no IRSA account": lambda spec: dict(ray_groups(spec))["cpu-decode"]["template"]["spec"].pop("serviceAccountName"),
    "writable S3 mount": lambda spec: [m.pop("readOnly") for m in gpu_container(spec)["volumeMounts"] if m["mountPath"] == "/mnt/s3/weights"],
}


@pytest.mark.parametrize("planted", sorted(PLANTED_CLUSTER_ERRORS))
def test_cluster_checker_catches_planted_errors(planted):
    name, spec = ray_cluster_specs()[0]
    spec = copy.deepcopy(spec)
    PLANTED_CLUSTER_ERRORS[planted](spec)
    assert ray_cluster_problems(name, spec), f"checker missed: {planted}"


def test_training_rayjobs_use_the_64_gpu_layout():
    for path, doc in documents_of_kind("RayJob"):
        module, options, _ = entrypoint_arguments(doc["spec"]["entrypoint"])
        if options.get("--stage") in ("ar", "diffusion", "joint"):
            groups = dict(ray_groups(doc["spec"]["rayClusterSpec"]))
            gpu_group = groups["gpu-a100"]
            total = gpu_group["replicas"] * int(gpu_group["rayStartParams"]["num-gpus"])
            assert total == 64, f"{path.name}: {total} GPUs, expected the documented 64-GPU run"


def test_secret_valued_env_vars_come_from_secrets_and_auth_is_never_disabled():
    for path, doc in kubernetes_documents():
        for pod in pod_specs(doc):
            for container in pod["containers"]:
                for env in container.get("env", []):
                    if re.search(r"PASSWORD|SECRET|TOKEN|STORE_URI|ACCESS_KEY", env["name"]):
                        assert "secretKeyRef" in env.get("valueFrom", {}), f"{path.name}: {env['name']} must use valueFrom.secretKeyRef"
                    assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") == "disabled"), f"{path.name}: Ray auth disabled"


def test_ray_service_account_uses_irsa():
    (account,) = [doc for _, doc in documents_of_kind("ServiceAccount") if doc["metadata"]["name"] == "hart-ray"]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\$\{AWS_ACCOUNT_ID\}:role/[\w-]+", role)


def test_s3_volumes_are_read_only_prefix_mounts_with_pod_identity():
    volumes = {doc["metadata"]["name"]: doc for _, doc in documents_of_kind("PersistentVolume")}
    claims = {doc["metadata"]["name"]: doc for _, doc in documents_of_kind("PersistentVolumeClaim")}
    assert set(volumes) == set(claims) == set(S3_MOUNTS.values())
    for mount_path, name in S3_MOUNTS.items():
        volume, claim = volumes[name]["spec"], claims[name]["spec"]
        assert volume["accessModes"] == ["ReadOnlyMany"] == claim["accessModes"]
        assert "read-only" in volume["mountOptions"], f"{name}: the S3 mount must be read-only"
        prefix = mount_path.rsplit("/", 1)[1] + "/"
        assert f"prefix {prefix}" in volume["mountOptions"], f"{name}: must mount only s3://BUCKET/{prefix}"
        assert volume["csi"]["driver"] == "s3.csi.aws.com"
        assert volume["csi"]["volumeAttributes"] == {"bucketName": "${HART_BUCKET}", "authenticationSource": "pod"}
        assert volume["claimRef"] == {"namespace": "hart", "name": name} and claim["volumeName"] == name


# --------------------------------------------------------------------------------------
# Cluster launcher and runtime env
# --------------------------------------------------------------------------------------


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"].get("CPU") == 0
    assert any(t["resources"].get("GPU") for t in node_types.values()), "needs a GPU worker type"
    assert any(not t["resources"].get("GPU") and name != config["head_node_type"] for name, t in node_types.items()), "needs a CPU worker type"
    for name, node_type in node_types.items():
        profile = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert ":instance-profile/" in profile, f"{name}: S3 access must come from an IAM instance profile"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        text = " ".join(commands)
        assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN_PATH=" in text, "token auth must be on for ray start"
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_job_runtime_env_excludes_local_state_and_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load((INFRA / "ray" / "runtime_env.yaml").read_text())
    assert {".venv", "runs", ".git"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})


# --------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------


def mlflow_deployment() -> dict[str, Any]:
    (deployment,) = [doc for _, doc in documents_of_kind("Deployment") if doc["metadata"]["name"] == "mlflow"]
    return deployment


def test_mlflow_server_has_auth_postgres_and_s3_artifacts():
    (container,) = mlflow_deployment()["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "server"
    assert "--app-name=basic-auth" in args
    assert "--serve-artifacts" in args
    assert any(re.fullmatch(r"--artifacts-destination=s3://\$\{HART_BUCKET\}/mlflow/", a) for a in args)
    assert not any(a.startswith("--disable-security-middleware") for a in args)
    allowed = [a for a in args if a.startswith("--allowed-hosts=")]
    assert allowed and "*" != allowed[0].split("=", 1)[1], "--allowed-hosts must be an explicit list"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert "secretKeyRef" in env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/etc/mlflow-auth/")
    postgres = [doc for _, doc in documents_of_kind("StatefulSet") if doc["metadata"]["name"] == "mlflow-postgres"]
    assert postgres, "PostgreSQL backend StatefulSet missing"


def test_services_stay_inside_the_cluster():
    services = documents_of_kind("Service")
    assert services
    for path, service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: {service['metadata']['name']} must not be exposed outside the cluster"
    policies = [doc for _, doc in documents_of_kind("NetworkPolicy")]
    assert any(p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"} for p in policies)


def test_local_servers_bind_to_loopback():
    local = (INFRA / "mlflow" / "local.sh").read_text()
    assert "--host 127.0.0.1" in local and "0.0.0.0" not in local
    assert "sqlite:///" in local and "--default-artifact-root" in local
    mlflow_dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert '"--host", "127.0.0.1"' in mlflow_dockerfile, "the image's default command must bind to loopback"
