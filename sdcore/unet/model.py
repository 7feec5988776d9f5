"""UNet2DConditionModel: the SD1.x/SD2.x denoiser, in Relax.

Reference: diffusers/models/unets/unet_2d_condition.py (`UNet2DConditionModel.__init__` and `forward`),
paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022).

One forward pass predicts the noise (or v) for a batch of latents. Classifier-free guidance is only
the batch dimension (2N rows: unconditional and conditional); the guidance math stays on the host.

Token merging (ToMe, `sdcore/tome/`) is an option of the built graph: `UNet2DConditionModel(config,
tome=ToMeConfig(...))` merges tokens in the transformer blocks that tomesd would patch, with the
per-block plan fixed by the latent size; with use_rand, the random destinations are the extra int32
input `tome_rand` (`unet_tome_inputs` draws it on the host from a seed).
"""

from __future__ import annotations

from typing import Sequence

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sdcore.errors import SdcoreError
from sdcore.tome.config import ToMeBlockPlan, ToMeConfig, random_input_size
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

_BLOCKS = {block.__name__: block for block in (CrossAttnDownBlock2D, DownBlock2D, CrossAttnUpBlock2D, UpBlock2D)}


class UNet2DConditionModel(nn.Module):
    """diffusers `UNet2DConditionModel` with the SD block pattern; parameter names equal diffusers' keys.

    forward(sample [B, in_channels, h, w], timestep [B] float32, encoder_hidden_states [B, S, D],
    tome_rand [K] int32 (only with ToMe's use_rand, see `unet_spec`)) -> noise prediction [B, out_channels, h, w].

    `tome`: token merging options; None or a ratio of 0 builds the plain graph.
    """

    def __init__(self, config: UNetConfig, dtype: str = "float32", tome: ToMeConfig | None = None):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.tome = tome if tome is not None and tome.enabled else None
        c = config
        channels = c.block_out_channels

        self.conv_in = nn.Conv2D(c.in_channels, channels[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2,
                                 dtype=dtype)
        self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], c.time_embed_dim, dtype)

        self.down_blocks = nn.ModuleList([_BLOCKS[block_type](c, i, dtype)
                                          for i, block_type in enumerate(c.down_block_types)])
        self.mid_block = UNetMidBlock2DCrossAttn(c, dtype)
        self.up_blocks = nn.ModuleList([_BLOCKS[block_type](c, i, dtype)
                                        for i, block_type in enumerate(c.up_block_types)])

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps, dtype=dtype)
        # conv_act is SiLU: no weights
        self.conv_out = nn.Conv2D(channels[0], c.out_channels, c.conv_out_kernel,
                                  padding=(c.conv_out_kernel - 1) // 2, dtype=dtype)

    def forward(self, sample: nn.Tensor, timestep: nn.Tensor, encoder_hidden_states: nn.Tensor,
                tome_rand: nn.Tensor | None = None) -> nn.Tensor:
        # 0. ToMe: what each transformer block merges at this latent size (tomesd's forward pre-hook
        # records the size; here it is static)
        tome = None
        batch, _, height, width = (int(s) for s in sample.shape)
        plans = tome_plans(self.config, self.tome, batch, height, width)
        if any(plan.merges for _, plan in plans):
            from sdcore.tome.patch import ToMeInfo

            tome = ToMeInfo(self.tome, plans, tome_rand)
        elif tome_rand is not None:
            raise SdcoreError("tome_rand given, but no transformer block merges tokens.")

        # 1. time: sinusoidal features in float32, then the embedding MLP in the model's dtype
        t_emb = self.time_proj(timestep).astype(self.dtype)  # [B, C0]
        emb = self.time_embedding(t_emb)  # [B, time_embed_dim]

        # 2. down, keeping every intermediate output as a skip
        sample = self.conv_in(sample)
        down_block_res_samples = [sample]
        for block in self.down_blocks:
            if block.has_cross_attention:
                sample, res_samples = block(sample, emb, encoder_hidden_states, tome=tome)
            else:
                sample, res_samples = block(sample, emb)
            down_block_res_samples.extend(res_samples)

        # 3. mid
        sample = self.mid_block(sample, emb, encoder_hidden_states, tome=tome)

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
                sample = block(sample, res_samples, emb, encoder_hidden_states, upsample_size, tome=tome)
            else:
                sample = block(sample, res_samples, emb, upsample_size)

        if tome is not None:
            tome.finish()

        # 5. out
        sample = op.silu(self.conv_norm_out(sample))
        return self.conv_out(sample)


def unet_spec(config: UNetConfig, batch: int, height: int, width: int, seq_len: int = 77,
              dtype: str = "float32", tome: ToMeConfig | None = None) -> dict:
    """Export spec of `forward` for static shapes; height/width are latent sizes (image size / 8).

    seq_len is 77 per prompt chunk (long prompts: 154, 231, ...); batch is 2N with guidance. With a
    ToMe that merges with random destinations, forward also takes `tome_rand` (int32 [K]).
    """
    if min(batch, height, width, seq_len) < 1:
        raise SdcoreError(f"UNet shapes must be positive: batch {batch}, latent {height}x{width}, "
                          f"sequence {seq_len}.")
    spec = {
        "sample": nn.spec.Tensor([batch, config.in_channels, height, width], dtype),
        "timestep": nn.spec.Tensor([batch], "float32"),
        "encoder_hidden_states": nn.spec.Tensor([batch, seq_len, config.cross_attention_dims[0]], dtype),
    }
    rand_size = random_input_size(tome_plans(config, tome, batch, height, width))
    if rand_size:
        spec["tome_rand"] = nn.spec.Tensor([rand_size], "int32")
    return {"forward": dict(spec, **{"$": {"param_mode": "plain", "effect_mode": "none"}})}


def transformer_blocks(config: UNetConfig, height: int, width: int) -> list[tuple[str, int]]:
    """Every BasicTransformerBlock as (name, token count) in execution order, for a latent of
    height x width: the grid of down level i is the latent after i stride-2 downsamplers, and the
    mid block and up_blocks.i run on the grids of levels num_blocks - 1 and num_blocks - 1 - i."""
    sizes = [(height, width)]
    for _ in range(config.num_blocks - 1):
        h, w = sizes[-1]
        if config.downsample_padding == 0:  # pad right/bottom by one, then an unpadded 3x3 stride-2 conv
            sizes.append((h // 2, w // 2))
        else:  # 3x3 stride-2 conv with padding p (1 in SD)
            p = config.downsample_padding
            sizes.append(((h + 2 * p - 3) // 2 + 1, (w + 2 * p - 3) // 2 + 1))
    last = config.num_blocks - 1
    blocks = []
    for name in parity_layer_names(config):
        if ".transformer_blocks." not in name:
            continue
        stage, index = name.split(".")[:2]
        if stage == "down_blocks":
            level = int(index)
        elif stage == "up_blocks":
            level = last - int(index)
        else:  # mid_block
            level = last
        blocks.append((name, sizes[level][0] * sizes[level][1]))
    return blocks


def tome_plans(config: UNetConfig, tome: ToMeConfig | None, batch: int, height: int,
               width: int) -> list[tuple[str, ToMeBlockPlan]]:
    """(name, plan) of every transformer block for this shape, in execution order; [] without ToMe.

    Raises SdcoreError where ToMe cannot merge a block at this size (see ToMeConfig.plan_for_tokens).
    """
    if tome is None or not tome.enabled:
        return []
    return tome.plan_blocks((height, width), transformer_blocks(config, height, width), batch)


def unet_tome_inputs(config: UNetConfig, tome: ToMeConfig | None, batch: int, height: int, width: int,
                     seed: int | Sequence[int]) -> tuple:
    """The extra inputs of the compiled forward: (tome_rand,) with random destinations drawn from
    `seed` (an int or a tuple such as (seed, step)), or () when the graph takes none."""
    rand = tome.random_indices(tome_plans(config, tome, batch, height, width), seed) if tome else None
    return () if rand is None else (rand,)


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
