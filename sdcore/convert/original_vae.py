"""The VAE of an original-format checkpoint (`first_stage_model.*`) -> diffusers AutoencoderKL.

Original: CompVis/stablediffusion `ldm/modules/diffusionmodules/model.py` (Encoder/Decoder with
`down[i].block[j]`, `mid.block_1/attn_1/block_2`, `up[i]` numbered by resolution, so the decoder's
`up` list runs backwards relative to diffusers' `up_blocks`). Target: diffusers
`models/autoencoders/vae.py`. The mid-block attention is 1x1 convolutions `q/k/v/proj_out` in the
original and Linear layers `to_q/to_k/to_v/to_out.0` in diffusers (current attention names).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sdcore.convert.original_common import ModuleRename, get, indices, require_contiguous
from sdcore.errors import SdcoreError

COMPONENT = "VAE"

RESNET_RENAMES = {"nin_shortcut": "conv_shortcut"}
ATTENTION_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# ldm's AutoencoderKL scale_factor for SD1.x/SD2.x (model.params.scale_factor in the yaml configs).
SCALING_FACTOR = 0.18215


def vae_table(n_levels: int, layers_per_block: int) -> list[ModuleRename]:
    """Every module of the original VAE with its diffusers name: the whole mapping, in one place."""
    rows = [
        ModuleRename("quant_conv", "quant_conv"),
        ModuleRename("post_quant_conv", "post_quant_conv"),
    ]
    for side in ("encoder", "decoder"):
        rows += [
            ModuleRename(f"{side}.conv_in", f"{side}.conv_in"),
            ModuleRename(f"{side}.norm_out", f"{side}.conv_norm_out"),
            ModuleRename(f"{side}.conv_out", f"{side}.conv_out"),
            ModuleRename(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", RESNET_RENAMES),
            ModuleRename(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", ATTENTION_RENAMES, True),
            ModuleRename(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", RESNET_RENAMES),
        ]
    for i in range(n_levels):
        for j in range(layers_per_block):
            rows.append(ModuleRename(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                                     RESNET_RENAMES))
        if i < n_levels - 1:
            rows.append(ModuleRename(f"encoder.down.{i}.downsample.conv",
                                     f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        # decoder.up[i] works at the resolution of encoder.down[i]: diffusers counts from the bottom.
        up = n_levels - 1 - i
        for j in range(layers_per_block + 1):
            rows.append(ModuleRename(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}",
                                     RESNET_RENAMES))
        if i > 0:
            rows.append(ModuleRename(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    return rows


def vae_config(vae: Mapping[str, np.ndarray], prefix: str, *, latent_sample_size: int) -> dict:
    """The diffusers AutoencoderKL config read from the shapes (config.json contents, without _class_name).

    Its sample_size (default image size) is the UNet's `latent_sample_size` times the VAE's downscale.
    """
    conv_in = get(COMPONENT, vae, "encoder.conv_in.weight", prefix, 4)
    n_levels = require_contiguous(COMPONENT, "encoder.down blocks", indices(vae, "encoder.down."))
    if n_levels == 0:
        raise SdcoreError(f"VAE: no {prefix}encoder.down.* keys: the VAE encoder is missing.")
    per_block = len(indices(vae, "encoder.down.0.block."))
    channels = [int(get(COMPONENT, vae, f"encoder.down.{i}.block.0.conv1.weight", prefix, 4).shape[0])
                for i in range(n_levels)]
    if "encoder.mid.attn_1.q.weight" not in vae:
        raise SdcoreError(
            f"VAE: no {prefix}encoder.mid.attn_1.* keys: a VAE without mid-block attention is not a "
            "Stable Diffusion 1.x/2.x VAE."
        )
    latent = get(COMPONENT, vae, "decoder.conv_in.weight", prefix, 4).shape[1]
    out = get(COMPONENT, vae, "decoder.conv_out.weight", prefix, 4)
    return {
        "sample_size": latent_sample_size * 2 ** (n_levels - 1),
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(out.shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n_levels,
        "up_block_types": ["UpDecoderBlock2D"] * n_levels,
        "block_out_channels": channels,
        "layers_per_block": per_block,
        "act_fn": "silu",
        "latent_channels": int(latent),
        "norm_num_groups": 32,
        "scaling_factor": SCALING_FACTOR,
    }
