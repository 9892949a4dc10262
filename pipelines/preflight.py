"""The precompute job's checks before its first write (the manifest), and its paths made absolute.

Design: a bad input should cost one line naming the setting to fix, not a manifest left behind or a
retry loop per shard. `preflight` checks, in order: on a cluster of several nodes, the paths as the
user gave them (a relative one names the driver's working directory, which no other node shares;
under `ray job submit` not even a shared filesystem holds it); then, with every path made absolute
on the driver (`PrecomputeConfig` paths through `with_absolute_paths`, since Ray's actors do not
start in its working directory), each S3 store read or written (one short request per bucket,
`storage.check_stores`) and the tokenizer checkpoint. Shards listed later are checked per shard by
`run_precompute`.
"""

from __future__ import annotations

from pipelines import storage
from pipelines.config import PrecomputeConfig, with_absolute_paths


def preflight(config: PrecomputeConfig, num_nodes: int) -> PrecomputeConfig:
    """The config with absolute paths, after the checks above; ValueError naming the setting otherwise."""
    storage.check_reachable({"output": config.output, "tokenizer.checkpoint": config.tokenizer.checkpoint},
                            num_nodes, config.shared_filesystem)
    storage.check_reachable({"input.list_file": config.input.list_file,  # relative ones here; local shards later
                             **{f"input.shards[{i}]": shard for i, shard in enumerate(config.input.shards)}},
                            num_nodes, shared_filesystem=True)
    config = with_absolute_paths(config)
    inputs = {f"input.shards[{i}]": shard for i, shard in enumerate(config.input.shards)}
    if config.input.list_file:
        inputs["input.list_file"] = config.input.list_file
    storage.check_stores(inputs, config.input.endpoint_url, "input.endpoint_url")
    storage.check_store(config.output, config.output_endpoint(), "output", config.output_endpoint_setting())
    if config.tokenizer.checkpoint:
        storage.check_exists(config.tokenizer.checkpoint, config.input.endpoint_url, "tokenizer.checkpoint",
                             "input.endpoint_url")
    return config


__all__ = ["preflight"]
