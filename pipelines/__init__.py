"""Ray Data pre-tokenization: WebDataset image-text shards -> token + residual Parquet caches.

Stages live in one module each (`shard_source` read, `decode`, `tokenize_stage`, `text_stage`,
`writer`), composed by `plan.run_precompute`; `cache` is the training-side reader and
`manifest` the on-disk contract between the two. `shapes` and `hostile_shards` generate test
corpora. Nothing here calls `ray.init` (`trainer.ray_session.connect` does, for every job).
"""
