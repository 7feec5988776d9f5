"""DPM++ SDE: k-diffusion's sample_dpmpp_sde (DPM-Solver++ (Lu et al. 2022) as a second-order
stochastic single-step method, midpoint r = 1/2 in log sigma, ancestral noise at both stages).

Mirrors diffusers/schedulers/scheduling_dpmsolver_sde.py (DPMSolverSDEScheduler): each inference
step takes two model evaluations, so `timesteps` interleaves [t_0, mid_0, t_1, mid_1, ..., t_{n-1}]
(2n - 1 entries; the last step is a plain Euler step to sigma = 0) and `order` is 2.

Noise, and the one difference from diffusers: diffusers draws the noise from a torchsde Brownian
tree over sigma, so that the second stage's increment W(sigma) - W(sigma_next) contains the first
stage's W(sigma) - W(sigma_mid). sdcore takes one standard normal array per model evaluation
instead and builds the same Brownian increments from them: the first stage uses z1, the second
(sqrt(sigma - sigma_mid) z1 + sqrt(sigma_mid - sigma_next) z2) / sqrt(sigma - sigma_next). The joint
distribution is that of the Brownian tree (disjoint intervals are independent), so results are
statistically the same, but not numerically equal to diffusers' for a given seed (that would need
torchsde's generator). Given the same normalised increments, the steps agree with diffusers to
float32 precision (tests/test_samplers.py feeds diffusers through a stand-in noise sampler).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np

from sdcore.errors import SdcoreError
from sdcore.sampling.base import as_f64, x0_from_sigma
from sdcore.sampling.config import SchedulerConfig
from sdcore.sampling.euler import SigmaSampler, init_noise_sigma
from sdcore.sampling.noise_schedule import (
    alphas_cumprod,
    interp_sigmas,
    karras_sigmas,
    sigma_table,
    sigma_to_t,
    spaced_timesteps,
)


@dataclasses.dataclass(frozen=True)
class DPMSolverSDEConfig(SchedulerConfig):
    """DPMSolverSDEScheduler's keys and defaults (note its own beta_start/beta_end defaults)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    use_karras_sigmas: bool = False

    # noise_sampler_seed seeds torchsde in diffusers; sdcore's noise comes from the caller instead
    UNSUPPORTED: ClassVar[dict] = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
    SAMPLER: ClassVar[str] = "DPM++ SDE"


def _midpoint_sigma(sigma: float, sigma_next: float) -> float:
    """exp(-t) at the midpoint of t = -log(sigma) and t_next = -log(sigma_next)."""
    t, t_next = -math.log(sigma), -math.log(sigma_next)
    return math.exp(-(t + (t_next - t) * 0.5))


class DPMSolverSDESampler(SigmaSampler):
    Config = DPMSolverSDEConfig
    name = "DPM++ SDE"
    order = 2
    needs_noise = True

    def __init__(self, config: DPMSolverSDEConfig, steps: int):
        super().__init__(config, steps)
        table = sigma_table(alphas_cumprod(config))
        log_table = np.log(table)
        timesteps = spaced_timesteps(config, steps, np.float64)
        sigmas = interp_sigmas(timesteps, table)
        if config.use_karras_sigmas:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
            timesteps = sigma_to_t(sigmas, log_table)
        # timesteps of the second evaluations, at the log-sigma midpoints between consecutive sigmas
        t = -np.log(sigmas)
        mid_timesteps = sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)), log_table)
        sigmas32 = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
        # [s_0, s_1, s_1, s_2, s_2, ..., s_{n-1}, s_{n-1}, 0]: entry i is the sigma at evaluation i
        self.sigmas = np.concatenate([sigmas32[:1], np.repeat(sigmas32[1:-1], 2), sigmas32[-1:]])
        interleaved = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        interleaved[1::2] = mid_timesteps
        self.timesteps = interleaved
        self.init_noise_sigma = init_noise_sigma(self.sigmas.astype(np.float32), config.timestep_spacing)

    def reset(self) -> None:
        super().reset()
        self._first_stage: tuple[np.ndarray, np.ndarray] | None = None  # (x at sigma, z1)

    def _stage(self, i: int) -> tuple[bool, float, float]:
        """(first stage?, sigma, sigma_next) of evaluation i; the last evaluation is a first stage."""
        if i % 2 == 0:
            return True, self.sigmas[i], self.sigmas[i + 1]
        return False, self.sigmas[i - 1], self.sigmas[i]

    def scale_model_input(self, x, i):
        first, sigma, sigma_next = self._stage(i)
        sigma_in = sigma if first else _midpoint_sigma(sigma, sigma_next)
        return as_f64(x, "x") / (sigma_in**2 + 1) ** 0.5

    def _step(self, model_output, i, x, noise):
        first, sigma, sigma_next = self._stage(i)
        if sigma_next == 0:
            # last evaluation: an Euler step to sigma = 0
            x0 = x0_from_sigma(model_output, x, sigma, self.config.prediction_type)
            return x + (x - x0) / sigma * (sigma_next - sigma)
        sigma_mid = _midpoint_sigma(sigma, sigma_next)
        x0 = x0_from_sigma(model_output, x, sigma if first else sigma_mid, self.config.prediction_type)
        if first:
            # x0 at sigma moves x from sigma to the midpoint
            sample, sigma_to, z = x, sigma_mid, noise
            self._first_stage = (x, noise)
        else:
            # x0 at the midpoint moves the stage's starting x from sigma to sigma_next
            if self._first_stage is None:
                raise SdcoreError("DPM++ SDE: a second-stage step needs the first stage of the same step before it.")
            sample, z1 = self._first_stage
            self._first_stage = None
            sigma_to = sigma_next
            # Brownian increment over [sigma_next, sigma] built from the one over [sigma_mid, sigma]
            z = (math.sqrt(sigma - sigma_mid) * z1 + math.sqrt(sigma_mid - sigma_next) * noise) / math.sqrt(
                sigma - sigma_next
            )
        sigma_up = min(sigma_to, (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        # exponential integrator step in t = -log(sigma) down to sigma_down, then noise of size sigma_up
        t, t_down = -math.log(sigma), -math.log(sigma_down)
        out = (sigma_down / sigma) * sample - math.expm1(t - t_down) * x0
        return out + z * sigma_up
