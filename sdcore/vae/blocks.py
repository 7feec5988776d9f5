"""The VAE's building blocks in Relax, one class per diffusers block, same attribute names.

References (diffusers/models/): resnet.py `ResnetBlock2D` (here without a time embedding),
downsampling.py `Downsample2D`, upsampling.py `Upsample2D`, attention_processor.py `Attention` with
`AttnProcessor2_0` (the VAE's single-head spatial self-attention), unets/unet_2d_blocks.py
`UNetMidBlock2D`, `DownEncoderBlock2D`, `UpDecoderBlock2D`.

The VAE builds every block with output_scale_factor = rescale_output_factor = 1, so the divisions
diffusers applies after each residual sum are the identity and are left out. All GroupNorms use
eps 1e-6 and the config's norm_num_groups, through the `GroupNorm` below rather than TVM's.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sdcore.ops import Conv2D, attention, cpu_kernels
from sdcore.schedule.groupnorm import LANES as GROUP_NORM_LANES
from sdcore.schedule.groupnorm import group_norm_kernel
from sdcore.unet.blocks import Downsample2D

GROUP_NORM_EPS = 1e-6


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over [B, C, H, W] (same `weight`/`bias`), with accurate float32 statistics.

    TVM's group_norm sums each group in one serial float32 pass: at the VAE's 512x512 stages (up
    to 1M values per group) its output is off by ~6e-4 relative, which the decoder then amplifies.
    Here each row of W values is summed first, then the row sums, and the variance is taken about
    the mean (two passes): ~1e-7 relative, like PyTorch. Half-precision inputs are upcast.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float, dtype: str):
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter((num_channels,), dtype)
        self.bias = nn.Parameter((num_channels,), dtype)

    def forward(self, x: nn.Tensor, silu: bool = False) -> nn.Tensor:
        """The norm, then SiLU when `silu`: float32 with static shapes and rows a multiple of 16
        wide is one fused CPU kernel (sdcore/schedule/groupnorm.py) on the CPU, the rest this graph."""
        b, c, h, w = x.shape
        g = self.num_groups
        n = (c // g) * h * w
        dtype = x.dtype
        if (cpu_kernels() and dtype == "float32" and all(isinstance(v, int) for v in (b, c, h, w))
                and w % GROUP_NORM_LANES == 0):
            func = group_norm_kernel(b, c, h, w, g, self.eps, silu)
            return op.tensor_ir_op(func, "group_norm", [x, self.weight, self.bias],
                                   out=nn.Tensor.placeholder((b, c, h, w), "float32"))
        if dtype != "float32":
            x = x.astype("float32")
        # The channels of a group are contiguous: [B, C, H, W] -> [B, G, C/G * H, W].
        grouped = op.reshape(x, (b, g, (c // g) * h, w))
        mean = op.sum(op.sum(grouped, axis=3), axis=2) * (1.0 / n)  # [B, G]
        centered = grouped - op.reshape(mean, (b, g, 1, 1))  # [B, G, C/G * H, W]
        var = op.sum(op.sum(centered * centered, axis=3), axis=2) * (1.0 / n)  # [B, G]
        inv_std = op.divide(op.ones((b, g), "float32"), op.sqrt(var + self.eps))  # [B, G]
        normed = op.reshape(centered * op.reshape(inv_std, (b, g, 1, 1)), (b, c, h, w))  # [B, C, H, W]
        if dtype != "float32":
            normed = normed.astype(dtype)
        out = normed * op.reshape(self.weight, (c, 1, 1)) + op.reshape(self.bias, (c, 1, 1))
        return op.silu(out) if silu else out


class ResnetBlock2D(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 conv_shortcut on x when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dtype: str):
        self.norm1 = GroupNorm(groups, in_channels, GROUP_NORM_EPS, dtype)
        self.conv1 = Conv2D(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(groups, out_channels, GROUP_NORM_EPS, dtype)
        # dropout: no weights (identity at inference).
        self.conv2 = Conv2D(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.conv_shortcut = (nn.Conv2D(in_channels, out_channels, 1, dtype=dtype)
                              if in_channels != out_channels else None)

    def forward(self, input_tensor: nn.Tensor) -> nn.Tensor:
        hidden_states = self.conv1(self.norm1(input_tensor, silu=True))
        hidden_states = self.conv2(self.norm2(hidden_states, silu=True))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, dtype: str):
        self.conv = Conv2D(channels, channels, 3, padding=1, dtype=dtype)

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

    def __init__(self, channels: int, groups: int, dtype: str):
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
    """resnets.0, then (attentions.0 if add_attention), then resnets.1; channels unchanged."""

    def __init__(self, channels: int, groups: int, add_attention: bool, dtype: str):
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, dtype) for _ in range(2)])
        # mid_block_add_attention=False: diffusers keeps [None] here, which holds no weights either.
        self.attentions = nn.ModuleList([Attention(channels, groups, dtype)] if add_attention else [])

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        hidden_states = self.resnets[0](hidden_states)
        for attn in self.attentions:
            hidden_states = attn(hidden_states)
        return self.resnets[1](hidden_states)


class DownEncoderBlock2D(nn.Module):
    """num_layers resnets (the first one changes the channels), then a Downsample2D unless last."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_downsample: bool, dtype: str):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, dtype)
            for i in range(num_layers)
        ])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, padding=0, dtype=dtype)]) if add_downsample
                             else None)

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """num_layers resnets (the first one changes the channels), then an Upsample2D unless last."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_upsample: bool, dtype: str):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, dtype)
            for i in range(num_layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, dtype)]) if add_upsample else None

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states
