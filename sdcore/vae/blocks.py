"""The VAE's building blocks in Relax, one class per diffusers block, same attribute names.

References (diffusers/models/): resnet.py `ResnetBlock2D` (here without a time embedding),
upsampling.py `Upsample2D`, attention_processor.py `Attention` with
`AttnProcessor2_0` (the VAE's single-head spatial self-attention), unets/unet_2d_blocks.py
`UNetMidBlock2D`, `DownEncoderBlock2D`, `UpDecoderBlock2D` (built from the VAEConfig and their
index); Downsample2D is sdcore/layers.py's, shared with the UNet.

The VAE builds every block with output_scale_factor = rescale_output_factor = 1, so the divisions
diffusers applies after each residual sum are the identity and are left out. All GroupNorms use
eps 1e-6 and the config's norm_num_groups, through sdcore.layers.GroupNorm (accurate statistics)
rather than TVM's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sdcore.layers import Downsample2D, GroupNorm, attention

if TYPE_CHECKING:
    from sdcore.vae.config import VAEConfig

GROUP_NORM_EPS = 1e-6


class ResnetBlock2D(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 conv_shortcut on x when channels change."""

    def __init__(self, *, in_channels: int, out_channels: int, groups: int, dtype: str = "float32"):
        self.norm1 = GroupNorm(groups, in_channels, GROUP_NORM_EPS, dtype)
        self.conv1 = nn.Conv2D(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(groups, out_channels, GROUP_NORM_EPS, dtype)
        # dropout: no weights (identity at inference).
        self.conv2 = nn.Conv2D(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.conv_shortcut = (nn.Conv2D(in_channels, out_channels, 1, dtype=dtype)
                              if in_channels != out_channels else None)

    def forward(self, input_tensor: nn.Tensor) -> nn.Tensor:
        hidden_states = self.conv1(op.silu(self.norm1(input_tensor)))
        hidden_states = self.conv2(op.silu(self.norm2(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, dtype: str = "float32"):
        self.conv = nn.Conv2D(channels, channels, 3, padding=1, dtype=dtype)

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        b, c, h, w = hidden_states.shape
        # Nearest x2 as a broadcast: each pixel repeated into a 2x2 patch, exact by construction.
        hidden_states = op.reshape(hidden_states, (b, c, h, 1, w, 1))  # [B, C, H, 1, W, 1]
        hidden_states = op.broadcast_to(hidden_states, (b, c, h, 2, w, 2))  # [B, C, H, 2, W, 2]
        hidden_states = op.reshape(hidden_states, (b, c, 2 * h, 2 * w))  # [B, C, 2H, 2W]
        return self.conv(hidden_states)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with GroupNorm in front and a residual.

    diffusers builds it with heads = channels // attention_head_dim and attention_head_dim =
    channels, i.e. one head of dimension C (scale 1/sqrt(C)); upcast_softmax=True.
    """

    def __init__(self, *, channels: int, groups: int, dtype: str = "float32"):
        self.group_norm = GroupNorm(groups, channels, GROUP_NORM_EPS, dtype)
        self.to_q = nn.Linear(channels, channels, dtype=dtype)
        self.to_k = nn.Linear(channels, channels, dtype=dtype)
        self.to_v = nn.Linear(channels, channels, dtype=dtype)
        # to_out.1 is Dropout: no weights.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, dtype=dtype)])

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        # GroupNorm statistics are per (sample, group) over channels and positions: same on [B, C, H, W].
        hidden_states = self.group_norm(hidden_states)
        hidden_states = op.reshape(hidden_states, (b, c, h * w))  # [B, C, N]
        hidden_states = op.permute_dims(hidden_states, (0, 2, 1))  # [B, N, C]
        q = self.to_q(hidden_states)
        k = self.to_k(hidden_states)
        v = self.to_v(hidden_states)
        hidden_states = self.to_out[0](attention(q, k, v, 1, upcast=True))  # [B, N, C]
        hidden_states = op.permute_dims(hidden_states, (0, 2, 1))  # [B, C, N]
        hidden_states = op.reshape(hidden_states, (b, c, h, w))  # [B, C, H, W]
        return hidden_states + residual


class UNetMidBlock2D(nn.Module):
    """resnets.0, then attentions.0 (unless mid_block_add_attention is off), then resnets.1, at the
    deepest level's channels (the encoder's last, the decoder's first)."""

    def __init__(self, config: VAEConfig, dtype: str = "float32"):
        channels, groups = config.block_out_channels[-1], config.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels=channels, out_channels=channels, groups=groups,
                                                    dtype=dtype) for _ in range(2)])
        # mid_block_add_attention=False: diffusers keeps [None] here, which holds no weights either.
        self.attentions = nn.ModuleList([Attention(channels=channels, groups=groups, dtype=dtype)]
                                        if config.mid_block_add_attention else [])

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        hidden_states = self.resnets[0](hidden_states)
        for attn in self.attentions:
            hidden_states = attn(hidden_states)
        return self.resnets[1](hidden_states)


def _resnets(config: VAEConfig, in_channels: int, out_channels: int, num_layers: int, dtype: str) -> nn.ModuleList:
    """num_layers resnets, the first one changing the channels."""
    return nn.ModuleList([
        ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                      groups=config.norm_num_groups, dtype=dtype)
        for i in range(num_layers)
    ])


class DownEncoderBlock2D(nn.Module):
    """encoder.down_blocks.index: layers_per_block resnets from the previous block's channels, then
    a Downsample2D unless last."""

    def __init__(self, config: VAEConfig, index: int, dtype: str = "float32"):
        channels = config.block_out_channels
        out_channels = channels[index]
        self.resnets = _resnets(config, channels[max(index - 1, 0)], out_channels, config.layers_per_block, dtype)
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, padding=0, dtype=dtype)])
                             if index < len(channels) - 1 else None)

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """decoder.up_blocks.index: the channels read backwards, one more resnet than the encoder's
    blocks (as diffusers' Decoder), then an Upsample2D unless last."""

    def __init__(self, config: VAEConfig, index: int, dtype: str = "float32"):
        reversed_channels = config.block_out_channels[::-1]
        out_channels = reversed_channels[index]
        self.resnets = _resnets(config, reversed_channels[max(index - 1, 0)], out_channels,
                                config.layers_per_block + 1, dtype)
        self.upsamplers = (nn.ModuleList([Upsample2D(out_channels, dtype)]) if index < len(reversed_channels) - 1
                           else None)

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states
