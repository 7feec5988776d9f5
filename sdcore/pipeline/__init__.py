"""Stable Diffusion pipelines: txt2img, img2img and inpainting on the compiled networks.

Mirrors diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline /
StableDiffusionInpaintPipeline step for step (same order of operations, same guidance formula), with
the host side in NumPy (float64 sampler math) and the networks compiled by TVM:

- `stable_diffusion.py`: `StableDiffusion`, the model directory's networks and the three modes;
- `request.py`: the checked arguments of one generation (`validate` -> `Request`);
- `prepare.py`: each mode's start latents, the 9-channel UNet's extra input, the inpainting blend;
- `denoise.py`: the denoising loop (UNet call, guidance, sampler steps, per-step hooks), NumPy only.

Randomness: image i of a batch draws all its noise from `numpy.random.Generator(PCG64(seed + i))`,
in this order: x_T (or the img2img/inpaint noise), the VAE posterior sample of the init image, the
VAE posterior sample of the masked image (9-channel inpainting), then one draw per step for the
samplers that take noise. So a seed gives the same image on every machine, and image i of a batch
equals a batch-1 run with seed + i. `latents=` gives x_T explicitly (the parity hook with diffusers).
"""

from sdcore.pipeline.denoise import StepHook, denoise, guide, randn
from sdcore.pipeline.request import MAX_SIZE, MIN_SIZE, Request, validate
from sdcore.pipeline.stable_diffusion import GenerationResult, StableDiffusion

__all__ = ["MAX_SIZE", "MIN_SIZE", "GenerationResult", "Request", "StableDiffusion", "StepHook", "denoise", "guide",
           "randn", "validate"]
