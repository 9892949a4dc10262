"""The trainer: what hart-train, hart-evaluate and the demo run (run config and plan, stages, data, the
worker loop, checkpoints, MLflow tracking, exports, evaluation). `jobs/` holds the entry points over it."""
