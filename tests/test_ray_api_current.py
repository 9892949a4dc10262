"""No deprecated Ray call in project code, and the two checks that enforce it can fail.

The checks run around every test (tests/ray_deprecations.py, pyproject.toml's filterwarnings); these
tests show that each catches the kind of deprecation it is meant for, through Ray's own reporting.
"""

from __future__ import annotations

import warnings

import pytest
from ray.util.annotations import Deprecated

from tests.ray_deprecations import RayDeprecationLog
from trainer.evaluation import EvaluationConfig, _actor_options


class Identity:
    def __call__(self, batch):
        return batch


def test_a_deprecated_ray_data_argument_is_caught(ray_local, no_ray_deprecations):
    import ray

    with RayDeprecationLog() as log:
        ray.data.range(2).map_batches(Identity, concurrency=1)  # plan only: Ray checks arguments at the call
    assert any("``concurrency`` is deprecated" in message for message in log.messages), log.messages
    assert no_ray_deprecations.messages == log.messages  # what fails any other test that does this
    no_ray_deprecations.messages.clear()


def test_evaluation_actors_use_compute_strategies(ray_local):
    import ray

    options = _actor_options(EvaluationConfig(out="out", export="export", prompts="prompts.txt"), 2, 0.0)
    with RayDeprecationLog() as log:
        ray.data.range(2).map_batches(Identity, batch_size=1, **options)
    assert log.messages == []


@Deprecated(message="use something else", warning=True)
def deprecated_ray_api() -> int:
    return 1


def call_from(module: str) -> None:
    """Call `deprecated_ray_api` from code whose module is `module` (the name warnings attribute it to)."""
    exec(compile("deprecated_ray_api()", f"{module.replace('.', '/')}.py", "exec"),
         {"__name__": module, "deprecated_ray_api": deprecated_ray_api})


def test_a_deprecated_ray_function_called_by_project_code_is_an_error():
    with pytest.raises(DeprecationWarning, match="deprecated"):
        call_from("trainer.some_module")
    with warnings.catch_warnings(record=True) as caught:  # called from elsewhere (Ray's own code): a warning
        warnings.simplefilter("always")
        call_from("ray.data.some_module")
    assert [w.category.__name__ for w in caught] == ["RayDeprecationWarning"]
