"""UNet2DConditionModel: the SD1.x/SD2.x denoiser, in Relax.

Reference: diffusers/models/unets/unet_2d_condition.py (`UNet2DConditionModel.__init__` and `forward`),
paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022).

One forward pass predicts the noise (or v) for a batch of latents. Classifier-free guidance is only
the batch dimension (2N rows: unconditional and conditional); the guidance math stays on the host.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sdcore.errors import SdcoreError
from sdcore.unet.blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    TimestepEmbedding,
    Timesteps,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from sdcore.unet.config import UNetConfig


class UNet2DConditionModel(nn.Module):
    """diffusers `UNet2DConditionModel` with the SD block pattern; parameter names equal diffusers' keys.

    forward(sample [B, in_channels, h, w], timestep [B] float32, encoder_hidden_states [B, S, D])
    -> noise prediction [B, out_channels, h, w].
    """

    def __init__(self, config: UNetConfig, dtype: str = "float32"):
        super().__init__()
        self.config = config
        self.dtype = dtype
        c = config
        channels = c.block_out_channels
        groups, eps, ted = c.norm_num_groups, c.norm_eps, c.time_embed_dim

        self.conv_in = nn.Conv2D(c.in_channels, channels[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2,
                                 dtype=dtype)
        self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], ted, dtype)

        down_blocks = []
        output_channel = channels[0]
        for i, block_type in enumerate(c.down_block_types):
            input_channel, output_channel = output_channel, channels[i]
            add_downsample = i < c.num_blocks - 1
            if block_type == "CrossAttnDownBlock2D":
                down_blocks.append(CrossAttnDownBlock2D(
                    input_channel, output_channel, ted, c.layers[i], c.transformer_layers[i], c.num_heads[i],
                    c.cross_attention_dims[i], groups, eps, add_downsample, c.downsample_padding,
                    c.use_linear_projection, c.only_cross[i], c.upcast_attention, dtype))
            else:
                down_blocks.append(DownBlock2D(input_channel, output_channel, ted, c.layers[i], groups, eps,
                                               add_downsample, c.downsample_padding, dtype))
        self.down_blocks = nn.ModuleList(down_blocks)

        self.mid_block = UNetMidBlock2DCrossAttn(
            channels[-1], ted, c.transformer_layers[-1], c.num_heads[-1], c.cross_attention_dims[-1], groups, eps,
            c.mid_block_scale_factor, c.use_linear_projection, c.upcast_attention, dtype)

        up_blocks = []
        # the up path reads the per-block lists backwards
        rev_channels, rev_layers, rev_heads = channels[::-1], c.layers[::-1], c.num_heads[::-1]
        rev_tlayers, rev_cross, rev_only_cross = (c.transformer_layers[::-1], c.cross_attention_dims[::-1],
                                                  c.only_cross[::-1])
        output_channel = rev_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            prev_output_channel, output_channel = output_channel, rev_channels[i]
            input_channel = rev_channels[min(i + 1, c.num_blocks - 1)]
            add_upsample = i < c.num_blocks - 1
            if block_type == "CrossAttnUpBlock2D":
                up_blocks.append(CrossAttnUpBlock2D(
                    input_channel, prev_output_channel, output_channel, ted, rev_layers[i] + 1, rev_tlayers[i],
                    rev_heads[i], rev_cross[i], groups, eps, add_upsample, c.use_linear_projection,
                    rev_only_cross[i], c.upcast_attention, dtype))
            else:
                up_blocks.append(UpBlock2D(input_channel, prev_output_channel, output_channel, ted,
                                           rev_layers[i] + 1, groups, eps, add_upsample, dtype))
        self.up_blocks = nn.ModuleList(up_blocks)

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps, dtype=dtype)
        # conv_act is SiLU: no weights
        self.conv_out = nn.Conv2D(channels[0], c.out_channels, c.conv_out_kernel,
                                  padding=(c.conv_out_kernel - 1) // 2, dtype=dtype)

    def forward(self, sample: nn.Tensor, timestep: nn.Tensor, encoder_hidden_states: nn.Tensor) -> nn.Tensor:
        # 1. time: sinusoidal features in float32, then the embedding MLP in the model's dtype
        t_emb = self.time_proj(timestep).astype(self.dtype)  # [B, C0]
        emb = self.time_embedding(t_emb)  # [B, time_embed_dim]

        # 2. down, keeping every intermediate output as a skip
        sample = self.conv_in(sample)
        down_block_res_samples = [sample]
        for block in self.down_blocks:
            if block.has_cross_attention:
                sample, res_samples = block(sample, emb, encoder_hidden_states)
            else:
                sample, res_samples = block(sample, emb)
            down_block_res_samples.extend(res_samples)

        # 3. mid
        sample = self.mid_block(sample, emb, encoder_hidden_states)

        # 4. up, each block consuming as many skips as it has resnets
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res_samples = tuple(down_block_res_samples[-n:])
            down_block_res_samples = down_block_res_samples[:-n]
            # Upsample to the next skip's size. diffusers passes it only when h or w is not a multiple
            # of 2**num_upsamplers (odd sizes round up on the way down); otherwise it is exactly 2x.
            upsample_size = None
            if i < len(self.up_blocks) - 1:
                upsample_size = tuple(down_block_res_samples[-1].shape[2:])
            if block.has_cross_attention:
                sample = block(sample, res_samples, emb, encoder_hidden_states, upsample_size)
            else:
                sample = block(sample, res_samples, emb, upsample_size)

        # 5. out
        sample = op.silu(self.conv_norm_out(sample))
        return self.conv_out(sample)


def unet_spec(config: UNetConfig, batch: int, height: int, width: int, seq_len: int = 77,
              dtype: str = "float32") -> dict:
    """Export spec of `forward` for static shapes; height/width are latent sizes (image size / 8).

    seq_len is 77 per prompt chunk (long prompts: 154, 231, ...); batch is 2N with guidance.
    """
    if min(batch, height, width, seq_len) < 1:
        raise SdcoreError(f"UNet shapes must be positive: batch {batch}, latent {height}x{width}, "
                          f"sequence {seq_len}.")
    return {
        "forward": {
            "sample": nn.spec.Tensor([batch, config.in_channels, height, width], dtype),
            "timestep": nn.spec.Tensor([batch], "float32"),
            "encoder_hidden_states": nn.spec.Tensor([batch, seq_len, config.cross_attention_dims[0]], dtype),
            "$": {"param_mode": "plain", "effect_mode": "none"},
        }
    }


def parity_layer_names(config: UNetConfig, *, detail: bool = True) -> list[str]:
    """Submodules compared with diffusers, in execution order: every block and, with `detail`,
    every resnet, Transformer2DModel, transformer block, down/upsampler inside them."""
    names = ["time_proj", "time_embedding", "conv_in"]

    def inner(prefix: str, layers: int, has_attn: bool, tlayers: int, sampler: str | None) -> list[str]:
        out = []
        for j in range(layers):
            out.append(f"{prefix}.resnets.{j}")
            if has_attn:
                out.append(f"{prefix}.attentions.{j}")
                out += [f"{prefix}.attentions.{j}.transformer_blocks.{k}" for k in range(tlayers)]
        if sampler:
            out.append(f"{prefix}.{sampler}.0")
        return out + [prefix]

    last = config.num_blocks - 1
    for i, block_type in enumerate(config.down_block_types):
        sub = inner(f"down_blocks.{i}", config.layers[i], block_type.startswith("CrossAttn"),
                    config.transformer_layers[i], "downsamplers" if i < last else None)
        names += sub if detail else sub[-1:]
    mid = ["mid_block.resnets.0", "mid_block.attentions.0"]
    mid += [f"mid_block.attentions.0.transformer_blocks.{k}" for k in range(config.transformer_layers[-1])]
    mid += ["mid_block.resnets.1", "mid_block"]
    names += mid if detail else mid[-1:]
    rev_layers, rev_tlayers = config.layers[::-1], config.transformer_layers[::-1]
    for i, block_type in enumerate(config.up_block_types):
        sub = inner(f"up_blocks.{i}", rev_layers[i] + 1, block_type.startswith("CrossAttn"), rev_tlayers[i],
                    "upsamplers" if i < last else None)
        names += sub if detail else sub[-1:]
    return names + ["conv_norm_out", "conv_out"]
