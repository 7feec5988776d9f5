"""The UNet of an original-format checkpoint (`model.diffusion_model.*`) -> diffusers UNet2DConditionModel.

Original: CompVis/stablediffusion `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel: a flat
`input_blocks` / `middle_block` / `output_blocks` list of TimestepEmbedSequential). Target: diffusers
`models/unets/unet_2d_condition.py` (down_blocks / mid_block / up_blocks of resnets and attentions).
The SpatialTransformer and its BasicTransformerBlocks have the same names on both sides; only the
block numbering and the ResBlock sub-module names differ.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from sdcore.convert.original_common import ModuleRename, get, indices, require_contiguous
from sdcore.errors import SdcoreError

COMPONENT = "UNet"

# ldm ResBlock -> diffusers ResnetBlock2D (in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU,
# Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv]: the indices skip the weightless modules).
RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# ldm SD1.x: num_heads=8 in every attention; SD2.x: num_head_channels=64 (diffusers calls the number
# of heads `attention_head_dim`). Neither is visible in the weights.
SD1_HEADS = 8
SD2_HEAD_CHANNELS = 64


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """What the block numbering of the original UNet depends on."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    down_attention: tuple[bool, ...]  # per down block: CrossAttnDownBlock2D (True) or DownBlock2D
    up_attention: tuple[bool, ...]  # per up block, in diffusers' order (lowest resolution first)


def unet_table(layout: UNetLayout) -> list[ModuleRename]:
    """Every module of the original UNet with its diffusers name: the whole mapping, in one place."""
    n, per_block = len(layout.block_out_channels), layout.layers_per_block
    rows = [
        ModuleRename("time_embed.0", "time_embedding.linear_1"),
        ModuleRename("time_embed.2", "time_embedding.linear_2"),
        ModuleRename("input_blocks.0.0", "conv_in"),
        ModuleRename("out.0", "conv_norm_out"),
        ModuleRename("out.2", "conv_out"),
        ModuleRename("middle_block.0", "mid_block.resnets.0", RESNET_RENAMES),
        ModuleRename("middle_block.1", "mid_block.attentions.0"),
        ModuleRename("middle_block.2", "mid_block.resnets.1", RESNET_RENAMES),
    ]
    # input_blocks: [conv_in], then per level `per_block` x (resnet[, attention]), then a downsampler
    # (all levels but the last), each one entry of the flat list.
    i = 1
    for b in range(n):
        for j in range(per_block):
            rows.append(ModuleRename(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}", RESNET_RENAMES))
            if layout.down_attention[b]:
                rows.append(ModuleRename(f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}"))
            i += 1
        if b < n - 1:
            rows.append(ModuleRename(f"input_blocks.{i}.0.op", f"down_blocks.{b}.downsamplers.0.conv"))
            i += 1
    # output_blocks: per level `per_block + 1` x (resnet[, attention]); the last entry of a level
    # also holds the upsampler, after the attention when there is one.
    k = 0
    for b in range(n):
        for j in range(per_block + 1):
            rows.append(ModuleRename(f"output_blocks.{k}.0", f"up_blocks.{b}.resnets.{j}", RESNET_RENAMES))
            if layout.up_attention[b]:
                rows.append(ModuleRename(f"output_blocks.{k}.1", f"up_blocks.{b}.attentions.{j}"))
            k += 1
        if b < n - 1:
            slot = 2 if layout.up_attention[b] else 1
            rows.append(ModuleRename(f"output_blocks.{k - 1}.{slot}.conv", f"up_blocks.{b}.upsamplers.0.conv"))
    return rows


def infer_unet_layout(unet: Mapping[str, np.ndarray], prefix: str) -> tuple[UNetLayout, dict]:
    """Read the layout and the attention settings from the shapes; returns (layout, partial config)."""
    conv_in = get(COMPONENT, unet, "input_blocks.0.0.weight", prefix, 4)
    n_input = require_contiguous(COMPONENT, "input_blocks", indices(unet, "input_blocks."))

    levels: list[list[tuple[int, bool]]] = [[]]  # per level: (channels, has attention) per resnet
    for i in range(1, n_input):
        if f"input_blocks.{i}.0.op.weight" in unet:
            levels.append([])
            continue
        conv1 = get(COMPONENT, unet, f"input_blocks.{i}.0.in_layers.2.weight", prefix, 4)
        levels[-1].append((int(conv1.shape[0]), f"input_blocks.{i}.1.proj_in.weight" in unet))
    per_block = len(levels[0])
    for b, level in enumerate(levels):
        if len(level) != per_block or per_block == 0:
            raise SdcoreError(
                f"UNet down level {b} has {len(level)} resnet blocks where level 0 has {per_block}: "
                "the checkpoint is truncated or not a Stable Diffusion 1.x/2.x UNet."
            )
        if len(set(level)) != 1:
            raise SdcoreError(f"UNet down level {b} mixes block widths or attention ({level}): unsupported layout.")
    block_out_channels = tuple(level[0][0] for level in levels)
    down_attention = tuple(level[0][1] for level in levels)

    n_output = require_contiguous(COMPONENT, "output_blocks", indices(unet, "output_blocks."))
    if n_output != len(levels) * (per_block + 1):
        raise SdcoreError(
            f"UNet has {n_output} output_blocks, expected {len(levels) * (per_block + 1)} for {len(levels)} "
            f"levels of {per_block} resnets: the checkpoint is truncated or not a Stable Diffusion 1.x/2.x UNet."
        )
    up_attention = tuple(
        f"output_blocks.{b * (per_block + 1)}.1.proj_in.weight" in unet for b in range(len(levels))
    )

    # The attention settings are read from the mid-block transformer; every other attention block is
    # then held to the same shapes by the check against sdcore's model for the config.
    if indices(unet, "middle_block.") != [0, 1, 2] or "middle_block.1.proj_in.weight" not in unet:
        raise SdcoreError(
            f"UNet: {prefix}middle_block must be resnet, attention, resnet (missing "
            f"{prefix}middle_block.1.proj_in.weight): unsupported or truncated UNet."
        )
    proj_in = unet["middle_block.1.proj_in.weight"]
    to_k = get(COMPONENT, unet, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", prefix, 2)
    out = get(COMPONENT, unet, "out.2.weight", prefix, 4)
    partial = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(out.shape[0]),
        "cross_attention_dim": int(to_k.shape[1]),
        "transformer_layers_per_block": len(indices(unet, "middle_block.1.transformer_blocks.")),
        "use_linear_projection": proj_in.ndim == 2,
    }
    return UNetLayout(block_out_channels, per_block, down_attention, up_attention), partial


def unet_config(layout: UNetLayout, partial: dict, *, family: str, sample_size: int) -> dict:
    """The diffusers UNet2DConditionModel config (config.json contents, without _class_name)."""
    channels = list(layout.block_out_channels)
    if family == "sd1":
        heads: int | list[int] = SD1_HEADS
    else:
        if any(c % SD2_HEAD_CHANNELS for c in channels):
            raise SdcoreError(
                f"UNet block widths {channels} are not multiples of the SD2.x head width {SD2_HEAD_CHANNELS}."
            )
        heads = [c // SD2_HEAD_CHANNELS for c in channels]
    return {
        "sample_size": sample_size,
        "in_channels": partial["in_channels"],
        "out_channels": partial["out_channels"],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        "only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": layout.layers_per_block,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": partial["cross_attention_dim"],
        "transformer_layers_per_block": partial["transformer_layers_per_block"],
        "attention_head_dim": heads,
        "dual_cross_attention": False,
        "use_linear_projection": partial["use_linear_projection"],
        # diffusers' single-file loader gives every SD2.x UNet the stable-diffusion-2-1 setting: it
        # computes attention scores in fp32, which only matters in fp16 and never hurts.
        "upcast_attention": family == "sd2",
        "num_class_embeds": None,
    }
