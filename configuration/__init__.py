"""Configuration loading shared by every package: typed dataclasses from dicts, files and overrides.

The lowest layer of the tree (`configuration` <- `hart` <- `pipelines` <- `jobs`): the model library
reads its checkpoints' `config.json` through it, the pipelines and jobs read their YAML run configs
through it, and nothing in it knows about models. Modules: `loader` (configs) and `cli` (the command
lines' shared help conventions).
"""
