"""The run plan: a `TrainRunConfig` resolved once, on the driver, into what every part of a run reads.

Design: the config says what the user asked for (presets by name, relative paths, no facts about
the data); the plan is what the run is: the config with absolute paths, the tokenizer and
transformer configs resolved from their presets (the tokenizer's owns the scale list), the facts
of the rows it trains on (the cache's manifest, or the header online mode builds; the shard list),
and the MLflow run it logs to. `RunPlan.of(config)` resolves the models (no I/O: tests, benchmarks
and the golden loss record build plans this way); `trainer.driver.preflight` adds the facts it
checked. The plan is frozen and travels whole to the Ray Train workers, so the driver, the workers
and the export never resolve anything again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hart.config import TokenizerConfig, TransformerConfig
from hart.scale_grid import ScaleGrid
from hart.star.config import StarConfig
from trainer.config import TrainRunConfig, model_configs


@dataclass(frozen=True)
class RunPlan:
    config: TrainRunConfig
    tokenizer: TokenizerConfig  # owns the scale list
    transformer: TransformerConfig | StarConfig  # HART's or STAR's (model.family), on the tokenizer's scales
    # The rows' manifest: a token cache's `manifest.json`, or the header online mode builds for its
    # shards (the cache format: docs/cache-format.md). None for the tokenizer stage (it reads images).
    manifest: dict[str, Any] | None = None
    shards: tuple[str, ...] = ()  # the listed data.shards (tokenizer stage, online mode)
    online: dict[str, Any] | None = None  # online mode's stream facts: tokenizer hash, row schema, resolution
    tracking_uri: str = ""
    run_id: str = ""  # the MLflow run: new, or the one the resumed checkpoint names
    resume_step: int | None = None  # the step of the checkpoint the run resumes from; None: a new run

    @classmethod
    def of(cls, config: TrainRunConfig, **facts: Any) -> RunPlan:
        """The plan of a config with its model configs resolved, plus the given facts (`RunPlan` fields)."""
        tokenizer, transformer = model_configs(config)
        return cls(config, tokenizer, transformer, **facts)

    def with_facts(self, **facts: Any) -> RunPlan:
        return replace(self, **facts)

    @property
    def grid(self) -> ScaleGrid:
        return self.tokenizer.grid

    @property
    def stage(self) -> str:
        return self.config.stage


__all__ = ["RunPlan"]
