"""Euler and Euler ancestral samplers on the sigma (variance-exploding) scale of Karras et al. 2022
("Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 2 without churn),
as in k-diffusion's sample_euler / sample_euler_ancestral.

Mirrors diffusers/schedulers/scheduling_euler_discrete.py (EulerDiscreteScheduler, s_churn = 0)
and scheduling_euler_ancestral_discrete.py (EulerAncestralDiscreteScheduler).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from sdcore.sampling.base import Sampler, as_f64, x0_from_sigma
from sdcore.sampling.config import SchedulerConfig
from sdcore.sampling.noise_schedule import (
    alphas_cumprod,
    interp_sigmas,
    karras_sigmas,
    sigma_table,
    sigma_to_t,
    spaced_timesteps,
)


@dataclasses.dataclass(frozen=True)
class EulerConfig(SchedulerConfig):
    """EulerDiscreteScheduler's keys and defaults (use_karras_sigmas is set by the sampler's name)."""

    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"

    UNSUPPORTED: ClassVar[dict] = {
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
        "rescale_betas_zero_snr": False,
    }
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    SAMPLER: ClassVar[str] = "Euler"

    def _check(self) -> None:
        super()._check()
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            self._fail("final_sigmas_type", "zero or sigma_min")


@dataclasses.dataclass(frozen=True)
class EulerAncestralConfig(SchedulerConfig):
    """EulerAncestralDiscreteScheduler's keys and defaults."""

    UNSUPPORTED: ClassVar[dict] = {"rescale_betas_zero_snr": False}
    SAMPLER: ClassVar[str] = "Euler a"


def init_noise_sigma(sigmas32: np.ndarray, spacing: str) -> float:
    """Scale of x_T: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading (diffusers'
    choice; float32 like diffusers' tensor arithmetic)."""
    max_sigma = np.float32(np.max(sigmas32))
    if spacing in ("linspace", "trailing"):
        return float(max_sigma)
    return float(np.sqrt(max_sigma * max_sigma + np.float32(1.0)))


class SigmaSampler(Sampler):
    """Shared by the samplers that run on sigmas: input scaling, add_noise, init_noise_sigma."""

    sigmas: np.ndarray  # float64 holding float32 values; one more entry than timesteps (the final sigma)

    def scale_model_input(self, x, i):
        sigma = self.sigmas[i]
        return as_f64(x, "x") / (sigma**2 + 1) ** 0.5

    def add_noise(self, x0, noise, i):
        return as_f64(x0, "x0") + as_f64(noise, "noise") * self.sigmas[i]


def euler_schedule(config, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas with the final sigma appended), as EulerDiscreteScheduler.set_timesteps."""
    table = sigma_table(alphas_cumprod(config))
    timesteps = spaced_timesteps(config, steps, np.float32)
    sigmas = interp_sigmas(timesteps, table)
    if getattr(config, "use_karras_sigmas", False):
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
        # the UNet gets the fractional timestep of each Karras sigma, rounded to float32 as in diffusers
        timesteps = sigma_to_t(sigmas, np.log(table)).astype(np.float32).astype(np.float64)
    last = 0.0
    if getattr(config, "final_sigmas_type", "zero") == "sigma_min":
        last = float(table[0])
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
    return timesteps, sigmas


class EulerSampler(SigmaSampler):
    Config = EulerConfig
    name = "Euler"

    def __init__(self, config: EulerConfig, steps: int):
        super().__init__(config, steps)
        self.timesteps, self.sigmas = euler_schedule(config, steps)
        self.init_noise_sigma = init_noise_sigma(self.sigmas.astype(np.float32), config.timestep_spacing)

    def _step(self, model_output, i, x, noise):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = x0_from_sigma(model_output, x, sigma, self.config.prediction_type)
        derivative = (x - x0) / sigma
        return x + derivative * (sigma_next - sigma)


class EulerAncestralSampler(SigmaSampler):
    Config = EulerAncestralConfig
    name = "Euler a"
    needs_noise = True

    def __init__(self, config: EulerAncestralConfig, steps: int):
        super().__init__(config, steps)
        self.timesteps, self.sigmas = euler_schedule(config, steps)
        self.init_noise_sigma = init_noise_sigma(self.sigmas.astype(np.float32), config.timestep_spacing)

    def _step(self, model_output, i, x, noise):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = x0_from_sigma(model_output, x, sigma, self.config.prediction_type)
        # split the step into a deterministic move to sigma_down and fresh noise of size sigma_up,
        # with sigma_down^2 + sigma_up^2 = sigma_next^2
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - x0) / sigma
        return x + derivative * (sigma_down - sigma) + noise * sigma_up
