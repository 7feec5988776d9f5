"""PLMS: the linear multistep part of PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
Models on Manifolds"), i.e. diffusers' PNDMScheduler with skip_prk_steps=True.

Mirrors diffusers/schedulers/scheduling_pndm.py (`set_timesteps`, `step_plms`, `_get_prev_sample`).
Without the Runge-Kutta warm-up, the first step is taken twice: an Euler step from t0 to t1, then a
second evaluation at t1 whose output is averaged with the first to redo the same step (a Heun-like
start). So `timesteps` has steps + 1 entries, with t1 repeated.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from sdcore.sampling.base import Sampler, as_f64
from sdcore.sampling.config import SchedulerConfig
from sdcore.sampling.noise_schedule import alphas_cumprod, spaced_timesteps


@dataclasses.dataclass(frozen=True)
class PNDMConfig(SchedulerConfig):
    """PNDMScheduler's keys and defaults (skip_prk_steps is implied by the PLMS name)."""

    timestep_spacing: str = "leading"
    set_alpha_to_one: bool = False

    SAMPLER: ClassVar[str] = "PLMS"


class PLMSSampler(Sampler):
    Config = PNDMConfig
    name = "PLMS"

    def __init__(self, config: PNDMConfig, steps: int):
        super().__init__(config, steps)
        self.alphas_cumprod = alphas_cumprod(config).astype(np.float64)
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])
        ascending = spaced_timesteps(config, steps, np.int64)[::-1]
        # [t_0 .. t_{n-2}, t_{n-2}, t_{n-1}] ascending, then reversed: the second entry is repeated
        self.timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        self._stride = config.num_train_timesteps // steps

    def reset(self) -> None:
        super().reset()
        self._ets: list[np.ndarray] = []  # past model outputs, newest last (at most 4 kept)
        self._cur_sample: np.ndarray | None = None

    def _alpha_prod(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def _step(self, model_output, i, x, noise):
        t = int(self.timesteps[i])
        prev_t = t - self._stride
        counter = self.steps_taken
        if counter != 1:
            self._ets = self._ets[-3:] + [model_output]
        else:
            # the repeated evaluation at t1 redoes the first step t0 -> t1
            prev_t, t = t, t + self._stride
        ets = self._ets
        if len(ets) == 1 and counter == 0:
            self._cur_sample = x
            combined = model_output
        elif len(ets) == 1 and counter == 1:
            combined = (model_output + ets[-1]) / 2
            x, self._cur_sample = self._cur_sample, None
        elif len(ets) == 2:
            combined = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            combined = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            combined = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        return self._prev_sample(x, t, prev_t, combined)

    def _prev_sample(self, x, t, prev_t, model_output):
        """PNDM eq. 11: the transfer x_t -> x_{t-delta} for a given noise estimate."""
        a_t, a_prev = self._alpha_prod(t), self._alpha_prod(prev_t)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config.prediction_type == "v_prediction":
            model_output = a_t**0.5 * model_output + b_t**0.5 * x
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return sample_coeff * x - (a_prev - a_t) * model_output / denom

    def add_noise(self, x0, noise, i):
        a = float(self.alphas_cumprod[int(self.timesteps[i])])
        return a**0.5 * as_f64(x0, "x0") + (1 - a) ** 0.5 * as_f64(noise, "noise")
