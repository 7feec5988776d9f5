"""The SD1.x/SD2.x denoising UNet (diffusers' UNet2DConditionModel) in Relax.

`UNetConfig` reads diffusers' unet/config.json without TVM; the model and its spec import TVM
only when asked for (`from sdcore.unet.model import ...`, or the lazy names below).
"""

from sdcore.unet.config import UNetConfig

_LAZY = ("UNet2DConditionModel", "unet_spec", "parity_layer_names", "transformer_blocks", "tome_plans",
         "unet_tome_inputs")
__all__ = ["UNetConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from sdcore.unet import model

        return getattr(model, name)
    raise AttributeError(f"module 'sdcore.unet' has no attribute {name!r}")
