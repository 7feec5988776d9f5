"""Layer-by-layer comparison of sdcore's networks with the reference implementations.

- `scores.py`: `compare` scores one tensor against its reference; the thresholds live in
  TOLERANCES only.
- `taps.py`: `build_tapped` (a debug build of an sdcore network that also returns chosen
  submodules' outputs) and `reference_taps` (the same names hooked on the torch reference).
- `tool.py`: `python -m sdcore.parity MODEL_DIR` (also `sdcore parity`), one table per network of
  a converted model.

torch, diffusers and transformers are imported lazily, only where a reference runs.
"""

from sdcore.parity.scores import TOLERANCES, LayerDiff, compare, format_table
from sdcore.parity.taps import build_tapped, named_modules, reference_taps
from sdcore.parity.tool import main

__all__ = ["TOLERANCES", "LayerDiff", "build_tapped", "compare", "format_table", "main", "named_modules",
           "reference_taps"]
