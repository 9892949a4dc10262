"""Ray job entry points (precompute, train, generate, demo): the only code that calls ray.init, ray.train or mlflow."""
