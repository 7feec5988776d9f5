"""Random-weight Stable Diffusion checkpoints built with diffusers/transformers (the test extra).

The architectures are `sdcore.presets`; the weights are seeded random numbers (the model paints
noise), for conversion, compilation and parity tests with real shapes. `tools/make_random_checkpoint.py`
is the command line for these functions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sdcore.presets import preset


def build_models(preset_name: str, inpainting: bool, seed: int):
    """(preset dict, unet, vae, text_encoder): torch modules with seeded random weights, in eval mode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = preset(preset_name, inpainting=inpainting)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**p["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**p["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**p["text_encoder"]))
    return p, unet.eval(), vae.eval(), text_encoder.eval()


def write_diffusers(out: Path, preset_name: str, inpainting: bool, seed: int, prediction_type: str) -> None:
    """A diffusers pipeline folder (what `save_pretrained` writes), safetensors weights."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sdcore.tokenizer import write_vocab_files

    p, unet, vae, text_encoder = build_models(preset_name, inpainting, seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_files(tmp, pad_token="!" if p["family"] == "sd2" else "<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                              prediction_type=prediction_type)
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def write_single_file(out: Path, preset_name: str, inpainting: bool, seed: int, fmt: str) -> None:
    """One file in the original CompVis/Stability key layout: `fmt` "safetensors" or "ckpt" (a
    Lightning-style `torch.save` of {"state_dict", "global_step"})."""
    import torch

    from sdcore.testing.original_format import to_original

    p, unet, vae, text_encoder = build_models(preset_name, inpainting, seed)
    state = to_original(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), family=p["family"],
                        unet_config=unet.config, vae_config=vae.config, text_config=text_encoder.config)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    else:
        torch.save({"state_dict": state, "global_step": 0}, str(out))
