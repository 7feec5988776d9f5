"""VAEConfig: the keys of diffusers' `AutoencoderKL` config (vae/config.json).

Reference: diffusers/models/autoencoders/autoencoder_kl.py (`AutoencoderKL.__init__`). Defaults are
diffusers' defaults (a one-block toy VAE), so a config.json that omits a key means what it means to
diffusers; `SD_VAE_CONFIG` is the SD1.x/SD2.x VAE. Keys are read as sdcore/config.py describes:
a field, an ignored key with its reason, or an unsupported option that must hold its inert value.
"""

from __future__ import annotations

import dataclasses

from sdcore.config import ConfigBase, check_sample_size, sample_hw
from sdcore.errors import SdcoreError
from sdcore.presets import PRESETS

SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_UP_BLOCKS = ("UpDecoderBlock2D",)
# diffusers' get_activation maps both names to torch.nn.SiLU.
SUPPORTED_ACTIVATIONS = ("silu", "swish")

IGNORED = {
    "_diffusers_version": "bookkeeping written by diffusers",
    "_name_or_path": "bookkeeping written by diffusers",
    "_use_default_values": "bookkeeping written by diffusers",
    # diffusers' pipelines run the VAE in float32 when this is set and the rest is float16; sdcore's
    # VAE is always float32, which is what it asks for (False would only allow float16)
    "force_upcast": "sdcore always runs the VAE in float32",
}

# Latent normalisation of later models (SD3, Flux: shift_factor; SDXL-style per-channel
# latents_mean/std): the pipeline applies scaling_factor only, so only their null is accepted,
# which is what SD1.x/SD2.x configs carry.
UNSUPPORTED_OPTIONS = {
    "latents_mean": (None,),
    "latents_std": (None,),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig(ConfigBase):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022)."""

    TITLE = "VAE"
    CLASS_KEY = ("_class_name", "AutoencoderKL")
    IGNORED = IGNORED
    UNSUPPORTED_OPTIONS = UNSUPPORTED_OPTIONS
    POSITIVE = frozenset({"in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                          "norm_num_groups", "sample_size"})

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    # The training resolution in pixels, an int or [height, width]: not part of the network, so
    # configs that differ only here are equal.
    sample_size: int | tuple[int, int] = dataclasses.field(default=32, compare=False)
    # Host-side latent scaling (the pipeline applies it, the compiled functions never do):
    # z = latent * scaling_factor.
    scaling_factor: float = 0.18215
    shift_factor: None = None  # z = (latent - shift_factor) * scaling_factor elsewhere: only None is read
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        check_sample_size("VAE", self.sample_size)
        if self.shift_factor is not None:
            raise SdcoreError(f"VAE config: shift_factor={self.shift_factor!r} is not supported by sdcore (it "
                              f"implements None: the pipeline applies scaling_factor only).")
        for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            _check_positive_int(key, getattr(self, key))
        if not self.block_out_channels:
            raise SdcoreError("VAE block_out_channels must not be empty.")
        for c in self.block_out_channels:
            _check_positive_int("block_out_channels", c)
            if c % self.norm_num_groups:
                raise SdcoreError(
                    f"VAE block_out_channels {c} is not a multiple of norm_num_groups {self.norm_num_groups}."
                )
        if self.act_fn not in SUPPORTED_ACTIVATIONS:
            raise SdcoreError(
                f"VAE act_fn {self.act_fn!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})."
            )
        for key, types, supported in (("down_block_types", self.down_block_types, SUPPORTED_DOWN_BLOCKS),
                                      ("up_block_types", self.up_block_types, SUPPORTED_UP_BLOCKS)):
            bad = [t for t in types if t not in supported]
            if bad:
                raise SdcoreError(f"VAE {key} {bad[0]!r} is not supported (supported: {', '.join(supported)}).")
            if len(types) != len(self.block_out_channels):
                raise SdcoreError(
                    f"VAE {key} has {len(types)} entries but block_out_channels has {len(self.block_out_channels)}."
                )

    @property
    def sample_hw(self) -> tuple[int, int]:
        """(height, width) of sample_size in pixels."""
        return sample_hw(self.sample_size)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD): one halving per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)


def _check_positive_int(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SdcoreError(f"VAE {key} must be a positive integer, found {value!r}.")


# The VAE of SD1.x and SD2.x (stable-diffusion-v1-5/vae/config.json, stabilityai/stable-diffusion-2-1/vae).
SD_VAE_CONFIG = VAEConfig.from_dict(PRESETS["sd15"]["vae"])
