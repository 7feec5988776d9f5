"""The arguments of one generation, checked once, before any work.

`validate` turns what the caller gave (txt2img, img2img or inpaint arguments) into a `Request`,
or raises UsageError with one line naming the bad argument. Everything a later stage can refuse
for the caller's arguments (the sampler's name, a strength that runs no step, a size token
merging cannot handle) is refused here, so a bad call never compiles or encodes anything first.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from sdcore.errors import UsageError
from sdcore.images import load_image
from sdcore.pipeline.denoise import uses_guidance

MODES = ("txt2img", "img2img", "inpaint")
MIN_SIZE, MAX_SIZE = 64, 4096
DEFAULT_SAMPLE_SIZE = 64  # latents, when the UNet config has no sample_size (diffusers' SD1.x value)


@dataclasses.dataclass(frozen=True)
class Request:
    mode: str  # one of MODES
    prompt: str
    negative_prompt: str
    steps: int  # inference steps asked for (the samplers may evaluate the UNet more often)
    guidance_scale: float
    sampler: str  # as the caller wrote it (recorded in the PNG)
    width: int
    height: int
    seed: int  # image j of the batch uses seed + j
    batch_size: int
    clip_skip: int | None
    strength: float  # 1.0 for txt2img
    tome: object | None  # an enabled ToMeConfig, or None
    latents: np.ndarray | None = None  # x_T [batch, 4, h, w], float64
    image: object | None = None  # PIL image: img2img's and inpaint's input
    mask: object | None = None  # PIL image: inpaint's mask, white = repaint
    t_start: int = 0  # the first index into the samplers' timesteps that runs
    n_evaluations: int = 0  # len(sampler.timesteps)
    vae_scale: int = 8

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (4, self.height // self.vae_scale, self.width // self.vae_scale)

    @property
    def steps_run(self) -> range:
        return range(self.t_start, self.n_evaluations)


def default_image_size(unet_config, vae_scale: int) -> tuple[int, int]:
    """(height, width) in pixels: the UNet's sample_size (an int or [h, w]) times the VAE's scale."""
    h, w = unet_config.sample_hw or (DEFAULT_SAMPLE_SIZE, DEFAULT_SAMPLE_SIZE)
    return h * vae_scale, w * vae_scale


def tome_config(tome):
    """The ToMeConfig of `tome=`: None, a ratio (tomesd's other defaults) or a ToMeConfig; None
    when it merges nothing (ratio 0), so that the plain graph runs."""
    from sdcore.tome import ToMeConfig

    if tome is None:
        return None
    if isinstance(tome, numbers.Real) and not isinstance(tome, bool):
        tome = ToMeConfig(ratio=float(tome))
    elif not isinstance(tome, ToMeConfig):
        raise UsageError(f"tome must be a ratio (a number) or a sdcore.tome.ToMeConfig, got {tome!r}.")
    return tome if tome.enabled else None


def validate(model, mode: str, *, prompt, negative_prompt="", steps=20, guidance_scale=7.5, sampler="DPM++ 2M Karras",
             width=None, height=None, seed=None, batch_size=1, clip_skip=None, strength=1.0, latents=None,
             image=None, mask_image=None, tome=None) -> Request:
    """A Request for `model` (a StableDiffusion), or UsageError naming the first bad argument."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}.")
    if mode != "txt2img":
        image = load_image(image, "image")
        width, height = image.width, image.height
    width, height = _size(model, width, height, what="size" if mode == "txt2img" else "image")
    if mode == "inpaint":
        mask_image = load_image(mask_image, "mask")
        if mask_image.size != image.size:
            raise UsageError(f"the mask is {mask_image.width}x{mask_image.height} but the image is "
                             f"{image.width}x{image.height}: they must be the same size.")
    if mode != "txt2img" and not 0.0 < strength <= 1.0:
        raise UsageError(f"strength must be greater than 0 and at most 1, got {strength}.")
    tome = tome_config(tome)
    _check_numbers(model, steps, guidance_scale, batch_size, clip_skip)
    if mode != "inpaint" and model.inpainting:
        raise UsageError(f"this is an inpainting model (9-channel UNet): use inpaint, not {mode}.")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**32))
    if not 0 <= seed < 2**63:
        raise UsageError(f"seed must be between 0 and 2^63-1, got {seed}.")
    request = Request(mode, prompt, negative_prompt, steps, guidance_scale, sampler, width, height, seed, batch_size,
                      clip_skip, strength if mode != "txt2img" else 1.0, tome, image=image, mask=mask_image,
                      vae_scale=model.vae_scale)
    request = _with_latents(request, latents)
    request = _with_schedule(model, request)
    _check_tome(model, request)
    return request


def _size(model, width, height, what: str) -> tuple[int, int]:
    sizes = {"width": model.default_width if width is None else width,
             "height": model.default_height if height is None else height}
    for name, value in sizes.items():
        try:
            sizes[name] = v = int(value)
        except (TypeError, ValueError):
            raise UsageError(f"{what}: {name} {value!r} is not a number.") from None
        if v % 8 or not MIN_SIZE <= v <= MAX_SIZE:
            raise UsageError(
                f"{what}: {name} {v} is not supported: it must be a multiple of 8 between {MIN_SIZE} and "
                f"{MAX_SIZE} (this model was trained at {model.default_width}x{model.default_height}); "
                f"sdcore never resizes silently.")
    return sizes["width"], sizes["height"]


def _check_numbers(model, steps, guidance_scale, batch_size, clip_skip) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise UsageError(f"steps must be an integer between 1 and 1000, got {steps!r}.")
    if not 0.0 <= guidance_scale <= 100.0:
        raise UsageError(f"guidance scale must be between 0 and 100, got {guidance_scale}.")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= 64:
        raise UsageError(f"batch size must be between 1 and 64, got {batch_size!r}.")
    layers = model.configs["text_encoder"]["num_hidden_layers"]
    if clip_skip is not None and not 0 <= clip_skip < layers:
        raise UsageError(f"clip skip {clip_skip} is out of range for a {layers}-layer text encoder.")


def _with_latents(request: Request, latents) -> Request:
    if latents is None:
        return request
    latents = np.asarray(latents, dtype=np.float64)
    expected = (request.batch_size, *request.latent_shape)
    if latents.shape != expected:
        raise UsageError(f"latents have shape {latents.shape}, expected {expected} for "
                         f"{request.width}x{request.height} and batch size {request.batch_size}.")
    return dataclasses.replace(request, latents=latents)


def _with_schedule(model, request: Request) -> Request:
    """The steps that run: all of them, or from diffusers' get_timesteps start for a strength < 1
    (int(strength * steps) steps, from index (steps - that) * order)."""
    from sdcore.sampling import make_sampler

    probe = make_sampler(request.sampler, model.scheduler_config, request.steps)  # an unknown name fails here
    n_evaluations = len(probe.timesteps)
    t_start = 0
    if request.mode != "txt2img" and request.strength < 1.0:
        t_start = probe.img2img_start(request.strength)
    if t_start >= n_evaluations:
        raise UsageError(f"strength {request.strength} with {request.steps} steps runs no step at all: raise the "
                         f"strength or the number of steps.")
    return dataclasses.replace(request, t_start=t_start, n_evaluations=n_evaluations)


def _check_tome(model, request: Request) -> None:
    """A latent size token merging cannot handle fails here (ToMeConfig raises UsageError)."""
    if request.tome is None:
        return
    from sdcore.unet.model import tome_plans

    _, h, w = request.latent_shape
    tome_plans(model.unet_config, request.tome, unet_batch(request), h, w)


def unet_batch(request: Request) -> int:
    """The UNet's batch: the images, twice with guidance (negative and positive prompt)."""
    return request.batch_size * (2 if uses_guidance(request.guidance_scale) else 1)
