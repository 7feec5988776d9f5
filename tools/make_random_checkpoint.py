"""Write a random-weight Stable Diffusion checkpoint with diffusers, for tests, benchmarks and demos.

    python tools/make_random_checkpoint.py OUT [--preset tiny-sd1|tiny-sd2|sd15|sd21] [--inpainting]
        [--format diffusers|safetensors|ckpt] [--seed 0] [--prediction-type epsilon|v_prediction]

`diffusers` writes a pipeline folder (what `save_pretrained` writes); `safetensors`/`ckpt` write one
file in the original CompVis/Stability key layout (what civitai-style single files contain).
Needs the test extra (torch, diffusers, transformers): `pip install -e ".[test]"`.
The weights are seeded random numbers: the model paints noise. It exists to exercise conversion,
compilation and parity with real shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdcore.presets import PRESETS
from sdcore.testing.checkpoints import write_diffusers, write_single_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="tiny-sd1", choices=sorted(PRESETS))
    parser.add_argument("--inpainting", action="store_true")
    parser.add_argument("--format", default="diffusers", choices=["diffusers", "safetensors", "ckpt"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} already exists", file=sys.stderr)
        return 1
    if args.format == "diffusers":
        write_diffusers(args.out, args.preset, args.inpainting, args.seed, args.prediction_type)
    else:
        write_single_file(args.out, args.preset, args.inpainting, args.seed, args.format)
    print(json.dumps({"wrote": str(args.out), "preset": args.preset, "inpainting": args.inpainting,
                      "format": args.format}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
