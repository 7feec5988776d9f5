"""Models shipped inside the package.

`shapes-demo/`: a small text-to-image latent diffusion model trained on procedurally drawn shapes
("a red circle at the top left on a white background"), for demos and tests; see docs/demo-model.md.
It is an sdcore model directory (docs/model-format.md), made by tools/train_demo_model.py.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = "shapes-demo"


def demo_model_path() -> Path:
    """The directory of the embedded demo model, the default when no model is given."""
    return Path(__file__).resolve().parent / DEMO_MODEL
