"""Token merging for Stable Diffusion (ToMe, Bolya & Hoffman 2023), after tomesd 0.1.3.

`ToMeConfig` holds the options and plans which transformer blocks merge; `merge.py` is the matching
as Relax ops (import it where a graph is built: it imports tvm); `reference.py` is the NumPy twin.
"""

from sdcore.tome.config import ToMeBlockPlan, ToMeConfig
from sdcore.tome.reference import random_destination_indices

__all__ = ["ToMeBlockPlan", "ToMeConfig", "random_destination_indices"]
