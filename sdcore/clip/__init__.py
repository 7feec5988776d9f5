"""CLIP text encoder: `CLIPTextConfig` (no TVM needed) and the Relax `CLIPTextModel`.

The model names load TVM, so they are imported on first use: reading a config stays light.
"""

from sdcore.clip.config import CLIPTextConfig, check_input_ids

_MODEL_NAMES = ("CLIPTextModel", "clip_spec", "parity_layer_names")

__all__ = ["CLIPTextConfig", "check_input_ids", *_MODEL_NAMES]


def __getattr__(name):
    if name in _MODEL_NAMES:
        from sdcore.clip import model

        return getattr(model, name)
    raise AttributeError(f"module 'sdcore.clip' has no attribute {name!r}")
