"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", Algorithm 2; the SDE form from Gonzalez et al. 2023 /
diffusers' sde-dpmsolver++), second order multistep in data (x0) prediction.

Mirrors diffusers/schedulers/scheduling_dpmsolver_multistep.py (DPMSolverMultistepScheduler with
algorithm_type dpmsolver++ or sde-dpmsolver++, solver_order 2), including its own timestep
spacing (leading and linspace place steps + 1 points and drop the last) and the first-order final
step when the final sigma is zero or fewer than 15 steps are run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np

from sdcore.sampling.base import Sampler, as_f64
from sdcore.sampling.config import SchedulerConfig
from sdcore.sampling.noise_schedule import alphas_cumprod, interp_sigmas, karras_sigmas, sigma_table, sigma_to_t


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepConfig(SchedulerConfig):
    """DPMSolverMultistepScheduler's keys and defaults (algorithm_type and use_karras_sigmas are set
    by the sampler's name; solver_order is always 2)."""

    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"

    UNSUPPORTED: ClassVar[dict] = {
        "thresholding": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        # diffusers reads these through hasattr(config, ...) only when the source config carries
        # them; SD checkpoints never do, so refuse rather than guess
        "sigma_min": None,
        "sigma_max": None,
    }
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    SAMPLER: ClassVar[str] = "DPM++ 2M"

    def _check(self) -> None:
        super()._check()
        if self.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            self._fail("algorithm_type", "dpmsolver++ or sde-dpmsolver++")
        if self.solver_type not in ("midpoint", "heun"):
            self._fail("solver_type", "midpoint or heun")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            self._fail("final_sigmas_type", "zero or sigma_min")


def dpm_timesteps(config, steps: int) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps' spacing (integers), descending."""
    n_train = config.num_train_timesteps  # last_timestep: lambda_min_clipped is -inf
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n_train // (steps + 1)
        t = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        return t + config.steps_offset
    ratio = n_train / steps  # trailing
    return np.arange(n_train, 0, -ratio).round().astype(np.int64) - 1


class DPMSolverMultistepSampler(Sampler):
    Config = DPMSolverMultistepConfig
    name = "DPM++ 2M"

    def __init__(self, config: DPMSolverMultistepConfig, steps: int):
        super().__init__(config, steps)
        self.needs_noise = config.algorithm_type == "sde-dpmsolver++"
        table = sigma_table(alphas_cumprod(config))
        timesteps = dpm_timesteps(config, steps)
        if config.use_karras_sigmas:
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
            t = sigma_to_t(sigmas, np.log(table))
            # diffusers rounds these timesteps except for the cosine schedule, then casts to int64
            timesteps = (t if config.beta_schedule == "squaredcos_cap_v2" else t.round()).astype(np.int64)
        else:
            sigmas = interp_sigmas(timesteps, table)
        last = float(table[0]) if config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
        self.timesteps = timesteps.astype(np.float64)

    def reset(self) -> None:
        super().reset()
        self._x0_prev: np.ndarray | None = None  # the previous step's data prediction

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        """VP coefficients of a VE sigma: x_vp = alpha_t x0 + sigma_t eps."""
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        return alpha_t, sigma * alpha_t

    def _lambda(self, sigma: float) -> float:
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        return math.log(alpha_t) - math.log(sigma_t)

    def _step(self, model_output, i, x, noise):
        cfg = self.config
        n = len(self.timesteps)
        s0, s_next = self.sigmas[i], self.sigmas[i + 1]  # VE sigmas of this and the next step
        alpha_s0, sigma_s0 = self._alpha_sigma(s0)
        x0 = x0_from_vp(model_output, x, alpha_s0, sigma_s0, cfg.prediction_type)
        lower_order_final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        first_order = self._x0_prev is None or lower_order_final
        x0_prev, self._x0_prev = self._x0_prev, x0
        if s_next == 0:
            # lambda_next = +inf: the ODE and the SDE update both reduce to the data prediction
            return x0
        alpha_t, sigma_t = self._alpha_sigma(s_next)
        h = self._lambda(s_next) - self._lambda(s0)
        if cfg.algorithm_type == "dpmsolver++":
            c_x = sigma_t / sigma_s0
            c_d0 = -alpha_t * (math.exp(-h) - 1.0)
            c_d1 = 0.5 * c_d0 if cfg.solver_type == "midpoint" else alpha_t * ((math.exp(-h) - 1.0) / h + 1.0)
            c_z = 0.0
        else:  # sde-dpmsolver++
            c_x = sigma_t / sigma_s0 * math.exp(-h)
            c_d0 = alpha_t * (1 - math.exp(-2.0 * h))
            if cfg.solver_type == "midpoint":
                c_d1 = 0.5 * c_d0
            else:
                c_d1 = alpha_t * ((1.0 - math.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            c_z = sigma_t * math.sqrt(1.0 - math.exp(-2.0 * h))
        out = c_x * x + c_d0 * x0
        if not first_order:
            # D1: finite difference of the data predictions, scaled to this step's h
            h_0 = self._lambda(s0) - self._lambda(self.sigmas[i - 1])
            out = out + c_d1 * ((h / h_0) * (x0 - x0_prev))
        if c_z:
            out = out + c_z * noise
        return out

    def add_noise(self, x0, noise, i):
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i])
        return alpha_t * as_f64(x0, "x0") + sigma_t * as_f64(noise, "noise")


def x0_from_vp(model_output, x, alpha_t: float, sigma_t: float, prediction_type: str) -> np.ndarray:
    """Data prediction on the VP scale x = alpha_t x0 + sigma_t eps (DPM-Solver++'s convert_model_output)."""
    if prediction_type == "epsilon":
        return (x - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * model_output
    return model_output  # "sample"
