"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12), eta = 0 deterministic.

Mirrors diffusers/schedulers/scheduling_ddim.py (DDIMScheduler). Quirk kept for parity: the
previous timestep is always t - num_train_timesteps // steps, even where the spaced list says
otherwise (linspace/trailing spacing).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from sdcore.errors import UsageError
from sdcore.sampling.base import Sampler, as_f64, x0_eps_from_alpha
from sdcore.sampling.config import SchedulerConfig
from sdcore.sampling.noise_schedule import alphas_cumprod, spaced_timesteps


@dataclasses.dataclass(frozen=True)
class DDIMConfig(SchedulerConfig):
    """DDIMScheduler's keys and defaults."""

    timestep_spacing: str = "leading"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    UNSUPPORTED: ClassVar[dict] = {"thresholding": False, "rescale_betas_zero_snr": False}
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    SAMPLER: ClassVar[str] = "DDIM"


class DDIMSampler(Sampler):
    Config = DDIMConfig
    name = "DDIM"

    def __init__(self, config: DDIMConfig, steps: int, eta: float = 0.0):
        super().__init__(config, steps)
        if not eta >= 0.0:
            raise UsageError(f"DDIM eta must be >= 0, got {eta}.")
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        self.alphas_cumprod = alphas_cumprod(config).astype(np.float64)
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.timesteps = spaced_timesteps(config, steps, np.int64)
        self._stride = config.num_train_timesteps // steps

    def _alpha_prod(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def _step(self, model_output, i, x, noise):
        t = int(self.timesteps[i])
        prev_t = t - self._stride
        a_t, a_prev = self._alpha_prod(t), self._alpha_prod(prev_t)
        x0, eps = x0_eps_from_alpha(model_output, x, a_t, self.config.prediction_type)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = np.clip(x0, -r, r)
        # sigma_t of DDIM eq. 16; eta = 1 is DDPM's posterior variance
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * variance**0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * noise
        return x_prev

    def add_noise(self, x0, noise, i):
        a = float(self.alphas_cumprod[int(self.timesteps[i])])
        return a**0.5 * as_f64(x0, "x0") + (1 - a) ** 0.5 * as_f64(noise, "noise")
