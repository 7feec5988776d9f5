"""sdcore: Stable Diffusion from scratch, NumPy on the host, every network in Apache TVM Relax.

`import sdcore` imports numpy only; TVM loads when a model is compiled, and torch,
diffusers and transformers are never imported here (they are test references).
"""

__version__ = "0.1.0"

from sdcore.errors import SdcoreError, UsageError
from sdcore.models import demo_model_path

__all__ = ["SdcoreError", "StableDiffusion", "UsageError", "__version__", "demo_model_path"]


def __getattr__(name):  # sdcore.StableDiffusion without loading the pipeline at import time
    if name == "StableDiffusion":
        from sdcore.pipeline import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'sdcore' has no attribute {name!r}")
