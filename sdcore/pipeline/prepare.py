"""Start latents of each mode, and what the denoising loop needs besides them.

Mirrors diffusers' `prepare_latents` (txt2img: x_T scaled by the sampler's init sigma; img2img:
the init image's latents noised to the first step that runs) and the inpainting pipeline's
`prepare_mask_latents`. Image j of a batch draws from its own `rngs[j]`, in the order the module
docstring of sdcore.pipeline gives.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from sdcore.images import image_to_array, mask_to_array
from sdcore.pipeline.denoise import StepHook, randn
from sdcore.pipeline.request import Request
from sdcore.sampling import Sampler

# encode(image [1, 3, H, W] in [-1, 1], rng) -> scaled latents [1, 4, h, w], a posterior sample
Encode = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclasses.dataclass
class Start:
    samplers: list[Sampler]  # one per image: multistep samplers keep per-image history
    x: np.ndarray  # [B, 4, h, w] the latents at the first step that runs
    conditioning: np.ndarray | None = None  # [B, 5, h, w] a 9-channel UNet's mask and masked image
    hooks: list[StepHook] = dataclasses.field(default_factory=list)


def _x_t(request: Request, rng: np.random.Generator, j: int) -> np.ndarray:
    """Image j's x_T [1, 4, h, w]; drawn even when `latents` replaces it, so that the later draws
    of the stream do not depend on whether it was given."""
    noise = randn(rng, (1, *request.latent_shape))
    return noise if request.latents is None else request.latents[j : j + 1]


def prepare_txt2img(request: Request, rngs, new_sampler: Callable[[], Sampler]) -> Start:
    samplers = [new_sampler() for _ in rngs]
    x = [_x_t(request, rng, j) * s.init_noise_sigma for j, (rng, s) in enumerate(zip(rngs, samplers))]
    return Start(samplers, np.concatenate(x))


def prepare_img2img(request: Request, rngs, new_sampler: Callable[[], Sampler], encode: Encode, image) -> Start:
    init = image_to_array(image).astype(np.float32)  # [1, 3, H, W]
    samplers, xs = [], []
    for j, rng in enumerate(rngs):
        sampler = new_sampler()
        noise = _x_t(request, rng, j)
        xs.append(sampler.add_noise(encode(init, rng), noise, request.t_start))
        samplers.append(sampler)
    return Start(samplers, np.concatenate(xs))


def prepare_inpaint(request: Request, rngs, new_sampler: Callable[[], Sampler], encode: Encode, image, mask,
                    *, inpainting_unet: bool) -> Start:
    """A 9-channel inpainting UNet gets the mask and the masked image's latents as extra input
    channels; a regular one keeps the unmasked area by the blend hook below."""
    init = image_to_array(image).astype(np.float32)  # [1, 3, H, W]
    full_mask = mask_to_array(mask)  # [1, 1, H, W]
    small_mask = _latent_mask(full_mask, *request.latent_shape[1:])  # [1, 1, h, w]
    samplers, xs, noises, image_latents, masked = [], [], [], [], []
    for j, rng in enumerate(rngs):
        sampler = new_sampler()
        noise = _x_t(request, rng, j)
        latents = None
        if not inpainting_unet or request.strength < 1.0:  # the 9-channel UNet at strength 1 needs none
            latents = encode(init, rng)
        if request.strength >= 1.0:
            xs.append(noise * sampler.init_noise_sigma)
        else:
            xs.append(sampler.add_noise(latents, noise, request.t_start))
        if inpainting_unet:
            masked.append(encode(init * (full_mask < 0.5), rng))  # the area to keep
        samplers.append(sampler)
        noises.append(noise)
        image_latents.append(latents)
    start = Start(samplers, np.concatenate(xs))
    if inpainting_unet:
        start.conditioning = np.concatenate([np.concatenate([small_mask, m], axis=1) for m in masked])
    else:
        start.hooks.append(blend_hook(samplers, image_latents, noises, small_mask))
    return start


def _latent_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour down to latent size, like torch.nn.functional.interpolate's default."""
    rows = np.arange(h) * mask.shape[2] // h
    cols = np.arange(w) * mask.shape[3] // w
    return mask[:, :, rows][:, :, :, cols].astype(np.float64)


def blend_hook(samplers: list[Sampler], image_latents: list[np.ndarray], noises: list[np.ndarray],
               mask: np.ndarray) -> StepHook:
    """Inpainting with a regular UNet (diffusers' StableDiffusionInpaintPipeline): after each step,
    the unmasked area (mask 0) becomes the original latents noised to the next step's level, and
    the clean original after the last step."""
    last = len(samplers[0].timesteps) - 1

    def blend(i: int, _t: float, x: np.ndarray) -> np.ndarray:
        out = []
        for j, sampler in enumerate(samplers):
            proper = image_latents[j]
            if i < last:
                proper = sampler.add_noise(proper, noises[j], i + 1)
            out.append((1.0 - mask) * proper + mask * x[j : j + 1])
        return np.concatenate(out)

    return blend
