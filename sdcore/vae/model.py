"""The KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models") in Relax: images to latent moments and latents back to images.

Reference: diffusers/models/autoencoders/autoencoder_kl.py (`AutoencoderKL`) and vae.py (`Encoder`,
`Decoder`, `DiagonalGaussianDistribution`); the blocks are in blocks.py. Parameter names equal the
keys of vae/diffusion_pytorch_model.safetensors in diffusers' layout (the legacy `query/key/value/
proj_attn` attention names are renamed by the converter, not here).

Only the deterministic part of the VAE is compiled: `encode` returns the Gaussian's mean and clamped
log-variance, and the host draws the sample. Neither function applies `scaling_factor`/`shift_factor`
(host side too).
"""

from __future__ import annotations

from typing import Sequence

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sdcore.errors import SdcoreError
from sdcore.vae.blocks import GROUP_NORM_EPS, DownEncoderBlock2D, GroupNorm, UNetMidBlock2D, UpDecoderBlock2D
from sdcore.vae.config import VAEConfig

FUNCTIONS = ("encode", "decode")

# DiagonalGaussianDistribution clamps the log-variance to this range before using it.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2 * latent_channels, H / f, W / f] (mean then logvar)."""

    def __init__(self, config: VAEConfig, dtype: str):
        channels = config.block_out_channels
        self.conv_in = nn.Conv2D(config.in_channels, channels[0], 3, padding=1, dtype=dtype)
        self.down_blocks = nn.ModuleList([DownEncoderBlock2D(config, i, dtype) for i in range(len(channels))])
        self.mid_block = UNetMidBlock2D(config, dtype)
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[-1], GROUP_NORM_EPS, dtype)
        # conv_act is SiLU: no weights. double_z: mean and logvar channels.
        self.conv_out = nn.Conv2D(channels[-1], 2 * config.latent_channels, 3, padding=1, dtype=dtype)

    def forward(self, sample: nn.Tensor) -> nn.Tensor:
        sample = self.conv_in(sample)
        for down_block in self.down_blocks:
            sample = down_block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(op.silu(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latents [B, latent_channels, h, w] -> image [B, out_channels, h * f, w * f]."""

    def __init__(self, config: VAEConfig, dtype: str):
        reversed_channels = config.block_out_channels[::-1]
        self.conv_in = nn.Conv2D(config.latent_channels, reversed_channels[0], 3, padding=1, dtype=dtype)
        self.mid_block = UNetMidBlock2D(config, dtype)
        self.up_blocks = nn.ModuleList([UpDecoderBlock2D(config, i, dtype) for i in range(len(reversed_channels))])
        self.conv_norm_out = GroupNorm(config.norm_num_groups, reversed_channels[-1], GROUP_NORM_EPS, dtype)
        # conv_act is SiLU: no weights.
        self.conv_out = nn.Conv2D(reversed_channels[-1], config.out_channels, 3, padding=1, dtype=dtype)

    def forward(self, sample: nn.Tensor) -> nn.Tensor:
        sample = self.conv_in(sample)
        sample = self.mid_block(sample)
        for up_block in self.up_blocks:
            sample = up_block(sample)
        return self.conv_out(op.silu(self.conv_norm_out(sample)))


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL without tiling or slicing; exports `encode` and/or `decode`.

    `functions` picks which halves exist: a decode-only module has no encoder parameters, so a
    txt2img pipeline neither compiles nor binds the encoder (bind `{n: sd[n] for n in cm.param_names}`).
    """

    def __init__(self, config: VAEConfig, dtype: str = "float32", functions: Sequence[str] = FUNCTIONS):
        functions = _check_functions(functions)
        self.config = config
        self.dtype = dtype
        self.encoder = self.quant_conv = self.decoder = self.post_quant_conv = None
        latent = config.latent_channels
        if "encode" in functions:
            self.encoder = Encoder(config, dtype)
            if config.use_quant_conv:
                self.quant_conv = nn.Conv2D(2 * latent, 2 * latent, 1, dtype=dtype)
        if "decode" in functions:
            if config.use_post_quant_conv:
                self.post_quant_conv = nn.Conv2D(latent, latent, 1, dtype=dtype)
            self.decoder = Decoder(config, dtype)

    def encode(self, x: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor]:
        """x [B, in_channels, H, W] in [-1, 1] -> (mean, logvar), each [B, latent_channels, H / f, W / f]."""
        if self.encoder is None:
            raise SdcoreError("this AutoencoderKL was built without 'encode' (see its functions argument).")
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = op.chunk(h, 2, dim=1)  # 2 x [B, latent_channels, h, w]
        logvar = op.wrap_nested(relax.op.clip(logvar._expr, LOGVAR_MIN, LOGVAR_MAX), "clip_logvar")
        return mean, logvar

    def decode(self, z: nn.Tensor) -> nn.Tensor:
        """z [B, latent_channels, h, w], already divided by scaling_factor -> image [B, out_channels, h * f, w * f]."""
        if self.decoder is None:
            raise SdcoreError("this AutoencoderKL was built without 'decode' (see its functions argument).")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _check_functions(functions: Sequence[str]) -> tuple[str, ...]:
    functions = tuple(functions)
    unknown = [f for f in functions if f not in FUNCTIONS]
    if unknown or not functions:
        raise SdcoreError(f"VAE functions must be a non-empty subset of {FUNCTIONS}, found {functions}.")
    return functions


def vae_spec(config: VAEConfig, batch: int, height: int, width: int, *, dtype: str = "float32",
             functions: Sequence[str] = FUNCTIONS) -> dict:
    """The export spec of `AutoencoderKL(config, dtype, functions)` for images of height x width pixels.

    encode takes [batch, in_channels, height, width]; decode takes latents of height/f x width/f
    (f = config.downsample_factor, 8 for SD) and returns [batch, out_channels, height, width].
    """
    functions = _check_functions(functions)
    f = config.downsample_factor
    if height % f or width % f or height < f or width < f:
        raise SdcoreError(f"image size {width}x{height} must be a positive multiple of {f} for this VAE.")
    spec = {}
    if "encode" in functions:
        spec["encode"] = {"x": nn.spec.Tensor((batch, config.in_channels, height, width), dtype)}
    if "decode" in functions:
        spec["decode"] = {"z": nn.spec.Tensor((batch, config.latent_channels, height // f, width // f), dtype)}
    return spec


def parity_layer_names(config: VAEConfig, functions: Sequence[str] = FUNCTIONS) -> list[str]:
    """Submodules compared with diffusers: every block, resnet, sampler and the mid-block attention.

    Names under `encoder`/`quant_conv` are computed by `encode`, the others by `decode`.
    """
    functions = _check_functions(functions)
    n_blocks = len(config.block_out_channels)
    names = []

    def mid_block(prefix: str) -> list[str]:
        attention = [f"{prefix}.mid_block.attentions.0"] if config.mid_block_add_attention else []
        return [f"{prefix}.mid_block.resnets.0", *attention, f"{prefix}.mid_block.resnets.1", f"{prefix}.mid_block"]

    if "encode" in functions:
        names.append("encoder.conv_in")
        for i in range(n_blocks):
            block = f"encoder.down_blocks.{i}"
            names += [f"{block}.resnets.{j}" for j in range(config.layers_per_block)]
            if i < n_blocks - 1:
                names.append(f"{block}.downsamplers.0")
            names.append(block)
        names += mid_block("encoder")
        names += ["encoder.conv_norm_out", "encoder.conv_out", "encoder"]
        if config.use_quant_conv:
            names.append("quant_conv")
    if "decode" in functions:
        if config.use_post_quant_conv:
            names.append("post_quant_conv")
        names.append("decoder.conv_in")
        names += mid_block("decoder")
        for i in range(n_blocks):
            block = f"decoder.up_blocks.{i}"
            names += [f"{block}.resnets.{j}" for j in range(config.layers_per_block + 1)]
            if i < n_blocks - 1:
                names.append(f"{block}.upsamplers.0")
            names.append(block)
        names += ["decoder.conv_norm_out", "decoder.conv_out", "decoder"]
    return names
