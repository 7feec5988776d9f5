"""The UNet's building blocks, one class per diffusers class, with diffusers' attribute names.

References (diffusers 0.42): models/resnet.py (ResnetBlock2D), models/upsampling.py (Upsample2D),
models/attention_processor.py (Attention), models/attention.py (BasicTransformerBlock,
FeedForward), models/activations.py (GEGLU),
models/transformers/transformer_2d.py (Transformer2DModel), models/unets/unet_2d_blocks.py
(CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D),
models/embeddings.py (Timesteps, TimestepEmbedding). Downsample2D and the attention itself are in
sdcore/layers.py, shared with the VAE.

The stage blocks (down, mid, up) are built from the UNetConfig and their index, as diffusers'
get_down_block/get_up_block read its per-block lists; the blocks inside them take keywords with
diffusers' argument names.

Tensors are NCHW between blocks and [B, N, C] (tokens) inside the transformer, as in diffusers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.core import wrap_nested

from sdcore.layers import Downsample2D, attention

if TYPE_CHECKING:
    from sdcore.tome.patch import ToMeInfo
    from sdcore.unet.config import UNetConfig

# ----------------------------------------------------------------------------------------------
# time embedding


class Timesteps(nn.Module):
    """Sinusoidal timestep features (diffusers `Timesteps` / `get_timestep_embedding`); no weights.

    Computed in float32 from a float32 timestep (samplers such as Euler use fractional timesteps),
    in the same order of operations as diffusers so the frequencies agree to the last bit.
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: nn.Tensor) -> nn.Tensor:
        half = self.num_channels // 2
        exponent = op.arange(0, half, dtype="float32") * (-math.log(10000.0))
        exponent = exponent / float(half - self.downscale_freq_shift)
        freqs = op.exp(exponent)
        args = op.unsqueeze(timesteps.astype("float32"), 1) * op.unsqueeze(freqs, 0)  # [B, half]
        sin = wrap_nested(relax.op.sin(args._expr), "sin")
        cos = wrap_nested(relax.op.cos(args._expr), "cos")
        emb = op.concat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)  # [B, 2 * half]
        if self.num_channels % 2:
            emb = op.pad(emb, [0, 0, 0, 1])  # odd width: one zero column, as diffusers
        return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding` with act_fn="silu")."""

    def __init__(self, in_channels: int, time_embed_dim: int, dtype: str = "float32"):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, dtype=dtype)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim, dtype=dtype)

    def forward(self, sample: nn.Tensor) -> nn.Tensor:
        return self.linear_2(op.silu(self.linear_1(sample)))


# ----------------------------------------------------------------------------------------------
# convolutional blocks


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-conv, + shortcut (diffusers `ResnetBlock2D`).

    `conv_shortcut` (1x1) exists only when the channel count changes; the sum is divided by
    `output_scale_factor` (the mid block's mid_block_scale_factor).
    """

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0, dtype: str = "float32"):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = nn.Conv2D(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels, dtype=dtype)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, dtype=dtype)
        # dropout: no weights, identity at inference
        self.conv2 = nn.Conv2D(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.conv_shortcut = (nn.Conv2D(in_channels, out_channels, 1, dtype=dtype)
                              if in_channels != out_channels else None)

    def forward(self, input_tensor: nn.Tensor, temb: nn.Tensor) -> nn.Tensor:
        hidden_states = self.conv1(op.silu(self.norm1(input_tensor)))
        temb = self.time_emb_proj(op.silu(temb))
        b, c = temb.shape
        hidden_states = hidden_states + op.reshape(temb, (b, c, 1, 1))  # [B, C, 1, 1] broadcast over H, W
        hidden_states = self.conv2(op.silu(self.norm2(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        output = input_tensor + hidden_states
        if self.output_scale_factor != 1.0:
            output = output / self.output_scale_factor
        return output


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to `output_size` (default 2x), then a 3x3 conv (diffusers `Upsample2D`)."""

    def __init__(self, channels: int, dtype: str = "float32"):
        super().__init__()
        self.conv = nn.Conv2D(channels, channels, 3, padding=1, dtype=dtype)

    def forward(self, hidden_states: nn.Tensor, output_size: tuple[int, int] | None = None) -> nn.Tensor:
        _, _, h, w = hidden_states.shape
        size = tuple(output_size) if output_size is not None else (2 * h, 2 * w)
        # torch's "nearest" picks source floor(dst * in / out); resize2d's default rounding would
        # round half up instead, so name floor explicitly.
        resized = relax.op.image.resize2d(
            hidden_states._expr, size, layout="NCHW", method="nearest_neighbor",
            coordinate_transformation_mode="asymmetric", rounding_method="floor")
        return self.conv(wrap_nested(resized, "upsample_nearest"))


# ----------------------------------------------------------------------------------------------
# transformer


class Attention(nn.Module):
    """Multi-head attention with diffusers' `Attention` weights: to_q/to_k/to_v without bias, to_out.0 with.

    Self-attention when `cross_attention_dim` is None, else keys/values come from the text states.
    """

    def __init__(self, *, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 upcast_attention: bool = False, dtype: str = "float32"):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast_attention = upcast_attention
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False, dtype=dtype)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=False, dtype=dtype)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=False, dtype=dtype)
        # to_out.1 is Dropout: no weights
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, dtype=dtype)])

    def forward(self, hidden_states: nn.Tensor, encoder_hidden_states: nn.Tensor | None = None) -> nn.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self.to_q(hidden_states)
        k = self.to_k(context)
        v = self.to_v(context)
        out = attention(q, k, v, self.heads, upcast=self.upcast_attention)  # [B, N, inner]
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear to 2 x dim_out, split in (value, gate), value * GELU(gate) with exact (erf) GELU."""

    def __init__(self, dim_in: int, dim_out: int, dtype: str = "float32"):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out, dtype=dtype)

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        value, gate = op.chunk(self.proj(hidden_states), 2, dim=-1)
        return value * op.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU then Linear, inner width 4 x dim (diffusers `FeedForward(activation_fn="geglu")`)."""

    def __init__(self, dim: int, mult: int = 4, dtype: str = "float32"):
        super().__init__()
        inner_dim = dim * mult
        # net.1 is Dropout: no weights
        self.net = nn.ModuleList([GEGLU(dim, inner_dim, dtype=dtype), _NoWeights(),
                                  nn.Linear(inner_dim, dim, dtype=dtype)])

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        return self.net[2](self.net[0](hidden_states))


class _NoWeights(nn.Module):
    """Placeholder that keeps a ModuleList's indices equal to diffusers' where it has a Dropout."""

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return x


def _do_nothing(x: nn.Tensor) -> nn.Tensor:
    return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU MLP, each with a residual.

    diffusers `BasicTransformerBlock` with norm_type="layer_norm" (eps 1e-5). With
    `only_cross_attention`, attn1 also attends to the text states instead of to itself.
    """

    def __init__(self, *, dim: int, num_attention_heads: int, attention_head_dim: int, cross_attention_dim: int,
                 only_cross_attention: bool = False, upcast_attention: bool = False, dtype: str = "float32"):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        attention = dict(query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim,
                         upcast_attention=upcast_attention, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.attn1 = Attention(cross_attention_dim=cross_attention_dim if only_cross_attention else None, **attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.attn2 = Attention(cross_attention_dim=cross_attention_dim, **attention)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype)

    def forward(self, hidden_states: nn.Tensor, encoder_hidden_states: nn.Tensor,
                tome: ToMeInfo | None = None) -> nn.Tensor:
        # Three residual steps, each norm -> layer -> add. With token merging (ToMe; tomesd's
        # make_diffusers_tome_block) the normed tokens are merged before a layer, [B, N, C] ->
        # [B, N - r, C], and its output unmerged before the residual add; the matching is computed
        # once, from the block's input.
        if tome is not None:
            m_a, m_c, m_m, u_a, u_c, u_m = tome.compute_merge(hidden_states)
        else:
            m_a = m_c = m_m = u_a = u_c = u_m = _do_nothing
        attn1_context = encoder_hidden_states if self.only_cross_attention else None
        norm_hidden_states = m_a(self.norm1(hidden_states))
        hidden_states = u_a(self.attn1(norm_hidden_states, attn1_context)) + hidden_states

        norm_hidden_states = m_c(self.norm2(hidden_states))
        hidden_states = u_c(self.attn2(norm_hidden_states, encoder_hidden_states)) + hidden_states

        norm_hidden_states = m_m(self.norm3(hidden_states))
        hidden_states = u_m(self.ff(norm_hidden_states)) + hidden_states
        return hidden_states


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6), proj_in, BasicTransformerBlocks over the H x W tokens, proj_out, + input.

    proj_in/proj_out are 1x1 Conv2d in SD1.x and Linear in SD2.x (`use_linear_projection`); the
    reshape to tokens happens after a conv projection and before a linear one, as in diffusers.
    """

    def __init__(self, *, num_attention_heads: int, attention_head_dim: int, in_channels: int, num_layers: int,
                 cross_attention_dim: int, norm_num_groups: int, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False, dtype: str = "float32"):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, dtype=dtype)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim, dtype=dtype)
            self.proj_out = nn.Linear(inner_dim, in_channels, dtype=dtype)
        else:
            self.proj_in = nn.Conv2D(in_channels, inner_dim, 1, dtype=dtype)
            self.proj_out = nn.Conv2D(inner_dim, in_channels, 1, dtype=dtype)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(dim=inner_dim, num_attention_heads=num_attention_heads,
                                  attention_head_dim=attention_head_dim, cross_attention_dim=cross_attention_dim,
                                  only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
                                  dtype=dtype)
            for _ in range(num_layers)
        ])

    def forward(self, hidden_states: nn.Tensor, encoder_hidden_states: nn.Tensor,
                tome: ToMeInfo | None = None) -> nn.Tensor:
        b, _, h, w = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        c = hidden_states.shape[1]
        hidden_states = op.reshape(op.permute_dims(hidden_states, (0, 2, 3, 1)), (b, h * w, c))  # [B, HW, C]
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, tome=tome)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        c = hidden_states.shape[2]
        hidden_states = op.permute_dims(op.reshape(hidden_states, (b, h, w, c)), (0, 3, 1, 2))  # [B, C, H, W]
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual


# ----------------------------------------------------------------------------------------------
# UNet stages


def _resnet(config: UNetConfig, in_channels: int, out_channels: int, dtype: str, **kw) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=config.time_embed_dim,
                         groups=config.norm_num_groups, eps=config.norm_eps, dtype=dtype, **kw)


def _transformer(config: UNetConfig, index: int, channels: int, dtype: str,
                 only_cross_attention: bool) -> Transformer2DModel:
    """The Transformer2DModel of down level `index` (the up path passes the level it mirrors)."""
    heads = config.num_heads[index]
    return Transformer2DModel(
        num_attention_heads=heads, attention_head_dim=channels // heads, in_channels=channels,
        num_layers=config.transformer_layers[index], cross_attention_dim=config.cross_attention_dims[index],
        norm_num_groups=config.norm_num_groups, use_linear_projection=config.use_linear_projection,
        only_cross_attention=only_cross_attention, upcast_attention=config.upcast_attention, dtype=dtype)


def _down_channels(config: UNetConfig, index: int) -> tuple[int, int]:
    """(in, out) channels of down_blocks.index: the previous block's output, its own."""
    channels = config.block_out_channels
    return channels[max(index - 1, 0)], channels[index]


class CrossAttnDownBlock2D(nn.Module):
    """down_blocks.index: (ResnetBlock2D, Transformer2DModel) x layers, then a stride-2 downsampler
    unless it is the last block.

    Returns (hidden_states, skips): one skip per layer plus the downsampled output, as diffusers.
    """

    has_cross_attention = True

    def __init__(self, config: UNetConfig, index: int, dtype: str = "float32"):
        super().__init__()
        in_channels, out_channels = _down_channels(config, index)
        self.resnets = nn.ModuleList([
            _resnet(config, in_channels if i == 0 else out_channels, out_channels, dtype)
            for i in range(config.layers[index])
        ])
        self.attentions = nn.ModuleList([
            _transformer(config, index, out_channels, dtype, config.only_cross[index])
            for _ in range(config.layers[index])
        ])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, config.downsample_padding, dtype)])
                             if index < config.num_blocks - 1 else None)

    def forward(self, hidden_states: nn.Tensor, temb: nn.Tensor, encoder_hidden_states: nn.Tensor,
                tome: ToMeInfo | None = None):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = resnet(hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states, tome=tome)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class DownBlock2D(nn.Module):
    """down_blocks.index: ResnetBlock2D x layers, then a downsampler unless last; returns
    (hidden_states, skips)."""

    has_cross_attention = False

    def __init__(self, config: UNetConfig, index: int, dtype: str = "float32"):
        super().__init__()
        in_channels, out_channels = _down_channels(config, index)
        self.resnets = nn.ModuleList([
            _resnet(config, in_channels if i == 0 else out_channels, out_channels, dtype)
            for i in range(config.layers[index])
        ])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, config.downsample_padding, dtype)])
                             if index < config.num_blocks - 1 else None)

    def forward(self, hidden_states: nn.Tensor, temb: nn.Tensor):
        skips = []
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResnetBlock2D, then (Transformer2DModel, ResnetBlock2D) x 1 at the last level's channels;
    the resnets divide by mid_block_scale_factor."""

    has_cross_attention = True

    def __init__(self, config: UNetConfig, dtype: str = "float32"):
        super().__init__()
        channels = config.block_out_channels[-1]
        self.resnets = nn.ModuleList([
            _resnet(config, channels, channels, dtype, output_scale_factor=config.mid_block_scale_factor)
            for _ in range(2)
        ])
        # diffusers does not pass only_cross_attention to the mid block's transformer
        self.attentions = nn.ModuleList([_transformer(config, config.num_blocks - 1, channels, dtype, False)])

    def forward(self, hidden_states: nn.Tensor, temb: nn.Tensor, encoder_hidden_states: nn.Tensor,
                tome: ToMeInfo | None = None) -> nn.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states, tome=tome)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


def _up_resnets(config: UNetConfig, index: int, dtype: str) -> nn.ModuleList:
    """up_blocks.index's resnets, one more than its down level has: each takes the running
    features concatenated with one skip.

    The up path reads the down levels backwards: up_blocks.index mirrors down level n - 1 - index
    and starts from the previous up block's output. The skips come back in reverse: the last resnet
    gets the skip from the previous (finer) down level, hence that level's channels for it and the
    block's own for the others.
    """
    rev = config.block_out_channels[::-1]
    prev_output_channel, out_channels = rev[max(index - 1, 0)], rev[index]
    in_channels = rev[min(index + 1, config.num_blocks - 1)]
    num_layers = config.layers[::-1][index] + 1
    resnets = []
    for i in range(num_layers):
        res_skip_channels = in_channels if i == num_layers - 1 else out_channels
        resnet_in_channels = prev_output_channel if i == 0 else out_channels
        resnets.append(_resnet(config, resnet_in_channels + res_skip_channels, out_channels, dtype))
    return nn.ModuleList(resnets)


class UpBlock2D(nn.Module):
    """up_blocks.index: (concat skip, ResnetBlock2D) x layers, then an Upsample2D to `upsample_size`
    unless last."""

    has_cross_attention = False

    def __init__(self, config: UNetConfig, index: int, dtype: str = "float32"):
        super().__init__()
        self.resnets = _up_resnets(config, index, dtype)
        out_channels = config.block_out_channels[::-1][index]
        self.upsamplers = (nn.ModuleList([Upsample2D(out_channels, dtype)]) if index < config.num_blocks - 1
                           else None)

    def forward(self, hidden_states: nn.Tensor, res_hidden_states_tuple: tuple, temb: nn.Tensor,
                upsample_size: tuple[int, int] | None = None) -> nn.Tensor:
        skips = list(res_hidden_states_tuple)
        for resnet in self.resnets:
            hidden_states = op.concat([hidden_states, skips.pop()], dim=1)  # [B, C + C_skip, H, W]
            hidden_states = resnet(hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(nn.Module):
    """up_blocks.index: (concat skip, ResnetBlock2D, Transformer2DModel) x layers, then an
    Upsample2D unless last."""

    has_cross_attention = True

    def __init__(self, config: UNetConfig, index: int, dtype: str = "float32"):
        super().__init__()
        self.resnets = _up_resnets(config, index, dtype)
        level = config.num_blocks - 1 - index  # the down level this block mirrors
        out_channels = config.block_out_channels[level]
        self.attentions = nn.ModuleList([
            _transformer(config, level, out_channels, dtype, config.only_cross[level])
            for _ in range(len(self.resnets))
        ])
        self.upsamplers = (nn.ModuleList([Upsample2D(out_channels, dtype)]) if index < config.num_blocks - 1
                           else None)

    def forward(self, hidden_states: nn.Tensor, res_hidden_states_tuple: tuple, temb: nn.Tensor,
                encoder_hidden_states: nn.Tensor, upsample_size: tuple[int, int] | None = None,
                tome: ToMeInfo | None = None) -> nn.Tensor:
        skips = list(res_hidden_states_tuple)
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = op.concat([hidden_states, skips.pop()], dim=1)  # [B, C + C_skip, H, W]
            hidden_states = resnet(hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states, tome=tome)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states
