"""Token merging for Stable Diffusion (ToMe, Bolya & Hoffman 2023), after tomesd 0.1.3.

`ToMeConfig` holds the options and plans which transformer blocks merge; `merge.py` is the matching
as Relax ops and `patch.py` what each UNet transformer block calls (import them where a graph is
built: they import tvm); `reference.py` is the NumPy twin of the matching.
"""

from sdcore.tome.config import ToMeBlockPlan, ToMeConfig, log_lines
from sdcore.tome.reference import random_destination_indices

__all__ = ["ToMeBlockPlan", "ToMeConfig", "log_lines", "random_destination_indices"]
