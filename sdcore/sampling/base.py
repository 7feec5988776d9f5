"""The interface every sampler implements, and the prediction-type conversions they share.

A sampler is built for one (scheduler config, number of steps) and run once per generation:

    sampler = make_sampler("DPM++ 2M Karras", scheduler_config, steps=20)
    x = x_T * sampler.init_noise_sigma
    for i in range(len(sampler.timesteps)):
        eps = unet(sampler.scale_model_input(x, i), sampler.timesteps[i], ...)
        x = sampler.step(eps, i, x, noise=draw() if sampler.needs_noise else None)

`i` indexes `timesteps`, whose length is the number of model evaluations (not always `steps`:
PLMS evaluates steps + 1 times, DPM++ SDE 2 * steps - 1). Multistep samplers keep their history
internally; `reset()` clears it (or make a fresh sampler). Nothing here draws random numbers.
All host math is float64; inputs of any float dtype are cast at the boundary.
"""

from __future__ import annotations

import numpy as np

from sdcore.errors import SdcoreError, UsageError
from sdcore.sampling.config import SchedulerConfig
from sdcore.sampling.noise_schedule import strength_start


def as_f64(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise SdcoreError(f"{what} must be a floating-point array, got dtype {x.dtype}.")
    return x.astype(np.float64, copy=False)


def x0_from_sigma(model_output: np.ndarray, x: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    """Predicted clean sample for samplers on the variance-exploding scale x = x0 + sigma * eps
    (Euler, LMS, DPM++ SDE; Karras et al. 2022). v is defined on the unscaled sample x / sqrt(sigma^2 + 1)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise SdcoreError(f"Unsupported prediction_type {prediction_type!r}.")


def x0_eps_from_alpha(
    model_output: np.ndarray, x: np.ndarray, alpha_prod: float, prediction_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted x0, predicted eps) for x = sqrt(a) x0 + sqrt(1 - a) eps (DDIM)."""
    beta_prod = 1 - alpha_prod
    if prediction_type == "epsilon":
        return (x - beta_prod**0.5 * model_output) / alpha_prod**0.5, model_output
    if prediction_type == "sample":
        return model_output, (x - alpha_prod**0.5 * model_output) / beta_prod**0.5
    if prediction_type == "v_prediction":
        x0 = alpha_prod**0.5 * x - beta_prod**0.5 * model_output
        eps = alpha_prod**0.5 * model_output + beta_prod**0.5 * x
        return x0, eps
    raise SdcoreError(f"Unsupported prediction_type {prediction_type!r}.")


class Sampler:
    """Base class: schedule arrays, step bookkeeping and the img2img helpers.

    Subclasses set `Config`, build `timesteps` (float64, the UNet's timestep input per model
    evaluation) and `init_noise_sigma` in `__init__`, and implement `_step` and `add_noise`.
    """

    Config: type[SchedulerConfig] = SchedulerConfig
    name: str = ""
    order: int = 1  # model evaluations per inference step (diffusers' scheduler.order), for img2img
    needs_noise: bool = False

    def __init__(self, config: SchedulerConfig, steps: int):
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= config.num_train_timesteps:
            raise UsageError(
                f"steps must be an integer from 1 to num_train_timesteps ({config.num_train_timesteps}), got {steps!r}."
            )
        self.config = config
        self.num_inference_steps = int(steps)
        self.timesteps = np.zeros(0)
        self.init_noise_sigma = 1.0
        self.reset()

    def reset(self) -> None:
        """Forget the history of a previous run (multistep samplers override and call this)."""
        self._next_index: int | None = None
        self.steps_taken = 0

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        """The UNet input for evaluation `i` (identity except for the sigma-scaled samplers)."""
        return as_f64(x, "x")

    def step(self, model_output, i: int, x, noise=None) -> np.ndarray:
        """One model evaluation's update: x at timesteps[i] -> x at the next entry (or the final x0).

        `noise` (standard normal, shape of x) is required on every call when `needs_noise`;
        samplers that do not need it ignore it.
        """
        if not 0 <= i < len(self.timesteps):
            raise SdcoreError(f"Step index {i} is outside 0..{len(self.timesteps) - 1}.")
        if self._next_index is not None and i != self._next_index:
            raise SdcoreError(
                f"{self.name} keeps a history between steps: expected step {self._next_index}, got {i}; "
                "call reset() to start a new run."
            )
        model_output = as_f64(model_output, "model_output")
        x = as_f64(x, "x")
        if model_output.shape != x.shape:
            raise SdcoreError(f"model_output shape {model_output.shape} differs from x shape {x.shape}.")
        if self.needs_noise:
            if noise is None:
                raise SdcoreError(f"The {self.name} sampler needs a noise array at every step; none was given.")
            noise = as_f64(noise, "noise")
            if noise.shape != x.shape:
                raise SdcoreError(f"noise shape {noise.shape} differs from x shape {x.shape}.")
        out = self._step(model_output, i, x, noise)
        self._next_index = i + 1
        self.steps_taken += 1
        return out

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def add_noise(self, x0, noise, i: int) -> np.ndarray:
        """Forward diffusion of a clean latent to the noise level of timesteps[i] (diffusers' add_noise)."""
        raise NotImplementedError

    def img2img_start(self, strength: float) -> int:
        """Index into `timesteps` where img2img starts: diffusers' t_start * scheduler.order.

        Noise the init latent with `add_noise(x0, noise, start)` (no init_noise_sigma) and run
        steps start .. len(timesteps) - 1. For inpainting with a regular (4-channel) UNet, after
        step i blend in `add_noise(x0, noise, i + 1)` for every i but the last, as diffusers'
        StableDiffusionInpaintPipeline does.
        """
        return strength_start(self.num_inference_steps, strength) * self.order
