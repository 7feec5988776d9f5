"""sdcore: Stable Diffusion from scratch, NumPy on the host, every network in Apache TVM Relax.

`import sdcore` imports numpy only; TVM loads when a model is compiled, and torch,
diffusers and transformers are never imported here (they are test references).
"""

__version__ = "0.1.0"

from sdcore.errors import SdcoreError
from sdcore.models import demo_model_path

__all__ = ["SdcoreError", "__version__", "demo_model_path"]
