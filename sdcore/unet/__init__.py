"""The SD1.x/SD2.x denoising UNet (diffusers' UNet2DConditionModel) in Relax.

`UNetConfig` reads diffusers' unet/config.json without TVM; the model and its spec import TVM
only when asked for (`from sdcore.unet.model import ...`, or the lazy names below).
"""

from sdcore.unet.config import UNetConfig

__all__ = ["UNetConfig", "UNet2DConditionModel", "unet_spec", "parity_layer_names"]


def __getattr__(name):
    if name in ("UNet2DConditionModel", "unet_spec", "parity_layer_names"):
        from sdcore.unet import model

        return getattr(model, name)
    raise AttributeError(f"module 'sdcore.unet' has no attribute {name!r}")
