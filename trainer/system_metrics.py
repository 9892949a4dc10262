"""System metrics of every node a training run uses, recorded into its MLflow run as `system/<node>/<metric>`.

Design:
- Who records: the first worker (lowest world rank) on each Ray node, not only world rank 0, so a run on
  N nodes holds N series of each metric. The figures are the node's (CPU, memory, disk and network are
  system-wide), so one sampler per node is enough. The workers find it by gathering their Ray node ids
  once (`first_worker_of_its_node`, a collective), not by Ray Train's local rank: Ray Train groups local
  ranks by node IP, so Ray nodes sharing an IP (several on one machine, as in the multi-node tests, or
  host-network containers) would count as one. Elsewhere the two are the same worker. It imports mlflow
  for this (about 3 s of CPU at start-up); on world rank 0's node the run logger has imported it already,
  so the cost is one worker per other node.
- What: MLflow's own samplers (`mlflow.system_metrics`): `cpu_utilization_percentage` (the node's CPUs,
  averaged since the previous sample), `system_memory_usage_megabytes|percentage`,
  `disk_usage_megabytes|percentage` and `disk_available_megabytes` (the root filesystem),
  `network_receive|transmit_megabytes` (all interfaces, since the sampler started) and, where
  `nvidia-ml-py` finds NVIDIA GPUs, `gpu_<i>_utilization_percentage`, `gpu_<i>_memory_usage_megabytes|percentage`
  and `gpu_<i>_power_usage_watts|percentage` (not measured yet: no GPU run has checked these fields).
- Node names: `<short hostname>-<first 8 hex digits of the Ray node id>`. The hostname makes it readable
  (a pod or VM name); the id prefix keeps two Ray nodes on one host apart (containers sharing a host
  name, or a test cluster on one machine) and finds the node in Ray's dashboard and logs. The name is
  stable for as long as the Ray node lives; a replaced node is a new name. Each recording node tags the
  run `hart.system_metrics.<name>` with its full Ray node id, IP, host name and GPU count (or "not
  measured": no NVML).
- When: from the end of the worker's setup (stage built, checkpoint restored) to the end of its training
  loop, a step raising included: the worker enters it into an `ExitStack` that closes when the loop ends.
  A sample every `tracking.system_metrics_interval_s` seconds (0: off), one MLflow step each (a sample
  counter, not the training step; not aligned across nodes). A restarted worker group continues after the
  highest `system/` step the run holds.
- The loop is this module's, the samplers MLflow's: `SystemMetricsMonitor.start()`'s loop drops the
  samples of the interval under way when it is stopped, polls the run's status each interval, and its
  settings yield to MLFLOW_SYSTEM_METRICS_* environment variables. Here each sample is logged as taken,
  stopping takes and logs one last sample (so a run shorter than the interval still has one point per
  node, and every series reaches the end of training), the setting alone decides the interval and this
  module the node names, and a store error ends the sampling with a warning, never the training.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from dataclasses import dataclass

import torch.distributed as dist

_logger = logging.getLogger(__name__)

NODE_TAG_PREFIX = "hart.system_metrics."  # + node name: the node's Ray id, IP, host and GPUs
METRIC_PREFIX = "system/"  # MLflow's: system/<node>/<metric>
NODE_ID_DIGITS = 8
# The series every recording node has, GPU or not (MLflow's CPU, disk and network samplers).
NODE_METRICS = ("cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
                "disk_usage_megabytes", "disk_usage_percentage", "disk_available_megabytes",
                "network_receive_megabytes", "network_transmit_megabytes")


@dataclass(frozen=True)
class NodeIdentity:
    """A Ray node as the metric keys and the run's tags name it."""

    hostname: str
    ray_node_id: str  # hex
    ip: str

    @property
    def name(self) -> str:
        """`<short hostname>-<first 8 hex digits of the Ray node id>`, with characters MLflow keys refuse as `_`."""
        short = self.hostname.split(".")[0] or "node"
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{short}-{self.ray_node_id[:NODE_ID_DIGITS]}")


def this_node() -> NodeIdentity:
    """The Ray node this process runs on (a Ray worker)."""
    import ray

    return NodeIdentity(socket.gethostname(), ray.get_runtime_context().get_node_id(),  # [ray]
                        ray.util.get_node_ip_address())  # [ray]


def first_worker_of_its_node(node: NodeIdentity) -> bool:
    """Whether this worker has the lowest world rank among the workers on its Ray node. A collective: every
    rank calls it (one all-gather of the node ids); True without a process group of several ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    node_ids: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(node_ids, node.ray_node_id)
    return node_ids.index(node.ray_node_id) == dist.get_rank()


def metric_key(node_name: str, metric: str) -> str:
    """The run's key of one node's metric, e.g. `system/host-1a2b3c4d/cpu_utilization_percentage`."""
    return f"{METRIC_PREFIX}{node_name}/{metric}"


class NodeSystemMetrics:
    """Samples this node's system metrics into a run from `start()` to `stop()` (also a context manager);
    does nothing when `node` is None (not the node's first worker), `interval_s` is 0 or there is no run."""

    def __init__(self, tracking_uri: str, run_id: str, interval_s: float, node: NodeIdentity | None):
        self.enabled = node is not None and interval_s > 0 and bool(run_id)
        self.tracking_uri, self.run_id, self.interval_s, self.node = tracking_uri, run_id, interval_s, node
        self.monitor = None  # mlflow's SystemMetricsMonitor: its samplers and its batch logger
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.failed = False  # a sample could not be logged: sampling ended

    @classmethod
    def of_worker(cls, plan) -> NodeSystemMetrics:
        """The recorder of a Ray Train worker (`plan`: trainer.plan.RunPlan), active on the first worker of each
        Ray node. Every rank calls it: unless the run's setting is off, it makes a collective."""
        interval_s = plan.config.tracking.system_metrics_interval_s
        node = None
        if interval_s > 0 and plan.run_id:  # the same on every rank: all of them gather, or none
            node = this_node()
            node = node if first_worker_of_its_node(node) else None
        return cls(plan.tracking_uri, plan.run_id, interval_s, node)

    def start(self) -> NodeSystemMetrics:
        if not self.enabled:
            return self
        import psutil
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        # resume_logging: steps continue after the run's highest system/ step (a restarted worker group).
        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval_s, samples_before_logging=1,
                                            resume_logging=True, node_id=self.node.name, tracking_uri=self.tracking_uri)
        self.monitor.node_id = self.node.name  # not MLFLOW_SYSTEM_METRICS_NODE_ID: one name per node
        gpus = sum(getattr(m, "num_gpus", 0) for m in self.monitor.monitors)
        MlflowClient(tracking_uri=self.tracking_uri).set_tag(
            self.run_id, NODE_TAG_PREFIX + self.node.name,
            f"ray_node_id={self.node.ray_node_id} ip={self.node.ip} host={self.node.hostname} "
            f"gpus={gpus if gpus else 'not measured'}")
        psutil.cpu_percent()  # opens the window the first sample's CPU utilisation averages over
        self.thread = threading.Thread(target=self.sample_until_stopped, daemon=True, name="NodeSystemMetrics")
        self.thread.start()
        return self

    def sample_until_stopped(self) -> None:
        while not self.stopping.wait(self.interval_s):
            if not self.log_sample():
                return

    def log_sample(self) -> bool:
        """Take one sample of every sampler and log it as the next step; False (and a warning) if the store failed."""
        try:
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
            self.monitor.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001 - any store error: metrics are lost, training goes on
            _logger.warning("system metrics of node %s stopped: %s: %s", self.node.name, type(exc).__name__, exc)
            self.failed = True
            return False
        return True

    def stop(self) -> None:
        """Stop sampling and log a last sample (unless the store failed before)."""
        if self.thread is None:
            return
        self.stopping.set()
        self.thread.join()
        self.thread = None
        if not self.failed:
            self.log_sample()

    def __enter__(self) -> NodeSystemMetrics:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


__all__ = ["NodeSystemMetrics", "NodeIdentity", "this_node", "first_worker_of_its_node", "metric_key", "NODE_TAG_PREFIX", "METRIC_PREFIX",
           "NODE_METRICS"]
