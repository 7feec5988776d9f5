"""The denoising loop, in NumPy: scale the latents for the UNet, call it, apply classifier-free
guidance, step every image's sampler, then run the per-step hooks.

Nothing here knows about models, prompts or files: the UNet comes in as a function, so the loop
can be tested with a stand-in and reused by every mode (txt2img, img2img, inpainting) and by what
builds on a step (hires fix, previews, cancel).

A hook is `hook(i, t, x) -> None | replaced x`, called after step `i` (an index into the samplers'
`timesteps`, `t` the timestep it ran at) with the whole batch `x` [B, 4, h, w]. It returns None
to leave the latents alone, or an array of the same shape that the next step starts from (the
inpainting blend); raising from a hook stops the run (cancel).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from sdcore.errors import SdcoreError
from sdcore.sampling import Sampler

# unet(model_in [N, C, h, w] float64, t [N] float32, i) -> noise prediction [N, 4, h, w] float64;
# `i` (the step index) is there for inputs that vary per step, such as ToMe's random destinations
UNetCall = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
StepHook = Callable[[int, float, np.ndarray], Optional[np.ndarray]]


def randn(rng: np.random.Generator, shape) -> np.ndarray:
    """Standard normal noise: float32 draws (the same on every machine), returned as float64."""
    return rng.standard_normal(shape, dtype=np.float32).astype(np.float64)


def uses_guidance(guidance_scale: float) -> bool:
    """Whether a run evaluates the negative prompt too (diffusers' do_classifier_free_guidance)."""
    return guidance_scale > 1.0


def guide(uncond: np.ndarray, cond: np.ndarray, guidance_scale: float) -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans 2022): move from the negative prompt's prediction
    towards, and past, the prompt's."""
    return uncond + guidance_scale * (cond - uncond)


def predict(unet: UNetCall, model_in: np.ndarray, t: float, i: int, guidance_scale: float) -> np.ndarray:
    """The guided noise prediction for a batch of UNet inputs [B, C, h, w]. With guidance the UNet
    runs once on [negative half; positive half] (diffusers' order, which the context must follow)."""
    if not uses_guidance(guidance_scale):
        return unet(model_in, np.full((len(model_in),), t, dtype=np.float32), i)
    batch = len(model_in)
    both = np.concatenate([model_in, model_in])  # [2B, C, h, w]
    out = unet(both, np.full((2 * batch,), t, dtype=np.float32), i)
    return guide(out[:batch], out[batch:], guidance_scale)


def denoise(unet: UNetCall, samplers: Sequence[Sampler], x: np.ndarray, steps: range, *,
            guidance_scale: float, rngs: Sequence[np.random.Generator], conditioning: np.ndarray | None = None,
            hooks: Sequence[StepHook] = ()) -> np.ndarray:
    """Run `steps` (indices into the samplers' timesteps) on the latents `x` [B, 4, h, w].

    Image j of the batch has its own sampler `samplers[j]` and random stream `rngs[j]`, from which
    a sampler that needs noise draws one array per step. `conditioning` [B, C', h, w] is appended
    to the UNet input's channels at every step (a 9-channel inpainting UNet's mask and masked image).
    """
    for i in steps:
        t = float(samplers[0].timesteps[i])
        model_in = np.concatenate([s.scale_model_input(x[j : j + 1], i) for j, s in enumerate(samplers)])
        if conditioning is not None:
            model_in = np.concatenate([model_in, conditioning], axis=1)  # [B, 4 + C', h, w]
        noise_pred = predict(unet, model_in, samplers[0].timesteps[i], i, guidance_scale)
        x = np.concatenate([_step(s, noise_pred[j : j + 1], i, x[j : j + 1], rngs[j])
                            for j, s in enumerate(samplers)])
        for hook in hooks:
            x = _run_hook(hook, i, t, x)
    return x


def _step(sampler: Sampler, noise_pred: np.ndarray, i: int, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = randn(rng, x.shape) if sampler.needs_noise else None
    return sampler.step(noise_pred, i, x, noise=noise)


def _run_hook(hook: StepHook, i: int, t: float, x: np.ndarray) -> np.ndarray:
    replaced = hook(i, t, x)
    if replaced is None:
        return x
    replaced = np.asarray(replaced)
    if replaced.shape != x.shape or not np.issubdtype(replaced.dtype, np.floating):
        raise SdcoreError(f"a step hook returned latents of shape {replaced.shape} and dtype {replaced.dtype}; "
                          f"expected floating-point latents of shape {x.shape}, or None.")
    return replaced.astype(np.float64, copy=False)
