"""Scheduler configuration: the keys of diffusers' `scheduler/scheduler_config.json` that a sampler reads.

A checkpoint's scheduler config names one diffusers scheduler (usually `PNDMScheduler` or
`DDIMScheduler`), but every sampler runs on it. sdcore follows diffusers'
`SchedulerClass.from_config(config)` (diffusers/configuration_utils.py): a key that the target
scheduler accepts is taken from the file, a key the file lacks takes the target scheduler's own
default (so "Euler" on SD1.5's PNDM config gets Euler's `timestep_spacing="linspace"`, exactly as
`EulerDiscreteScheduler.from_config(pipe.scheduler.config)` does), and keys the target does not
accept are ignored. Keys that matter but whose value sdcore does not implement raise SdcoreError
naming the key and the value.

Each sampler has one frozen subclass of `SchedulerConfig` whose defaults are those of its diffusers
scheduler's `__init__`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from sdcore.errors import SdcoreError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, float) and math.isinf(default):
        return isinstance(value, (int, float)) and value == default
    return value == default


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Keys shared by every diffusers noise scheduler that sdcore mirrors."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    # Keys of the diffusers scheduler that sdcore implements only at their default (which switches
    # the feature off): any other value in the file raises instead of being silently ignored.
    UNSUPPORTED: ClassVar[dict[str, Any]] = {}
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    SAMPLER: ClassVar[str] = "this sampler"

    @classmethod
    def from_dict(cls, raw: dict, **overrides: Any) -> SchedulerConfig:
        """Build from a scheduler_config.json dict with diffusers' `from_config` semantics.

        `overrides` come from the sampler's name ("... Karras" sets use_karras_sigmas) and win
        over the file.
        """
        if not isinstance(raw, dict):
            raise SdcoreError(f"The scheduler config must be a JSON object, got {type(raw).__name__}.")
        for key, default in cls.UNSUPPORTED.items():
            if key in raw and not _same(raw[key], default):
                raise SdcoreError(
                    f"scheduler_config.json sets {key}={raw[key]!r}, which sdcore's {cls.SAMPLER} sampler "
                    f"does not implement (only {default!r} is supported)."
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in raw.items() if key in names}
        kwargs.update(overrides)
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs)

    def __post_init__(self) -> None:
        self._check()

    def _fail(self, key: str, allowed: str) -> None:
        raise SdcoreError(
            f"scheduler_config.json has {key}={getattr(self, key)!r}, which sdcore's {self.SAMPLER} sampler "
            f"does not support (expected {allowed})."
        )

    def _check(self) -> None:
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            self._fail("num_train_timesteps", "an integer >= 2")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            self._fail("steps_offset", "an integer >= 0")
        if self.trained_betas is not None:
            if len(self.trained_betas) != self.num_train_timesteps:
                self._fail("trained_betas", f"{self.num_train_timesteps} values (num_train_timesteps)")
        elif self.beta_schedule not in BETA_SCHEDULES:
            self._fail("beta_schedule", " or ".join(BETA_SCHEDULES))
        if self.prediction_type not in self.PREDICTION_TYPES:
            self._fail("prediction_type", " or ".join(self.PREDICTION_TYPES))
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            self._fail("timestep_spacing", " or ".join(TIMESTEP_SPACINGS))
        for f in dataclasses.fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                self._fail(f.name, "true or false")
