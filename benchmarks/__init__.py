"""Benchmarks: one module per benchmark, each run from the repository root as `python -m benchmarks.NAME`.

Each module's docstring says what it measures, how, and the command; `BENCHMARKS.md` holds the
current figures, with the machine and the date they were measured. Benchmarks call the code they
measure (the training worker's own setup and step, the precompute plan, the cache reader): nothing
is re-implemented for the benchmark.

Benchmarks (figures in `BENCHMARKS.md`):
  tokenizer     tokenizer encode / decode images/s and peak memory
  transformer   transformer training step and sampling; segment attention forward + backward
  step_ops      aten operators dispatched per training step (the CPU proxy of GPU launches)
  precompute    the precompute pipeline against a bare decode + encode loop
  data_plane    route, shard writers, storage and the cache reader at 1024px row sizes
  planning      planning a 100k-shard precompute run, and the cache bookkeeping it leaves
  ray_overhead  Ray Train's overhead per step against the worker's step in a bare loop
  online        training from the cache against online training (data wait)
  mfu           `hart-0.7b` GPU step time and model FLOPs utilisation
  gpu           every GPU figure in one call, one table (`--smoke`: the same code on the CPU)
  load          a 200-shard precompute on 2 CPUs (peak memory) and the trainer's data wait
  cost_table    cache size and cluster cost per dataset size, from the schema and stated rates
  colour_probe  where a shapes tokenizer loses colour (a diagnostic, not a speed figure)

Shared machinery, not benchmarks: `processes` (process trees, thread pinning, host steal, the one
memory sampler, all through psutil) and `turns` (two process groups taking turns, for paired timing
on a host whose speed drifts).
"""
