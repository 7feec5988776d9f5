"""Noise schedules shared by the samplers: betas, alphas_cumprod, timestep spacing, sigma tables.

References: DDPM (Ho et al. 2020) for the beta schedules, "Common Diffusion Noise Schedules and
Sample Steps are Flawed" (Lin et al. 2023, Table 2) for leading/trailing/linspace spacing, and
Karras et al. 2022 ("Elucidating the Design Space...", eq. 5) for the Karras sigmas; the code
mirrors diffusers/schedulers/scheduling_*.py (`__init__`, `set_timesteps`, `_sigma_to_t`,
`_convert_to_karras`).

Precision: diffusers builds its tables in float32 (torch.linspace, cumprod with a float64
accumulator, sigmas in float32 NumPy) and rounds the final sigma tables to float32. sdcore rounds
at the same places, so that the timesteps fed to the UNet equal diffusers' bit for bit and the step
coefficients agree to float32 precision; all step arithmetic afterwards is float64.
"""

from __future__ import annotations

import math

import numpy as np

from sdcore.errors import SdcoreError, UsageError


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) (ATen's scalar formula: each half counted from
    its own end). Its vectorised kernel can differ by an ulp on some entries, which moves
    alphas_cumprod by ~1e-8 relative."""
    a, b = np.float32(start), np.float32(end)
    step = (b - a) / np.float32(n - 1)
    idx = np.arange(n)
    half = n // 2
    out = np.empty(n, dtype=np.float32)
    out[:half] = a + step * idx[:half].astype(np.float32)
    out[half:] = b - step * (n - 1 - idx[half:]).astype(np.float32)
    return out


def betas(config) -> np.ndarray:
    """The training betas, float32 [num_train_timesteps]."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, dtype=np.float32)
    if config.beta_schedule == "linear":
        return _linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta), squared in float32
        root = _linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return root * root
    if config.beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi/2)^2, betas capped at 0.999
        t = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    raise SdcoreError(f"Unknown beta_schedule {config.beta_schedule!r}.")


def alphas_cumprod(config) -> np.ndarray:
    """prod_{s<=t} (1 - beta_s), float32 [num_train_timesteps] (torch.cumprod accumulates in float64)."""
    alphas = np.float32(1.0) - betas(config)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def spaced_timesteps(config, steps: int, dtype=np.int64) -> np.ndarray:
    """The descending training timesteps visited by `steps` inference steps, returned as float64.

    `dtype` is the type diffusers keeps them in, which decides whether linspace spacing is rounded:
    int64 for DDIM/PNDM (rounded), float32 for Euler/LMS, float64 for DPM++ SDE (fractional).
    """
    n_train = config.num_train_timesteps
    spacing = config.timestep_spacing
    if spacing == "linspace":
        if dtype == np.int64:
            t = np.linspace(0, n_train - 1, steps).round()[::-1]
        else:
            t = np.linspace(0, n_train - 1, steps, dtype=dtype)[::-1]
    elif spacing == "leading":
        ratio = n_train // steps
        t = (np.arange(0, steps) * ratio).round()[::-1] + config.steps_offset
    elif spacing == "trailing":
        ratio = n_train / steps
        t = np.round(np.arange(n_train, 0, -ratio)) - 1
    else:
        raise SdcoreError(f"Unknown timestep_spacing {spacing!r}.")
    return np.ascontiguousarray(t.astype(dtype), dtype=np.float64)


def sigma_table(alphas_cumprod32: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) per training timestep, float32, ascending in t."""
    ac = alphas_cumprod32.astype(np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac)


def interp_sigmas(timesteps: np.ndarray, sigmas32: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps, linear in t between training timesteps (float64)."""
    return np.interp(timesteps, np.arange(len(sigmas32)), sigmas32)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Karras et al. 2022 eq. 5 with rho = 7: uniform in sigma^(1/rho), from sigma_max down to sigma_min."""
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas32: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: linear interpolation in log(sigma).

    `log_sigmas32` is log of the float32 sigma table (ascending); sigmas outside the table clamp
    to its ends, as in diffusers' `_sigma_to_t`.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # last table entry <= log_sigma, kept inside [0, len-2] so that low and high both exist
    low_idx = np.searchsorted(log_sigmas32, log_sigma, side="right") - 1
    low_idx = np.clip(low_idx, 0, len(log_sigmas32) - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas32[low_idx], log_sigmas32[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def strength_start(steps: int, strength: float) -> int:
    """img2img: the first of `steps` inference steps to run for `strength` in (0, 1].

    diffusers' StableDiffusionImg2ImgPipeline.get_timesteps: init_timestep = min(int(steps * strength),
    steps), t_start = steps - init_timestep.
    """
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"strength must be in (0, 1], got {strength}.")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise UsageError(
            f"strength {strength} with {steps} steps leaves no denoising step; raise strength or steps."
        )
    return steps - init_timestep
