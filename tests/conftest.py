"""Shared test fixtures: one local Ray instance and one S3 server (moto) for the whole session.

Fixtures (reuse them; they are generic):
- `ray_local`     session scope: `ray.init(address="local", num_cpus=2, include_dashboard=False)` once (with
                  RAY_AUTH_MODE=disabled), shut down at the end. Request it in any test that
                  runs Ray Data or Ray Train; starting Ray costs ~8 s, so never start your own.
- `s3_endpoint`   session scope: moto's `ThreadedMotoServer` on 127.0.0.1 and a free port,
                  reached over real HTTP; yields the endpoint URL ("http://127.0.0.1:PORT").
- `s3_bucket`     function scope: a fresh bucket on that server; yields "s3://<bucket>".
                  Pass the endpoint explicitly (`endpoint_url=` options, `s3_filesystem(...)`,
                  `boto3.client("s3", endpoint_url=...)`).
- `s3_strict_endpoint` session scope: a second moto S3 server, in its own process, that checks
                  credentials as AWS does (`INITIAL_NO_AUTH_ACTION_COUNT=0`): it knows no key, so every
                  request is refused with 403. Yields its endpoint URL.
- `s3_env`        function scope: like `s3_bucket`, and also sets AWS_ENDPOINT_URL for the test
                  (code that only honours the env var), restored afterwards.
- `ray_cluster`   module scope: a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`):
                  a head with no CPUs (it runs only the driver and Ray's own services) and two worker
                  nodes "node_a" / "node_b" of 2 CPUs each, each with its own custom resource of that
                  name (pin a task or actor with `resources={"node_a": 0.01}`) and the shared "worker"
                  resource. It yields a `MultiNode` (cluster, head, nodes by name, `node_name(id)`).
                  The session's local instance (`ray_local`) is shut down for the module and started
                  again afterwards. Only S3 is shared storage between its nodes, by convention.
- `no_ray_deprecations` autouse: fails a test during which Ray logged a deprecation (tests/ray_deprecations.py;
                  pyproject.toml's filterwarnings does the same for deprecation warnings raised by project code).
- `tiny_lpips_weights` function scope: a tiny LPIPS metric (VGG trunk widths 4..16) written as two local
                  files the way users bring the real ones: the trunk with torchvision's `features.*` keys
                  (plus an unused classifier key, as a full torchvision checkpoint has) and the heads
                  `lin{i}.model.1.weight`; yields their paths.

Fake credentials: at import this file sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY to
"testing", AWS_REGION to us-east-1 and AWS_EC2_METADATA_DISABLED=true, unless already set, so
they exist before Ray starts its workers (workers inherit the environment of `ray.init`).
"""

from __future__ import annotations

import os
import uuid

import pytest

for _name, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                      ("AWS_REGION", "us-east-1"), ("AWS_DEFAULT_REGION", "us-east-1"),
                      ("AWS_EC2_METADATA_DISABLED", "true"), ("RAY_AUTH_MODE", "disabled"),
                      ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    if started_here:
        ray.shutdown()


WORKER_NODES = ("node_a", "node_b")


class MultiNode:
    def __init__(self, cluster, head, nodes):
        self.cluster, self.head, self.nodes = cluster, head, nodes

    def node_name(self, node_id: str) -> str:
        """'head', 'node_a' ... for a Ray node id (hex)."""
        for name, node in {"head": self.head, **self.nodes}.items():
            if node.node_id == node_id:
                return name
        raise KeyError(node_id)

    def remove(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def add(self, name: str):
        self.nodes[name] = self.cluster.add_node(num_cpus=2, resources={name: 1.0, "worker": 1.0},
                                                 object_store_memory=150 * 1024 * 1024)
        self.cluster.wait_for_nodes()
        return self.nodes[name]


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """A head and two worker nodes (`cluster_utils`) for one module's tests. It asks for `ray_local`
    first, so the session's local instance exists before the cluster replaces it and is started again
    after it: a session fixture first requested during the module (train_assets) would otherwise be
    left holding a Ray that the cluster's teardown shut down."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"head": 1.0}, "object_store_memory": 150 * 1024 * 1024,
        "include_dashboard": False})
    multi = MultiNode(cluster, cluster.head_node, {})
    try:
        for name in WORKER_NODES:
            multi.add(name)
        ray.init(address=cluster.address)
        yield multi
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False)


@pytest.fixture(scope="session")
def s3_endpoint():
    from trainer.local_services import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_strict_endpoint():
    import subprocess
    import sys

    from trainer.local_services import free_port, stop_process_group, wait_for_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(server, port, "the strict moto server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(server, grace_s=10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture
def s3_env(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    yield s3_bucket


# Training fixtures (tiny tokenizer + shards + real token cache, a real `mlflow server`) live in one
# module so that tests/jobs and tests/faults share a single session-scoped copy.
from tests.training_fixtures import mlflow_server, train_assets  # noqa: E402,F401  (pytest fixtures)
from tests.ray_deprecations import RayDeprecationLog  # noqa: E402


@pytest.fixture(autouse=True)
def no_ray_deprecations():
    """Fails a test during which Ray logged a deprecation (tests/ray_deprecations.py)."""
    with RayDeprecationLog() as log:
        yield log
    if log.messages:
        pytest.fail("Ray deprecation caused by project code:\n" + "\n".join(log.messages), pytrace=False)


TINY_VGG = (4, 8, 8, 16, 16)


@pytest.fixture
def tiny_lpips_weights(tmp_path) -> list[str]:
    import torch

    from hart.tokenizer.perceptual import PerceptualLoss
    from hart.weights import save_weight_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = PerceptualLoss(TINY_VGG).state_dict()
    trunk = {k: v for k, v in state.items() if k.startswith("features.")}
    heads = {k: v.abs() for k, v in state.items() if k.startswith("lin")}  # LPIPS heads are >= 0
    paths = [tmp_path / "lpips" / "vgg16.pth", tmp_path / "lpips" / "lpips_vgg.safetensors"]
    save_weight_file({**trunk, "classifier.0.weight": torch.zeros(2, 2)}, paths[0])
    save_weight_file(heads, paths[1])
    return [str(p) for p in paths]
