"""The UNet's configuration: diffusers' `UNet2DConditionModel` config.json, restricted to what SD1.x/SD2.x use.

Reference: diffusers/models/unets/unet_2d_condition.py (`UNet2DConditionModel.__init__`). Every key
is a field here, on the ignore table with its reason, or an option sdcore does not implement that
must hold its inert value (sdcore/config.py reads them all the same way for the three networks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sdcore.config import ConfigBase, check_sample_size, sample_hw
from sdcore.errors import SdcoreError

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")

# Keys that do not change the network sdcore builds, with why.
IGNORED = {
    "_diffusers_version": "bookkeeping written by diffusers",
    "_name_or_path": "bookkeeping written by diffusers",
    "_use_default_values": "bookkeeping written by diffusers",
    "dropout": "training only (inference runs without dropout)",
    "addition_embed_type_num_heads": "read only with addition_embed_type, which must be null",
}

# Options sdcore does not implement -> the values accepted: diffusers' default, which leaves the
# network as SD1.x/SD2.x have it (and values diffusers writes that mean the same). Any other value raises.
UNSUPPORTED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),  # diffusers itself refuses it (the attention_head_dim naming issue)
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),  # not passed to the SD block types by diffusers; refused to stay explicit
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),  # only read by UNetMidBlock2DSimpleCrossAttn
    "cross_attention_norm": (None,),
}


def _per_block(value, n: int, name: str) -> tuple:
    """An int/bool/float broadcast to `n` blocks, or a per-block sequence checked for length."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SdcoreError(f"UNet config: {name} has {len(value)} entries for {n} down blocks.")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig(ConfigBase):
    """diffusers `UNet2DConditionModel` config (the fields SD1.x/SD2.x set). Defaults are diffusers'."""

    TITLE = "UNet"
    CLASS_KEY = ("_class_name", "UNet2DConditionModel")
    IGNORED = IGNORED
    UNSUPPORTED_OPTIONS = UNSUPPORTED_OPTIONS
    POSITIVE = frozenset({"in_channels", "out_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
                          "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                          "time_embedding_dim", "conv_in_kernel", "conv_out_kernel", "sample_size"})

    in_channels: int = 4  # 9 for the inpainting UNet (latents + mask + masked-image latents)
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # SD1.x: this is the number of heads (diffusers' naming, see num_heads); SD2.x: per-block counts
    # [5, 10, 20, 20] that again are head counts, giving heads of dimension 64.
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False  # SD2.x: proj_in/proj_out are Linear instead of 1x1 Conv2d
    upcast_attention: bool = False  # SD2.1-v: attention scores and softmax in float32
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # The training resolution in latents, an int or [height, width]: the pipeline's default image
    # size. Not part of the network, so configs that differ only here are equal.
    sample_size: int | tuple[int, int] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.sample_size is not None:
            check_sample_size("UNet", self.sample_size)
        n = len(self.down_block_types)
        if n == 0:
            raise SdcoreError("UNet config: down_block_types must not be empty.")
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or len(value) != n:
                raise SdcoreError(f"UNet config: {name} must list one entry per down block ({n}).")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [t for t in getattr(self, name) if t not in allowed]
            if bad:
                raise SdcoreError(f"UNet config: {name} {bad} not supported (SD1.x/SD2.x use {allowed}).")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise SdcoreError(f"UNet config: mid_block_type={self.mid_block_type!r} is not supported "
                              f"(SD1.x/SD2.x use {MID_BLOCK_TYPES[0]!r}).")
        if self.act_fn not in ("silu", "swish"):
            raise SdcoreError(f"UNet config: act_fn={self.act_fn!r} is not supported (only 'silu').")
        if not isinstance(self.norm_num_groups, int):
            raise SdcoreError("UNet config: norm_num_groups=None (no output norm) is not supported.")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise SdcoreError("UNet config: conv_in_kernel and conv_out_kernel must be odd.")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim",
                     "cross_attention_dim", "only_cross_attention"):
            values = _per_block(getattr(self, name), n, name)
            if name == "transformer_layers_per_block" and any(isinstance(v, (list, tuple)) for v in values):
                raise SdcoreError("UNet config: per-layer transformer_layers_per_block (nested lists) "
                                  "is not supported.")
        if len(set(_per_block(self.cross_attention_dim, n, "cross_attention_dim"))) != 1:
            raise SdcoreError("UNet config: per-block cross_attention_dim values must be equal (one text "
                              "encoder feeds every block).")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise SdcoreError(f"UNet config: block channels {c} not divisible by norm_num_groups "
                                  f"{self.norm_num_groups}.")
        for c, heads in zip(self.block_out_channels, self.num_heads):
            if heads < 1 or c // heads < 1:
                raise SdcoreError(f"UNet config: {heads} attention heads do not fit {c} channels.")

    # ---- per-block values, resolved the way diffusers resolves them

    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Heads per down block. diffusers sets num_attention_heads = attention_head_dim (issue #2011)."""
        return _per_block(self.attention_head_dim, self.num_blocks, "attention_head_dim")

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return _per_block(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")

    @property
    def only_cross(self) -> tuple[bool, ...]:
        return _per_block(self.only_cross_attention, self.num_blocks, "only_cross_attention")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def sample_hw(self) -> tuple[int, int] | None:
        """(height, width) of sample_size in latents, or None when the config has none."""
        return None if self.sample_size is None else sample_hw(self.sample_size)

    @property
    def num_upsamplers(self) -> int:
        return self.num_blocks - 1
