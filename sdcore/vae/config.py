"""VAEConfig: the keys of diffusers' `AutoencoderKL` config (vae/config.json).

Reference: diffusers/models/autoencoders/autoencoder_kl.py (`AutoencoderKL.__init__`). Defaults are
diffusers' defaults (a one-block toy VAE), so a config.json that omits a key means what it means to
diffusers; `SD_VAE_CONFIG` is the SD1.x/SD2.x VAE. Bookkeeping keys are on `IGNORED_KEYS`; any other
unknown key or unsupported value raises SdcoreError.
"""

from __future__ import annotations

import dataclasses
import json
import os

from sdcore.errors import SdcoreError

SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_UP_BLOCKS = ("UpDecoderBlock2D",)
# diffusers' get_activation maps both names to torch.nn.SiLU.
SUPPORTED_ACTIVATIONS = ("silu", "swish")

# Keys diffusers' ConfigMixin writes for itself; none of them shapes the network.
IGNORED_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32  # training resolution; only diffusers' tiling reads it
    # Host-side latent scaling (the pipeline applies it, the compiled functions never do):
    # z = (latent - shift_factor) * scaling_factor; shift_factor is None for SD1.x/SD2.x.
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # the pipeline runs this VAE in float32 when the rest is half precision
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
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
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD): one halving per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """Read a diffusers AutoencoderKL config dict; unknown keys and unsupported values raise SdcoreError."""
        class_name = d.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise SdcoreError(f"VAE class {class_name!r} is not supported (expected 'AutoencoderKL').")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in IGNORED_KEYS)
        if unknown:
            raise SdcoreError(f"VAE config has unknown keys: {', '.join(unknown)}.")
        return cls(**{k: _as_tuple(v) for k, v in d.items() if k in fields})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "VAEConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise SdcoreError(f"cannot read VAE config {os.fspath(path)}: {err}.") from err
        return cls.from_dict(d)


def _check_positive_int(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SdcoreError(f"VAE {key} must be a positive integer, found {value!r}.")


# The VAE of SD1.x and SD2.x (stable-diffusion-v1-5/vae/config.json, stabilityai/stable-diffusion-2-1/vae).
SD_VAE_CONFIG = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    sample_size=512,
)
