"""Architecture presets: the configs of SD1.5 and SD2.1 as their diffusers folders carry them, and
tiny versions with the same structure for tests, benchmarks and random-weight demo checkpoints.

Plain dicts in diffusers/transformers config format (what a converted directory's config.json holds):
unet/, vae/ and text_encoder/config.json of stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1,
without the bookkeeping keys (_class_name, _diffusers_version, _name_or_path, torch_dtype, ...).
The one place these facts live: tools, tests and sdcore.vae.SD_VAE_CONFIG read them from here.
"""

from __future__ import annotations

import copy

_SD_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_SD1_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

PRESETS = {
    "sd15": {
        "family": "sd1",
        "unet": _SD_UNET,
        "vae": _SD_VAE,
        "text_encoder": _SD1_TEXT,
    },
    "sd21": {
        "family": "sd2",
        "unet": dict(_SD_UNET, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     use_linear_projection=True, upcast_attention=True, dual_cross_attention=False,
                     num_class_embeds=None, only_cross_attention=False),
        "vae": dict(_SD_VAE, sample_size=768),
        "text_encoder": dict(_SD1_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                             num_attention_heads=16, hidden_act="gelu", projection_dim=512),
    },
    # Same block pattern, tiny widths: every code path of the full models, in seconds. The sizes obey
    # what a single-file checkpoint leaves implicit (32 norm groups, SD1's 8 heads, SD2's and CLIP's
    # 64-wide heads), so these round-trip through the original single-file layout too.
    "tiny-sd1": {
        "family": "sd1",
        "unet": dict(_SD_UNET, sample_size=16, block_out_channels=[32, 64, 64, 64], layers_per_block=1,
                     cross_attention_dim=64, attention_head_dim=8),
        "vae": dict(_SD_VAE, sample_size=128, block_out_channels=[32, 32, 64, 64], layers_per_block=1),
        "text_encoder": dict(_SD1_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=1, projection_dim=64),
    },
    "tiny-sd2": {
        "family": "sd2",
        "unet": dict(_SD_UNET, sample_size=16, block_out_channels=[64, 64, 64, 64], layers_per_block=1,
                     cross_attention_dim=64, attention_head_dim=[1, 1, 1, 1],
                     use_linear_projection=True, upcast_attention=True),
        "vae": dict(_SD_VAE, sample_size=128, block_out_channels=[32, 32, 64, 64], layers_per_block=1),
        "text_encoder": dict(_SD1_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=1, hidden_act="gelu", projection_dim=64),
    },
}


def preset(name: str, inpainting: bool = False) -> dict:
    """A deep copy of a preset; `inpainting` gives the UNet the 9-channel conv_in."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}: {', '.join(PRESETS)}")
    p = copy.deepcopy(PRESETS[name])
    if inpainting:
        p["unet"]["in_channels"] = 9
    return p
