"""The VAE (diffusers' AutoencoderKL): `VAEConfig` (no TVM needed) and the Relax `AutoencoderKL`.

The model names load TVM, so they are imported on first use: reading a config stays light.
"""

from sdcore.vae.config import SD_VAE_CONFIG, VAEConfig

_MODEL_NAMES = ("AutoencoderKL", "Encoder", "Decoder", "vae_spec", "parity_layer_names")

__all__ = ["SD_VAE_CONFIG", "VAEConfig", *_MODEL_NAMES]


def __getattr__(name):
    if name in _MODEL_NAMES:
        from sdcore.vae import model

        return getattr(model, name)
    raise AttributeError(f"module 'sdcore.vae' has no attribute {name!r}")
